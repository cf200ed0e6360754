"""Seed 004: a real/fake classifier for known manipulations and an abnormality module for unknown ones.

The classifier is a small residual CNN with two heads on one trunk: real/fake logits, and a
reconstruction of its input. The reconstruction is seed 004's CNN route: how well the trunk's
features explain an input tells the abnormality module whether the input is like anything the
network was trained on. The abnormality module is an MLP over the classifier's auxiliary outputs
(logits, softmax, energy, pooled features, a coarse grid of the reconstruction residual), trained
with the classifier frozen to separate training faces from synthetic outliers: real faces with an
elliptical region replaced by a recoloured, re-sampled copy of themselves or of another face in the
batch, the blending traces that face manipulations share whatever their generator.
GroupNorm throughout keeps every output a function of its own input only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from flowood_ray.models.filters import BINOMIAL5, separable_blur


class FakeClassifierConfig(BaseModel):
    image_size: int = Field(64, ge=8)
    widths: tuple[int, ...] = Field((32, 64, 128), min_length=1, description="channels per stride-2 stage")
    groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every width")
    recon_weight: float = Field(1.0, ge=0, description="weight of the L1 reconstruction loss beside cross-entropy")
    blended_fakes: float = Field(
        0.0, ge=0, le=1, description="share of each batch's real faces also shown, as synthetic outliers, "
        "labelled fake (self-blended-image training); off by default: on the synthetic benchmark it lowered "
        "the AUROC of every seen method (README)"
    )

    @model_validator(mode="after")
    def _shapes(self) -> FakeClassifierConfig:
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.widths)} (one halving per stage)")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"groups {self.groups} must divide every width {self.widths}")
        return self


class ClassifierOutput(NamedTuple):
    logits: Tensor  # (N, 2): real, fake
    features: Tensor  # (N, C): the pooled trunk features
    recon: Tensor  # (N, 3, H, W): the input reconstructed from the trunk


# Residuals of the binomial blur are a few grey levels; this brings them to the image's scale.
HIGHPASS_GAIN = 8.0


class _DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.body(x) + self.skip(x))


def _up_block(c_in: int, c_out: int, groups: int) -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class FakeClassifier(nn.Module):
    """x in [-0.5, 0.5], (N, 3, H, W) -> ClassifierOutput."""

    def __init__(self, config: FakeClassifierConfig) -> None:
        super().__init__()
        self.config = config
        widths, groups = config.widths, config.groups
        # The image and its high-pass residual: blending seams and re-sampling blur live in the top
        # octave, which a randomly initialised stem would take many epochs to single out.
        self.stem = nn.Sequential(nn.Conv2d(6, widths[0], 3, padding=1), nn.GroupNorm(groups, widths[0]), nn.SiLU())
        self.down = nn.Sequential(*[_DownBlock(a, b, groups) for a, b in zip((widths[0], *widths[:-1]), widths)])
        self.head = nn.Linear(widths[-1], 2)
        ups = list(reversed(widths))
        self.up = nn.Sequential(*[_up_block(a, b, groups) for a, b in zip(ups, (*ups[1:], widths[0]))])
        self.to_image = nn.Conv2d(widths[0], 3, 3, padding=1)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def forward(self, x: Tensor) -> ClassifierOutput:
        detail = HIGHPASS_GAIN * (x - separable_blur(x, BINOMIAL5, "replicate"))
        trunk = self.down(self.stem(torch.cat([x, detail], dim=1)))
        features = trunk.mean(dim=(2, 3))
        return ClassifierOutput(self.head(features), features, self.to_image(self.up(trunk)))


class AbnormalityConfig(BaseModel):
    feature_dim: int = Field(128, ge=1, description="the classifier's feature width (filled in from its config)")
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


def _uniform(generator: torch.Generator | None, n: int, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand((n, *shape), generator=generator)


def synthesize_outliers(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """uint8 faces (N, H, W, 3) -> uint8 faces with a soft elliptical region blended in from a donor.

    The donor is the face itself (a self-blend) or another face of the batch (a crude swap), recoloured,
    blurred or sharpened, and shifted/scaled by a sub-pixel warp: the colour, sharpness and alignment
    seams that swaps, reenactments and re-rendered mouths leave where they meet the real frame.
    Random draws come from `generator` on the CPU, so outliers are reproducible for a given seed.
    """
    n, h, w, _ = images.shape
    device = images.device
    x = images.permute(0, 3, 1, 2).float()
    own = (torch.rand(n, generator=generator) < 0.5).to(device)
    donor = torch.where(own[:, None, None, None], x, x[torch.randperm(n, generator=generator).to(device)])
    gain = _uniform(generator, n, 0.85, 1.15, 3, 1, 1).to(device)
    bias = _uniform(generator, n, -15.0, 15.0, 3, 1, 1).to(device)
    donor = donor * gain + bias
    sharpness = _uniform(generator, n, -1.0, 1.0, 1, 1, 1).to(device)
    donor = donor + sharpness * (separable_blur(donor, BINOMIAL5, "replicate") - donor)
    scale = _uniform(generator, n, 0.94, 1.06).to(device)
    shift = _uniform(generator, n, -3.0, 3.0, 2).to(device) * 2 / torch.tensor([w, h], device=device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    donor = F.grid_sample(donor, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Where a face's inner region sits in an aligned crop, with room for every mask size and position.
    centre = _uniform(generator, n, -0.08, 0.08, 2).to(device) + torch.tensor([0.5, 0.55], device=device)
    axes = torch.stack([_uniform(generator, n, 0.15, 0.35), _uniform(generator, n, 0.2, 0.4)], dim=1).to(device)
    softness = _uniform(generator, n, 0.02, 0.2).to(device)
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    radius = torch.sqrt(
        ((xs[None, None, :] - centre[:, 0, None, None]) / axes[:, 0, None, None]) ** 2
        + ((ys[None, :, None] - centre[:, 1, None, None]) / axes[:, 1, None, None]) ** 2
    )
    mask = torch.sigmoid((1 - radius) / softness[:, None, None]).unsqueeze(1)
    out = x * (1 - mask) + donor * mask
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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

