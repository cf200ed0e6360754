"""A density of local high-frequency texture: a RealNVP over small high-pass patches of face crops.

Whole-face densities are dominated by who is in the picture (skin tone, shape, lighting), which
varies far more between real people than between a real video and its fake. The high-pass
residual (grey level minus its Gaussian blur) drops those low frequencies and keeps what blending,
resampling and re-rendering change: noise, sharpness and seams. Each ``patch`` x ``patch`` window
of the residual, taken every ``stride`` pixels, is one sample of the flow, so a crop yields a map
of log-densities and a model learns from hundreds of samples per crop.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from flowood_ray.models.filters import gaussian_kernel, separable_blur
from flowood_ray.models.realnvp import RealNVP, RealNVPConfig

# ITU-R BT.601 luma weights: the residual is modelled in grey levels.
_LUMA = (0.299, 0.587, 0.114)


class PatchDensityConfig(BaseModel):
    """Hyper-parameters of a :class:`PatchDensity`; saved as JSON with every run and enough to rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(64, ge=8)
    patch: int = Field(8, ge=2)
    stride: int = Field(4, ge=1)
    sigma: float = Field(1.0, gt=0, description="Gaussian blur removed from the grey image (pixels)")
    n_layers: int = Field(6, ge=1)
    hidden: int = Field(128, ge=1)
    bottleneck: int | None = Field(None, ge=1)
    linear: bool = Field(True, description="an LU linear map in every layer (see RealNVPConfig.linear)")

    @model_validator(mode="after")
    def _fits(self) -> PatchDensityConfig:
        if self.patch > self.image_size:
            raise ValueError(f"patch {self.patch} is larger than the image ({self.image_size})")
        return self


class PatchDensity(nn.Module):
    """``forward(images) -> log p`` of every patch, in nats, shape (N, rows, cols)."""

    def __init__(self, config: PatchDensityConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.patch**2
        self.flow = RealNVP(RealNVPConfig(
            dim=self.dim, n_layers=config.n_layers, hidden=config.hidden, bottleneck=config.bottleneck,
            linear=config.linear,
        ))
        self.register_buffer("kernel", gaussian_kernel(config.sigma), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        self.grid = (config.image_size - config.patch) // config.stride + 1

    def highpass(self, images: Tensor) -> Tensor:
        """uint8 images (N, H, W, 3) -> high-pass grey residual (N, 1, H, W) in units of 1/255."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        grey = (images.permute(0, 3, 1, 2).float() / 255.0 * self.luma).sum(1, keepdim=True)
        return grey - separable_blur(grey, self.kernel, "reflect")

    def patches(self, images: Tensor) -> Tensor:
        """(N, rows * cols, patch**2) high-pass patches, row-major over the grid."""
        c = self.config
        return F.unfold(self.highpass(images), c.patch, stride=c.stride).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.patches(images)
        n, count, dim = patches.shape
        _, log_prob = self.flow(patches.reshape(n * count, dim))
        return log_prob.view(n, self.grid, self.grid)

    def inner_mask(self) -> Tensor:
        """Patches whose centre lies in the central half of the crop: the face itself, for aligned crops."""
        c = self.config
        centres = torch.arange(self.grid) * c.stride + c.patch / 2
        inside = (centres - c.image_size / 2).abs() < c.image_size / 4
        return inside[:, None] & inside[None, :]
