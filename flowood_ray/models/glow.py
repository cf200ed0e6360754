"""Glow (Kingma & Dhariwal 2018): a multi-scale flow over face crops with exact per-sample likelihood.

Layout (openai/glow): for each of ``levels`` levels, squeeze -> ``steps_per_level`` x (ActNorm ->
invertible 1x1 conv -> affine coupling); at every level but the last, half of the channels are
factored out and modelled by a Gaussian whose mean and log-std come from a zero-initialised conv of
the kept half; the last level's output gets a learned (or standard) Gaussian top prior.

Latents: every factored-out tensor is returned *standardised*, ``eps = (z - mean) / std`` under its
prior, so all latents are N(0, I) under the model, ``inverse`` is an exact bijection from them, and
latent arithmetic and temperature sampling act on the same scale at every level (as openai's demo).

Pixel space and bits/dim
------------------------
``preprocess`` maps uint8 images to x in [-0.5, 0.5): with ``n_bins = 2**n_bits`` every discrete
value k in {0..n_bins-1} owns the bin [k/n_bins - 0.5, (k+1)/n_bins - 0.5) of width 1/n_bins.
``log_prob`` is the density of continuous x in that space (nats). The probability of a discrete image is
P(k) = integral of p over its bin ~= p(x) * (1/n_bins)**D, so

    bits/dim = -log2 P(k) / D = (-log p(x) + D * ln(n_bins)) / (D * ln 2),     D = C*H*W.

The D*ln(n_bins) term is the change of variables from bin indices to [-0.5, 0.5); omitting it (or
scaling by 255 instead of 256) makes the numbers incomparable with published ones. With uniform
dequantisation (training) the expectation over the noise is an upper bound on the discrete NLL;
the mid-bin variant (scoring) is a deterministic midpoint estimate of it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from flowood_ray.models.flow_blocks import (
    ActNorm,
    AffineCoupling,
    InvConv2d1x1,
    ScaleKind,
    SequentialFlow,
    Squeeze,
    ZeroConv2d,
)
from flowood_ray.models.randomness import draw

Dequantize = Literal["uniform", "center"]
_LOG_2PI = math.log(2.0 * math.pi)


class GlowConfig(BaseModel):
    """Hyper-parameters of a :class:`Glow`; saved as JSON with every run and enough to rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(64, ge=2)
    channels: int = Field(3, ge=1)
    levels: int = Field(3, ge=1)
    steps_per_level: int = Field(8, ge=1)
    hidden_channels: int = Field(128, ge=1)
    n_bits: int = Field(8, ge=1, le=8)
    learn_top_prior: bool = True
    coupling_scale: ScaleKind = "sigmoid"

    @model_validator(mode="after")
    def _check_divisible(self) -> GlowConfig:
        if self.image_size % 2**self.levels:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**levels = {2**self.levels}")
        return self


