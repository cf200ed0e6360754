"""Clip embedders: a 3-D convolutional encoder that turns a face-crop clip (N, 3, T, H, W) into (N, D).

Seed 000 embedded FaceForensics clips with an action-recognition 3-D ConvNet pretrained on Kinetics and
fitted a RealNVP on the embeddings. Here :class:`ClipEncoder` is small and trained self-supervised on
real clips as the encoder of a :class:`ClipAutoencoder`: no labels and no external weights, so nothing
has to be downloaded or shipped. :func:`preprocess_clips` builds its input.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn


def preprocess_clips(clips: Tensor) -> Tensor:
    """uint8 clips (N, T, H, W, 3) -> float32 (N, 3, T, H, W) in [-0.5, 0.5]."""
    if clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips (N, T, H, W, 3), got {clips.dtype} {tuple(clips.shape)}")
    return clips.permute(0, 4, 1, 2, 3).to(torch.float32) / 255.0 - 0.5


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: embeddings must not depend on the rest of the batch in training
    # either, and per-rank batches of a few clips make batch statistics noisy.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ClipEncoderConfig(BaseModel):
    """Hyper-parameters of a :class:`ClipEncoder`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(3, ge=1)
    widths: tuple[int, ...] = Field((32, 64, 128), min_length=1)
    embed_dim: int = Field(128, ge=1)


class ClipEncoder(nn.Module):
    """Stem conv (stride 1x2x2) then one stride-2 stage per further width, global average pool, linear.

    Downsamples H, W by ``2**len(widths)`` and T by ``2**(len(widths) - 1)``; any input size works.
    """

    def __init__(self, config: ClipEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        widths = config.widths
        layers: list[nn.Module] = [
            nn.Conv3d(config.in_channels, widths[0], (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)),
            _group_norm(widths[0]),
            nn.ReLU(),
        ]
        for previous, width in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv3d(previous, width, 3, stride=2, padding=1),
                _group_norm(width),
                nn.ReLU(),
                nn.Conv3d(width, width, 3, padding=1),
                _group_norm(width),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(widths[-1], config.embed_dim)

    def forward(self, clips: Tensor) -> Tensor:
        return self.proj(self.features(clips).mean(dim=(2, 3, 4)))


class ClipAutoencoderConfig(BaseModel):
    """Hyper-parameters of a :class:`ClipAutoencoder`; the clip shape fixes the decoder's output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: ClipEncoderConfig = ClipEncoderConfig()
    clip_frames: int = Field(8, ge=1)
    image_size: int = Field(64, ge=1)
    # "differences" models frame-to-frame changes (the first frame's is zero): a face's appearance,
    # which differs far more between people than between real and fake, cancels out, while
    # manipulations made frame by frame leave flicker and jitter in it.
    input: Literal["frames", "differences"] = "frames"

    @model_validator(mode="after")
    def _check_divisible(self) -> ClipAutoencoderConfig:
        stages = len(self.encoder.widths)
        if self.image_size % 2**stages or self.clip_frames % 2 ** (stages - 1):
            raise ValueError(
                f"image_size must be divisible by {2**stages} and clip_frames by {2 ** (stages - 1)}"
            )
        return self


class ClipAutoencoder(nn.Module):
    """Self-supervised training of a :class:`ClipEncoder`: reconstruct the clip from its embedding.

    The decoder starts from the embedding alone (no skip connections), so the embedding has to carry
    the clip's content; after training only ``encoder`` is kept for the embedding flow.
    """

    def __init__(self, config: ClipAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ClipEncoder(config.encoder)
        widths = config.encoder.widths
        stages = len(widths)
        self._start = (
            widths[-1],
            config.clip_frames // 2 ** (stages - 1),
            config.image_size // 2**stages,
            config.image_size // 2**stages,
        )
        self.expand = nn.Linear(config.encoder.embed_dim, math.prod(self._start))
        layers: list[nn.Module] = []
        for width, previous in zip(reversed(widths[:-1]), reversed(widths[1:]), strict=True):
            layers += [nn.ConvTranspose3d(previous, width, 4, stride=2, padding=1), _group_norm(width), nn.ReLU()]
        layers += [
            nn.ConvTranspose3d(widths[0], widths[0], (3, 4, 4), stride=(1, 2, 2), padding=1),
            _group_norm(widths[0]),
            nn.ReLU(),
            nn.Conv3d(widths[0], config.encoder.in_channels, 3, padding=1),
        ]
        self.decoder = nn.Sequential(*layers)

    def prepare(self, clips: Tensor) -> Tensor:
        """uint8 clips (N, T, H, W, 3) -> the float input (N, 3, T, H, W) this autoencoder models."""
        x = preprocess_clips(clips)
        if self.config.input == "differences":
            x = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        return x

    def decode(self, embedding: Tensor) -> Tensor:
        return self.decoder(self.expand(embedding).view(-1, *self._start))

    def forward(self, clips: Tensor) -> Tensor:
        """Reconstruction of ``clips`` (N, C, T, H, W)."""
        return self.decode(self.encoder(clips))

    def loss(self, clips: Tensor) -> Tensor:
        """Mean squared reconstruction error."""
        return F.mse_loss(self.forward(clips), clips)
