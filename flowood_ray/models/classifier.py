"""Seed 004: a real/fake classifier for known manipulations and an abnormality module for unknown ones.

The classifier is the ImageNet EfficientNet-Lite, fine-tuned, with two heads on its stride-32 features:
real/fake logits, and a reconstruction of its input. The reconstruction is seed 004's CNN route: how
well the trunk's features explain an input tells the abnormality module whether the input is like
anything the network was trained on. The abnormality module is an MLP over the classifier's auxiliary
outputs (logits, softmax, energy, pooled features, a coarse grid of the reconstruction residual),
trained with the classifier frozen to separate training faces from self-blended outliers (real crops
blended into an altered copy of themselves, `self_blend.py`): the blending traces that face
manipulations share whatever their generator. BatchNorm runs on its running statistics when scoring,
so every score is a function of its own crop only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator
from torch import Tensor, nn

from flowood_ray.models.efficientnet import EfficientNetLite, EfficientNetLiteConfig, Variant
from flowood_ray.models.self_blend import SelfBlendConfig


class FakeClassifierConfig(BaseModel):
    image_size: int = Field(128, ge=32, description="a multiple of 32: the reconstruction climbs back from stride 32")
    variant: Variant = "lite0"
    pretrained: bool = Field(True, description="start from the packaged ImageNet weights")
    frozen_below_stride: int = Field(4, description="stem and blocks before this stride keep ImageNet's weights")
    bn_momentum: float = Field(0.1, gt=0.0, le=1.0, description="BatchNorm momentum of the fine-tuned layers")
    decoder_widths: tuple[int, ...] = Field((128, 64, 32, 16, 16), min_length=5, max_length=5,
                                            description="channels of the five x2 upsampling stages of the reconstruction")
    recon_weight: float = Field(1.0, ge=0, description="weight of the L1 reconstruction loss beside cross-entropy")
    blended_fakes: float = Field(
        0.0, ge=0, le=1, description="share of each batch's real faces also shown, self-blended, labelled fake"
    )
    blend: SelfBlendConfig = SelfBlendConfig()

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, size: int) -> int:
        if size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the encoder's deepest stride), got {size}")
        return size


class ClassifierOutput(NamedTuple):
    logits: Tensor  # (N, 2): real, fake
    features: Tensor  # (N, C): the pooled trunk features
    recon: Tensor  # (N, 3, H, W): the input reconstructed from the trunk


def _up_block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class FakeClassifier(nn.Module):
    """x in [-0.5, 0.5], (N, 3, H, W) -> ClassifierOutput."""

    def __init__(self, config: FakeClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = EfficientNetLite(
            EfficientNetLiteConfig(variant=config.variant, strides=(32,), pretrained=config.pretrained)
        )
        self.encoder.fine_tune(config.frozen_below_stride, config.bn_momentum)
        channels = self.encoder.feature_channels[32]
        self.head = nn.Linear(channels, 2)
        widths = config.decoder_widths
        self.up = nn.Sequential(*[_up_block(a, b) for a, b in zip((channels, *widths[:-1]), widths)])
        self.to_image = nn.Conv2d(widths[-1], 3, 3, padding=1)

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_channels[32]

    def forward(self, x: Tensor) -> ClassifierOutput:
        trunk = self.encoder.features(x + 0.5)[32]
        features = trunk.mean(dim=(2, 3))
        return ClassifierOutput(self.head(features), features, self.to_image(self.up(trunk)))


class AbnormalityConfig(BaseModel):
    feature_dim: int = Field(320, ge=1, description="the classifier's feature width (filled in from its config)")
    residual_grid: int = Field(4, ge=1, description="the reconstruction residual is averaged on a grid this wide")
    hidden: int = Field(64, ge=1)


def auxiliary(output: ClassifierOutput, x: Tensor, residual_grid: int) -> Tensor:
    """The classifier's evidence about one input, as one vector: logits, softmax, energy, pooled
    features and where the reconstruction failed."""
    residual = (output.recon - x).abs().mean(dim=1, keepdim=True)
    grid = F.adaptive_avg_pool2d(residual, residual_grid).flatten(1)
    energy = -torch.logsumexp(output.logits, dim=1, keepdim=True)
    return torch.cat([output.logits, output.logits.softmax(dim=1), energy, output.features, grid], dim=1)


class AbnormalityModule(nn.Module):
    """auxiliary vector (N, 5 + C + g*g) -> abnormality logit (N,)."""

    def __init__(self, config: AbnormalityConfig) -> None:
        super().__init__()
        self.config = config
        width = 5 + config.feature_dim + config.residual_grid**2
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, config.hidden), nn.SiLU(),
            nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 1),
        )

    def forward(self, aux: Tensor) -> Tensor:
        return self.net(aux).squeeze(1)


def balanced_mean(values: Tensor, labels: Tensor) -> Tensor:
    """Mean over each class present in the batch, then over the classes: four fakes per real (the
    FaceForensics++ layout) must not teach the classifier that a face is probably fake."""
    present = [values[labels == c].mean() for c in labels.unique()]
    return torch.stack(present).mean()


ODIN_TEMPERATURE = 1000.0
ODIN_EPSILON = 0.0014  # Liang et al.'s step, in units of the [0, 1] pixel range the model's inputs span


def odin_score(classifier: FakeClassifier, x: Tensor) -> Tensor:
    """1 - max temperature-scaled softmax after ODIN's input perturbation (Liang et al. 2018): higher is
    more out-of-distribution. Each input's gradient is of its own loss only, so batches do not mix."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        log_p = F.log_softmax(classifier(x).logits / ODIN_TEMPERATURE, dim=1)
        # autograd.grad leaves the parameters' .grad alone: scoring never accumulates gradients.
        (grad,) = torch.autograd.grad(-log_p.max(dim=1).values.sum(), x)
        perturbed = x - ODIN_EPSILON * grad.sign()
    with torch.no_grad():
        p = F.softmax(classifier(perturbed).logits / ODIN_TEMPERATURE, dim=1)
    return 1 - p.max(dim=1).values


def fake_or_abnormal(fake_logit: Tensor, abnormality_logit: Tensor) -> Tensor:
    """-log P(neither fires), with the two detectors read as independent: a monotone form of
    1 - (1 - p_fake)(1 - p_abnormal) that stays exact where either probability is near 1."""
    return F.softplus(fake_logit) + F.softplus(abnormality_logit)

