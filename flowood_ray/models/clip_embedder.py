"""Clip embedders: 3-D convolutional encoders that turn a face-crop clip (N, 3, T, H, W) into (N, D).

Seed 000 embedded FaceForensics clips with an action-recognition 3-D ConvNet and fitted a RealNVP on
the embeddings. Two encoders are offered:

* :class:`ClipEncoder`, small and trained self-supervised on real clips as the encoder of a
  :class:`ClipAutoencoder` (no labels, no external weights needed);
* :class:`R3D18Encoder`, a torchvision-free re-implementation of ``torchvision.models.video.r3d_18``
  without its classifier, whose state_dict keys match torchvision's, so users who have Kinetics-400
  weights on disk can load them with :func:`load_r3d18_weights` (nothing is downloaded).

Both expose ``embed_dim`` and map float clips to embeddings; :func:`preprocess_clips` builds the input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

# torchvision's normalisation for its Kinetics-400 video models (inputs scaled to [0, 1] first).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def preprocess_clips(clips: Tensor, normalization: Literal["symmetric", "kinetics"] = "symmetric") -> Tensor:
    """uint8 clips (N, T, H, W, 3) -> float32 (N, 3, T, H, W).

    ``symmetric`` maps to [-0.5, 0.5] (for :class:`ClipEncoder`); ``kinetics`` applies the mean/std the
    Kinetics-trained R3D-18 weights expect.
    """
    if clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips (N, T, H, W, 3), got {clips.dtype} {tuple(clips.shape)}")
    x = clips.permute(0, 4, 1, 2, 3).to(torch.float32) / 255.0
    if normalization == "symmetric":
        return x - 0.5
    if normalization == "kinetics":
        mean = torch.tensor(KINETICS_MEAN, device=x.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(KINETICS_STD, device=x.device).view(1, 3, 1, 1, 1)
        return (x - mean) / std
    raise ValueError(f"unknown normalization {normalization!r}")


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


class _BasicBlock3d(nn.Module):
    """torchvision's video BasicBlock with Conv3DSimple; attribute names mirror its state_dict keys."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(inplanes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            nn.Conv3d(planes, planes, 3, padding=1, bias=False),
            nn.BatchNorm3d(planes),
        )
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm3d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + residual)


class R3D18Encoder(nn.Module):
    """R3D-18 (Tran et al. 2018) up to global average pooling: (N, 3, T, H, W) -> (N, 512).

    Same module tree as ``torchvision.models.video.r3d_18`` minus ``fc`` (stem.0/stem.1,
    layer1..layer4 with conv1.0/conv1.1/conv2.0/conv2.1 and downsample.0/.1), so its state_dict
    keys and shapes are torchvision's. BatchNorm: use ``eval()`` for batch-independent embeddings.
    Expects :func:`preprocess_clips` with ``normalization="kinetics"`` when loading Kinetics weights.
    """

    embed_dim = 512

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )
        inplanes = 64
        for index, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            layer = nn.Sequential(_BasicBlock3d(inplanes, planes, stride), _BasicBlock3d(planes, planes, 1))
            self.add_module(f"layer{index}", layer)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, clips: Tensor) -> Tensor:
        x = self.stem(clips)
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return self.avgpool(x).flatten(1)


def load_r3d18_weights(encoder: R3D18Encoder, path: str | Path) -> None:
    """Load an R3D-18 state_dict file (e.g. torchvision's Kinetics-400 weights) into ``encoder``.

    The classifier (``fc.*``) is dropped; every other key must match exactly (strict loading), so a
    file for a different architecture fails loudly instead of half-loading.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    encoder.load_state_dict({key: value for key, value in state.items() if not key.startswith("fc.")}, strict=True)