def preprocess(
    images: Tensor,
    n_bits: int = 8,
    dequantize: Dequantize = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """uint8 images (N, H, W, C) -> float32 (N, C, H, W) in [-0.5, 0.5) (see module docstring).

    ``uniform`` adds U(0, 1) noise inside each bin (training: the likelihood of the dequantised data
    bounds the discrete likelihood); ``center`` puts every value at its bin centre (deterministic
    scoring). With ``n_bits < 8`` the low bits are dropped first, as in Glow.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    if n_bits < 8:
        x = torch.floor(x / 2 ** (8 - n_bits))
    if dequantize == "uniform":
        x = x + draw(torch.rand, x.shape, generator, x.device, x.dtype)
    elif dequantize == "center":
        x = x + 0.5
    else:
        raise ValueError(f"unknown dequantize mode {dequantize!r}")
    return x / 2**n_bits - 0.5


def postprocess(x: Tensor, n_bits: int = 8) -> Tensor:
    """Inverse of :func:`preprocess` up to dequantisation: float (N, C, H, W) -> uint8 (N, H, W, C)."""
    n_bins = 2**n_bits
    levels = torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1)
    return (levels * 2 ** (8 - n_bits)).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _standard_normal_log_prob(eps: Tensor) -> Tensor:
    return -0.5 * (eps.pow(2) + _LOG_2PI).flatten(1).sum(dim=1)


class Glow(nn.Module):
    """Multi-scale Glow; ``forward(x) -> (latents, log_prob)`` with x from :func:`preprocess`."""

    def __init__(self, config: GlowConfig) -> None:
        super().__init__()
        self.config = config
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        self._latent_shapes: list[tuple[int, int, int]] = []
        channels, size = config.channels, config.image_size
        for level in range(config.levels):
            channels, size = channels * 4, size // 2
            blocks: list[nn.Module] = [Squeeze()]
            for _ in range(config.steps_per_level):
                blocks += [
                    ActNorm(channels),
                    InvConv2d1x1(channels),
                    AffineCoupling(channels, config.hidden_channels, scale=config.coupling_scale),
                ]
            self.levels.append(SequentialFlow(blocks))
            if level < config.levels - 1:
                kept = channels // 2
                self.split_priors.append(ZeroConv2d(kept, 2 * (channels - kept)))
                self._latent_shapes.append((channels - kept, size, size))
                channels = kept
        top_shape = (channels, size, size)
        self._latent_shapes.append(top_shape)
        if config.learn_top_prior:
            self.top_mean = nn.Parameter(torch.zeros(top_shape))
            self.top_log_std = nn.Parameter(torch.zeros(top_shape))
        else:
            self.register_buffer("top_mean", torch.zeros(top_shape))
            self.register_buffer("top_log_std", torch.zeros(top_shape))

    @property
    def dim(self) -> int:
        """D = C*H*W, the number of sub-pixels."""
        return self.config.channels * self.config.image_size**2

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent returned by :meth:`encode`, finest level first, top last."""
        return list(self._latent_shapes)

    def _split_prior(self, level: int, kept: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.split_priors[level](kept).chunk(2, dim=1)
        return mean, log_std

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """x (N, C, H, W) in [-0.5, 0.5) -> (standardised latents, log p(x) in nats, shape (N,))."""
        latents: list[Tensor] = []
        log_prob = x.new_zeros(x.shape[0])
        h = x
        for level, flow in enumerate(self.levels):
            h, logdet = flow(h)
            log_prob = log_prob + logdet
            if level < len(self.levels) - 1:
                kept, factored = h.chunk(2, dim=1)
                mean, log_std = self._split_prior(level, kept)
                h = kept
            else:
                factored, mean, log_std = h, self.top_mean, self.top_log_std.expand_as(h)
            eps = (factored - mean) * torch.exp(-log_std)
            # log N(z; mean, std) = log N(eps; 0, 1) - sum(log std): the standardisation's log-det.
            log_prob = log_prob + _standard_normal_log_prob(eps) - log_std.flatten(1).sum(dim=1)
            latents.append(eps)
        return latents, log_prob

    def inverse(self, latents: list[Tensor]) -> Tensor:
        """Standardised latents (as returned by :meth:`encode`) -> x (N, C, H, W)."""
        if len(latents) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents, got {len(latents)}")
        h = self.top_mean + torch.exp(self.top_log_std) * latents[-1]
        for level in reversed(range(len(self.levels))):
            if level < len(self.levels) - 1:
                mean, log_std = self._split_prior(level, h)
                h = torch.cat([h, mean + torch.exp(log_std) * latents[level]], dim=1)
            h, _ = self.levels[level].inverse(h)
        return h

    def encode(self, x: Tensor) -> list[Tensor]:
        """Standardised latents of x; edit them (means, attribute vectors) and map back with :meth:`inverse`."""
        return self.forward(x)[0]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats of continuous x in [-0.5, 0.5)^D, shape (N,)."""
        return self.forward(x)[1]

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """(-log p(x) + D ln(2**n_bits)) / (D ln 2), shape (N,); see the module docstring."""
        d = self.dim
        return (-self.log_prob(x) + d * math.log(2**self.config.n_bits)) / (d * math.log(2.0))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n samples in [-0.5, 0.5) space (clip/quantise with :func:`postprocess`); latents scaled by temperature."""
        device, dtype = self.top_mean.device, self.top_mean.dtype
        latents = [
            temperature * draw(torch.randn, (n, *shape), generator, device, dtype)
            for shape in self.latent_shapes
        ]
        return self.inverse(latents)
