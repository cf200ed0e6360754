"""CFLOW-AD (Gudovskiy et al., WACV 2022): conditional flows on the feature pyramid of a frozen
ImageNet encoder, giving a per-pixel likelihood map.

Each feature vector ("fibre") at each position of the stride-s map is an independent sample of a
density conditioned on where it sits: one decoder per scale, a RealNVP whose every coupling also
reads a 2-D sinusoidal encoding of the fibre's position. On aligned faces the position is a facial
location, so the decoders learn what real skin, eyes, mouth and face boundary look like *there*, not
what a whole face looks like, which is what let whole-face densities drown in identity.

Likelihoods are per feature dimension (nats / C, as the reference code, so scales with very different
channel counts share a unit). The anomaly map standardises each scale's negative log-likelihood map
with statistics of real training crops, upsamples it bilinearly to the input and averages the
scales. The reference instead subtracts the maximum over the *test set* before an exp, which makes a
crop's map depend on what else is scored (cflow-ad#24, anomalib#169); fixed real statistics keep
every map batch-independent, and without the exp the anomalous tail does not saturate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from flowood_ray.models.efficientnet import FEATURE_STRIDES, Variant, stride_channels
from flowood_ray.models.realnvp import RealNVP, RealNVPConfig


def positional_encoding_2d(dim: int, height: int, width: int) -> Tensor:
    """(dim, height, width): the first half encodes the column, the second the row, each with
    interleaved sin/cos at geometrically spaced frequencies (CFLOW's `positionalencoding2d`)."""
    if dim % 4:
        raise ValueError(f"the positional encoding's dimension must be a multiple of 4, got {dim}")
    half = dim // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half))
    encoding = torch.zeros(dim, height, width, dtype=torch.float64)
    cols = torch.arange(width, dtype=torch.float64)[None, :] * frequencies[:, None]  # (half/2, W)
    rows = torch.arange(height, dtype=torch.float64)[None, :] * frequencies[:, None]  # (half/2, H)
    encoding[0:half:2] = torch.sin(cols)[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(cols)[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows)[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows)[:, :, None].expand(-1, -1, width)
    return encoding.float()


class CFlowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(128, ge=32, le=512)
    variant: Variant = "lite0"
    strides: tuple[int, ...] = (8, 16, 32)
    coupling_layers: int = Field(8, ge=1)
    condition_dim: int = Field(64, ge=4)
    clamp: float = Field(1.9, gt=0.0, description="soft clamp of the coupling log-scales (the paper's alpha)")
    fibers_per_image: int = Field(64, ge=1, description="random positions per crop and scale in a training step")
    top_k_fraction: float = Field(0.01, gt=0.0, le=1.0, description="share of map pixels in the top-k image score")

    @field_validator("strides")
    @classmethod
    def _known_strides(cls, strides: tuple[int, ...]) -> tuple[int, ...]:
        if not strides or not set(strides) <= set(FEATURE_STRIDES) or len(set(strides)) != len(strides):
            raise ValueError(f"strides must be distinct values from {FEATURE_STRIDES}, got {strides}")
        return tuple(sorted(strides))

    @field_validator("condition_dim")
    @classmethod
    def _multiple_of_four(cls, dim: int) -> int:
        if dim % 4:
            raise ValueError(f"condition_dim must be a multiple of 4, got {dim}")
        return dim


class CFlowDecoders(nn.Module):
    """One conditional flow per scale; ``forward({stride: fibres (M, C)}, {stride: conditions (M, D)})`` ->
    ``{stride: log-likelihood per dimension (M,)}``."""

    def __init__(self, config: CFlowConfig) -> None:
        super().__init__()
        self.config = config
        channels = stride_channels(config.variant)
        self.decoders = nn.ModuleDict({
            str(s): RealNVP(RealNVPConfig(
                dim=channels[s], n_layers=config.coupling_layers, cond_dim=config.condition_dim, linear=True,
                # The reference subnet: Linear(d_in, 2 d_in) -> ReLU -> Linear(2 d_in, d_out).
                hidden=2 * (channels[s] - channels[s] // 2 + config.condition_dim), clamp=config.clamp,
            ))
            for s in config.strides
        })
        self._encodings: dict[tuple[int, int], Tensor] = {}

    def encoding(self, height: int, width: int, device: torch.device) -> Tensor:
        """(D, H, W) positional encoding of a feature map, cached per shape."""
        key = (height, width)
        if key not in self._encodings:
            self._encodings[key] = positional_encoding_2d(self.config.condition_dim, height, width)
        return self._encodings[key].to(device)

    def forward(self, fibres: dict[int, Tensor], conditions: dict[int, Tensor]) -> dict[int, Tensor]:
        return {s: self.decoders[str(s)].log_prob(x, conditions[s]) / x.shape[1] for s, x in fibres.items()}

    def log_likelihood_maps(self, features: dict[int, Tensor]) -> dict[int, Tensor]:
        """{stride: (N, h, w) log-likelihood per dimension at every position} of whole feature maps."""
        fibres, conditions, shapes = {}, {}, {}
        for s in self.config.strides:
            fmap = features[s]
            n, c, h, w = fmap.shape
            fibres[s] = fmap.permute(0, 2, 3, 1).reshape(-1, c)
            conditions[s] = self.encoding(h, w, fmap.device).permute(1, 2, 0).reshape(1, h * w, -1).expand(n, -1, -1)
            conditions[s] = conditions[s].reshape(n * h * w, -1)
            shapes[s] = (n, h, w)
        return {s: v.view(shapes[s]) for s, v in self(fibres, conditions).items()}


def random_fibres(
    features: dict[int, Tensor], decoders: CFlowDecoders, per_image: int, generator: torch.Generator | None
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """`per_image` random positions of every crop at every scale: (fibres, their positional conditions)."""
    fibres, conditions = {}, {}
    for s, fmap in features.items():
        n, c, h, w = fmap.shape
        index = torch.randint(0, h * w, (n, per_image), generator=generator, device="cpu").to(fmap.device)
        flat = fmap.flatten(2)  # (N, C, h*w)
        fibres[s] = torch.gather(flat, 2, index[:, None, :].expand(-1, c, -1)).permute(0, 2, 1).reshape(-1, c)
        conditions[s] = decoders.encoding(h, w, fmap.device).flatten(1).T[index.flatten()]
    return fibres, conditions


def anomaly_map(log_likelihoods: dict[int, Tensor], reference: dict[int, tuple[float, float]], size: int) -> Tensor:
    """(N, size, size): each scale's NLL map standardised with real-data (mean, std) of its log-likelihood,
    bilinearly upsampled, averaged over scales. Higher = more anomalous."""
    maps = []
    for s, logp in log_likelihoods.items():
        mean, std = reference[s]
        z = -(logp - mean) / std
        maps.append(F.interpolate(z[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(dim=0)


def image_scores(maps: Tensor, top_k_fraction: float) -> dict[str, Tensor]:
    """Image scores of (N, H, W) anomaly maps: the maximum, the mean of the top-k pixels, the mean."""
    flat = maps.flatten(1)
    k = max(1, round(top_k_fraction * flat.shape[1]))
    return {"cflow_max": flat.max(dim=1).values, "cflow_topk": flat.topk(k, dim=1).values.mean(dim=1),
            "cflow_mean": flat.mean(dim=1)}
