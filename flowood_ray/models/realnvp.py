"""RealNVP for vectors (Dinh et al. 2017): the density model over clip embeddings of seed 000.

``n_layers`` affine couplings with alternating even/odd masks (so every coordinate is transformed
by every other layer), each optionally preceded by an ActNorm with data-dependent init; the first
ActNorm then also standardises the raw embedding. Base distribution N(0, I).

Seed 000 found that a RealNVP on action-recognition embeddings could not separate real from
manipulated FaceForensics videos and proposed, after Kirichenko et al. (2020), to reduce the
capacity of the s/t networks with a bottleneck so that couplings cannot simply co-adapt to local
correlations: ``bottleneck=b`` makes every s/t net hidden -> b -> hidden (see
:func:`flowood_ray.models.flow_blocks.coupling_mlp`).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from flowood_ray.models.flow_blocks import (
    ActNorm,
    InvConv2d1x1,
    InvertibleBlock,
    MaskedAffineCoupling,
    SequentialFlow,
)
from flowood_ray.models.randomness import draw

_LOG_2PI = math.log(2.0 * math.pi)


class RealNVPConfig(BaseModel):
    """Hyper-parameters of a :class:`RealNVP`; saved as JSON with every run and enough to rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(ge=2)
    n_layers: int = Field(8, ge=1)
    hidden: int = Field(256, ge=1)
    bottleneck: int | None = Field(None, ge=1)
    actnorm: bool = True
    # Each layer mixes all coordinates with an invertible linear map first (Glow's 1x1 convolution, LU
    # parameterised): with it even one layer models full covariance, which alternating masks alone
    # reach only through depth.
    linear: bool = False
    clamp: float = Field(2.0, gt=0)
    # Width of a condition vector every coupling's s/t network also reads (CFLOW's positional encoding).
    cond_dim: int = Field(0, ge=0)


class RealNVP(nn.Module):
    """Vector flow; ``forward(x) -> (z, log_prob)`` with log p(x) in nats, shape (N,)."""

    def __init__(self, config: RealNVPConfig) -> None:
        super().__init__()
        self.config = config
        parity = torch.arange(config.dim) % 2
        blocks: list[InvertibleBlock] = []
        for layer in range(config.n_layers):
            if config.actnorm:
                blocks.append(ActNorm(config.dim))
            if config.linear:
                blocks.append(InvConv2d1x1(config.dim))
            blocks.append(
                MaskedAffineCoupling(
                    parity == layer % 2,
                    hidden=config.hidden,
                    bottleneck=config.bottleneck,
                    cond_dim=config.cond_dim,
                    scale="tanh",
                    clamp=config.clamp,
                )
            )
        self.flow = SequentialFlow(blocks)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, logdet = self.flow(x, cond)
        return z, -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=1) + logdet

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.forward(x, cond)[1]

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.flow.inverse(z, cond)[0]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        param = next(self.parameters())
        z = draw(torch.randn, (n, self.config.dim), generator, param.device, param.dtype)
        return self.inverse(temperature * z)
