"""DifferNet (Rudolph et al., WACV 2021): a normalizing flow on one multi-scale feature vector per crop.

The frozen ImageNet encoder's maps at strides 8, 16 and 32 are globally average-pooled and
concatenated (472 values for Lite0), and a RealNVP with LU channel mixing, ActNorm and soft-clamped
affine couplings (the paper's clamp 3) models their density. Training maximises the likelihood of real
crops under random flips, small rotations and brightness/contrast changes, so the density covers a
face's harmless variations; likelihoods are per feature dimension (nats / D).

The score is the mean NLL over a FIXED set of transformed copies of the crop (the paper's
multi-transform evaluation, with fixed transforms instead of random ones so a crop always gets the
same score): :data:`SCORING_TRANSFORMS`, identity, horizontal flip, rotations of +-5 degrees,
brightness x0.9 / x1.1 and contrast x0.9 / x1.1. Its localisation map is the paper's: the gradient of
that score with respect to the input pixels, through the transforms and the frozen encoder, its
absolute value summed over colour channels and Gaussian-smoothed.
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import Tensor, nn

from flowood_ray.models.efficientnet import FEATURE_STRIDES, EfficientNetLite, Variant, stride_channels
from flowood_ray.models.filters import gaussian_kernel, separable_blur
from flowood_ray.models.realnvp import RealNVP, RealNVPConfig

# ITU-R BT.601 luma weights: contrast is scaled about a crop's mean grey level.
_LUMA = (0.299, 0.587, 0.114)


def _known_strides(strides: tuple[int, ...]) -> tuple[int, ...]:
    if not strides or not set(strides) <= set(FEATURE_STRIDES) or len(set(strides)) != len(strides):
        raise ValueError(f"strides must be distinct values from {FEATURE_STRIDES}, got {strides}")
    return tuple(sorted(strides))


# Feature maps a consumer of the frozen encoder reads (the encoder's config is filled from it).
Strides = Annotated[tuple[int, ...], AfterValidator(_known_strides)]


class CropTransform(NamedTuple):
    flip: bool = False  # mirror left-right
    degrees: float = 0.0  # rotation about the crop centre, counter-clockwise as displayed
    brightness: float = 1.0  # factor on every pixel
    contrast: float = 1.0  # factor on each pixel's distance from the crop's mean grey level


SCORING_TRANSFORMS: tuple[CropTransform, ...] = (
    CropTransform(), CropTransform(flip=True), CropTransform(degrees=5.0), CropTransform(degrees=-5.0),
    CropTransform(brightness=1.1), CropTransform(brightness=0.9), CropTransform(contrast=1.1),
    CropTransform(contrast=0.9),
)


class DifferNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(128, ge=32, le=512)
    variant: Variant = "lite0"
    strides: Strides = (8, 16, 32)
    coupling_layers: int = Field(8, ge=1)
    hidden: int = Field(512, ge=1, description="width of the couplings' s/t networks (the paper: 2048)")
    clamp: float = Field(3.0, gt=0.0, description="soft clamp of the coupling log-scales (the paper's 3)")
    train_flip: bool = True
    train_degrees: float = Field(10.0, ge=0.0, le=45.0, description="training rotations, uniform in +-this")
    train_brightness: float = Field(0.1, ge=0.0, lt=1.0, description="training brightness factor, 1 +- this")
    train_contrast: float = Field(0.1, ge=0.0, lt=1.0, description="training contrast factor, 1 +- this")
    map_sigma: float = Field(4.0, gt=0.0, description="Gaussian smoothing of the gradient map, in input pixels")


def pooled_dim(variant: Variant, strides: tuple[int, ...]) -> int:
    """Length of the :func:`pooled_features` vector."""
    channels = stride_channels(variant)
    return sum(channels[s] for s in strides)


class DifferNetFlow(nn.Module):
    """``forward(pooled (N, D)) -> log-likelihood per dimension (N,)``."""

    def __init__(self, config: DifferNetConfig) -> None:
        super().__init__()
        self.config = config
        self.flow = RealNVP(RealNVPConfig(
            dim=pooled_dim(config.variant, config.strides), n_layers=config.coupling_layers, hidden=config.hidden,
            linear=True, clamp=config.clamp,
        ))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.flow.log_prob(pooled) / pooled.shape[1]


def unit_float(images: Tensor) -> Tensor:
    """uint8 crops (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], the encoder's differentiable input."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 255.0


def pooled_features(encoder: EfficientNetLite, x: Tensor) -> Tensor:
    """(N, D): every feature map the encoder gives, globally average-pooled, concatenated by stride."""
    maps = encoder.features(x)
    return torch.cat([maps[s].mean(dim=(2, 3)) for s in sorted(maps)], dim=1)


def _per_crop(value: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(like.shape[0])


def transform_crops(
    x: Tensor, flip: Tensor | bool, degrees: Tensor | float, brightness: Tensor | float, contrast: Tensor | float
) -> Tensor:
    """float crops (N, 3, H, W) in [0, 1], each transformed by its own parameters (scalars or (N,)):
    flip, then rotate (bilinear, borders replicated), then brightness, then contrast, clipped to [0, 1].
    Differentiable with respect to ``x``."""
    n, _, h, w = x.shape
    flip_t = torch.as_tensor(flip, device=x.device).expand(n)
    x = torch.where(flip_t[:, None, None, None], x.flip(-1), x)
    angle = _per_crop(degrees, x) * (math.pi / 180.0)
    # Skipped when no crop turns: grid_sample at exact pixel centres is the identity only up to rounding.
    if bool((angle != 0).any()):
        cos, sin = angle.cos(), angle.sin()
        # Output -> input sampling position in normalised coordinates, which scale x by 2/W and y by 2/H.
        theta = x.new_zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * _per_crop(brightness, x)[:, None, None, None]
    grey = (x * x.new_tensor(_LUMA)[None, :, None, None]).sum(dim=1).mean(dim=(1, 2))
    factor = _per_crop(contrast, x)[:, None, None, None]
    x = grey[:, None, None, None] + factor * (x - grey[:, None, None, None])
    return x.clamp(0.0, 1.0)


def random_transforms(images: Tensor, config: DifferNetConfig, generator: torch.Generator | None) -> Tensor:
    """uint8 crops -> float crops under DifferNet's training transforms, drawn per crop on the CPU."""
    n = images.shape[0]

    def uniform(spread: float) -> Tensor:
        return ((torch.rand(n, generator=generator) * 2 - 1) * spread).to(images.device)

    flip = (torch.rand(n, generator=generator) < (0.5 if config.train_flip else 0.0)).to(images.device)
    return transform_crops(unit_float(images), flip, uniform(config.train_degrees),
                           1 + uniform(config.train_brightness), 1 + uniform(config.train_contrast))


def multi_transform_nll(encoder: EfficientNetLite, flow: DifferNetFlow, x: Tensor) -> Tensor:
    """(N,) DifferNet's score: the mean NLL per dimension of float crops x over SCORING_TRANSFORMS."""
    nlls = [-flow(pooled_features(encoder, transform_crops(x, *t))) for t in SCORING_TRANSFORMS]
    return torch.stack(nlls).mean(dim=0)


def gradient_map(encoder: EfficientNetLite, flow: DifferNetFlow, x: Tensor) -> tuple[Tensor, Tensor]:
    """(score (N,), map (N, H, W)) of float crops: the map is |d score / d pixel| summed over channels,
    Gaussian-smoothed. Each crop's score depends on its own pixels only, so the gradient of the batch's
    sum is every crop's own gradient; autograd.grad leaves the parameters' .grad untouched."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        score = multi_transform_nll(encoder, flow, x)
        (grad,) = torch.autograd.grad(score.sum(), x)
    kernel = gaussian_kernel(flow.config.map_sigma)
    return score.detach(), separable_blur(grad.abs().sum(dim=1, keepdim=True), kernel, "replicate")[:, 0]
