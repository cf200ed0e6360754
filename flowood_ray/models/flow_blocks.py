"""Invertible building blocks shared by the flow models (Glow, RealNVP, conditional flows).

Every block maps data towards the latent space in ``forward`` and back in ``inverse``, and both
return the per-sample log absolute Jacobian determinant of the map they just applied, shape (N,):

    y, logdet = block(x, cond)          # logdet = log|det dy/dx|
    x, logdet_inv = block.inverse(y, cond)   # logdet_inv = log|det dx/dy| = -logdet

so a flow's log-likelihood is ``log p_base(f(x)) + sum of forward logdets``. ``cond`` is an optional
conditioning tensor that only the coupling blocks read (a CFLOW-style conditional flow passes a
positional encoding there); blocks that do not use it accept and ignore it so that any block can sit
in a :class:`SequentialFlow`.

Blocks work on (N, C) vectors and (N, C, *spatial) maps unless stated otherwise; "channels" is dim 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ScaleKind = Literal["sigmoid", "tanh"]


class InvertibleBlock(nn.Module):
    """Interface of all flow blocks: an invertible map with a tractable log-determinant."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    """Broadcast a scalar log-determinant (same for every sample) to shape (N,)."""
    return value.to(like.dtype).expand(like.shape[0])


def _channel_view(param: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector so it broadcasts over (N, C, *spatial)."""
    return param.view(1, -1, *([1] * (x.dim() - 2)))


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _sum_over_ranks(t: Tensor) -> Tensor:
    """Sum across torch.distributed ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class ActNorm(InvertibleBlock):
    """Per-channel affine map ``y = (x + loc) * exp(log_scale)`` with data-dependent initialisation.

    The first forward pass in training mode sets ``loc``/``log_scale`` so that the output of that batch
    has zero mean and unit variance per channel (Glow). The flag that records this is a buffer: after
    ``load_state_dict`` a model must not re-initialise over trained weights (a bug four public flow
    libraries shipped with). In eval mode no initialisation happens, so scoring never depends on the
    batch. Under torch.distributed the statistics are pooled over all ranks' batches, so every rank
    initialises to the same parameters (DDP only broadcasts parameters when it wraps the model).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        # uint8 rather than bool so that collective broadcasts of buffers work on every backend.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        count = _sum_over_ranks(flat.new_tensor(float(flat.shape[1])))
        mean = _sum_over_ranks(flat.sum(dim=1)) / count
        # Two passes (mean, then squared deviations) stay accurate when |mean| >> std.
        std = (_sum_over_ranks((flat - mean[:, None]).pow(2).sum(dim=1)) / count).sqrt()
        if bool((std == 0).any()):
            # A zero-variance channel would get an unbounded scale and dominate every likelihood.
            raise ValueError(
                "ActNorm initialisation found constant channels "
                f"{torch.nonzero(std == 0).flatten().tolist()}; drop them or use a larger init batch"
            )
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + _channel_view(self.loc, x)) * _channel_view(self.log_scale.exp(), x)
        return y, _per_sample(_spatial_size(x) * self.log_scale.sum(), x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = y * _channel_view((-self.log_scale).exp(), y) - _channel_view(self.loc, y)
        return x, _per_sample(-_spatial_size(y) * self.log_scale.sum(), y)


class InvConv2d1x1(InvertibleBlock):
    """Invertible channel mixing (Glow's 1x1 convolution) parameterised as ``W = P L (U + diag(s))``.

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular and
    ``s = sign_s * exp(log_s)`` with the signs frozen, so ``log|det W| = sum(log_s)`` is exact and cheap
    and W can never become singular during training. Initialised from a random orthogonal matrix.
    Applied at every spatial position, hence the log-det is multiplied by H*W (1 for vectors).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        # Only the strict triangles of these two parameters are read; the rest get zero gradients.
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        eye = torch.eye(self.log_s.numel(), dtype=dtype, device=self.log_s.device)
        lower = torch.tril(self.lower.to(dtype), -1) + eye
        upper = torch.triu(self.upper.to(dtype), 1) + torch.diag((self.sign_s * self.log_s.exp()).to(dtype))
        return self.perm.to(dtype), lower, upper

    def weight(self) -> Tensor:
        perm, lower, upper = self._factors(self.log_s.dtype)
        return perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        # Triangular solves in float64 instead of a general matrix inverse: exact structure, no pivoting.
        perm, lower, upper = self._factors(torch.float64)
        eye = torch.eye(perm.shape[0], dtype=torch.float64, device=perm.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return (upper_inv @ lower_inv @ perm.T).to(self.log_s.dtype)

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        return (x.movedim(1, -1) @ w.to(x.dtype).T).movedim(-1, 1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._mix(self.weight(), x), _per_sample(_spatial_size(x) * self.log_s.sum(), x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._mix(self.inverse_weight(), y), _per_sample(-_spatial_size(y) * self.log_s.sum(), y)


def log_scale_from_raw(raw: Tensor, kind: ScaleKind, clamp: float) -> Tensor:
    """Bounded log-scale of an affine coupling.

    ``sigmoid``: Glow's ``scale = sigmoid(raw + 2)`` (scale in (0, 1), 0.88 at init); the log is taken
    with ``logsigmoid`` so it never underflows to -inf. ``tanh``: ``log_scale = clamp * tanh(raw / clamp)``,
    a soft clamp to (-clamp, clamp) that is the identity at init (RealNVP / FrEIA style).
    """
    if kind == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    return clamp * torch.tanh(raw / clamp)


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to output zeros, with a learned per-channel output gain exp(3*g).

    Zero output at init makes every coupling (and Glow's split priors) start as a fixed, well-behaved map.
    Padding uses the value 1 so the network can tell image borders from zero-valued content.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.gain = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, [1, 1, 1, 1], value=1.0)) * torch.exp(3.0 * self.gain)


class AffineCoupling(InvertibleBlock):
    """Image affine coupling: the first C//2 channels pass through and parameterise the rest.

    ``y_b = (x_b + t(x_a, cond)) * scale(x_a, cond)`` with the bounded scale of :func:`log_scale_from_raw`;
    log-det = sum of log-scales. The net is conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d (Glow).
    ``cond`` (N, cond_channels, H, W) is concatenated to the net input.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        cond_channels: int = 0,
        scale: ScaleKind = "sigmoid",
        clamp: float = 2.0,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError("a coupling needs at least 2 channels")
        self.n_keep = channels // 2
        self.n_change = channels - self.n_keep
        self.cond_channels = cond_channels
        self.scale = scale
        self.clamp = clamp
        self.net = nn.Sequential(
            nn.Conv2d(self.n_keep + cond_channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, 2 * self.n_change),
        )

    def _shift_log_scale(self, x_keep: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(f"coupling built with cond_channels={self.cond_channels} got cond={cond is not None}")
        h = self.net(x_keep if cond is None else torch.cat([x_keep, cond], dim=1))
        shift, raw = h[:, : self.n_change], h[:, self.n_change :]
        return shift, log_scale_from_raw(raw, self.scale, self.clamp)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_keep, x_change = x[:, : self.n_keep], x[:, self.n_keep :]
        shift, log_scale = self._shift_log_scale(x_keep, cond)
        y_change = (x_change + shift) * log_scale.exp()
        return torch.cat([x_keep, y_change], dim=1), log_scale.flatten(1).sum(dim=1)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y_keep, y_change = y[:, : self.n_keep], y[:, self.n_keep :]
        shift, log_scale = self._shift_log_scale(y_keep, cond)
        x_change = y_change * (-log_scale).exp() - shift
        return torch.cat([y_keep, x_change], dim=1), -log_scale.flatten(1).sum(dim=1)


def coupling_mlp(in_features: int, out_features: int, hidden: int, bottleneck: int | None) -> nn.Sequential:
    """s/t network for vector couplings, last layer zero-initialised (identity coupling at init).

    With ``bottleneck=b`` the hidden path is hidden -> b -> hidden: limiting the capacity of the s/t
    network is the fix proposed in seed 000 (after Kirichenko et al. 2020) against couplings that
    co-adapt to local correlations instead of modelling the data's semantics.
    """
    widths = [hidden, hidden] if bottleneck is None else [hidden, bottleneck, hidden]
    layers: list[nn.Module] = []
    previous = in_features
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    last = nn.Linear(previous, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class MaskedAffineCoupling(InvertibleBlock):
    """Vector affine coupling (RealNVP): entries where ``mask`` is True pass through and condition the rest.

    ``y_b = (x_b + t(x_a, cond)) * exp(log_scale(x_a, cond))``; ``cond`` (N, cond_dim) is appended to the
    s/t network input. Default scale is the tanh soft clamp, identity at init.
    """

    def __init__(
        self,
        mask: Tensor,
        hidden: int,
        bottleneck: int | None = None,
        cond_dim: int = 0,
        scale: ScaleKind = "tanh",
        clamp: float = 2.0,
    ) -> None:
        super().__init__()
        mask = mask.bool()
        if mask.dim() != 1 or bool(mask.all()) or not bool(mask.any()):
            raise ValueError("mask must be a 1-D boolean vector with both True and False entries")
        self.register_buffer("keep_index", torch.nonzero(mask).flatten())
        self.register_buffer("change_index", torch.nonzero(~mask).flatten())
        self.cond_dim = cond_dim
        self.scale = scale
        self.clamp = clamp
        n_change = self.change_index.numel()
        self.net = coupling_mlp(self.keep_index.numel() + cond_dim, 2 * n_change, hidden, bottleneck)

    def _shift_log_scale(self, x_keep: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        if (cond is None) != (self.cond_dim == 0):
            raise ValueError(f"coupling built with cond_dim={self.cond_dim} got cond={cond is not None}")
        h = self.net(x_keep if cond is None else torch.cat([x_keep, cond], dim=1))
        n_change = self.change_index.numel()
        return h[:, :n_change], log_scale_from_raw(h[:, n_change:], self.scale, self.clamp)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(x[:, self.keep_index], cond)
        y_change = (x[:, self.change_index] + shift) * log_scale.exp()
        return x.index_copy(1, self.change_index, y_change), log_scale.sum(dim=1)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(y[:, self.keep_index], cond)
        x_change = y[:, self.change_index] * (-log_scale).exp() - shift
        return y.index_copy(1, self.change_index, x_change), -log_scale.sum(dim=1)


class Squeeze(InvertibleBlock):
    """Space-to-depth: (N, C, H, W) -> (N, 4C, H/2, W/2); a permutation, so log-det 0."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even spatial size, got {h}x{w}")
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(n)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n, c4, h, w = y.shape
        x = y.view(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, 2 * h, 2 * w)
        return x, y.new_zeros(n)


class SequentialFlow(InvertibleBlock):
    """Composition of blocks; log-determinants add up, ``inverse`` runs the blocks in reverse."""

    def __init__(self, blocks: Iterable[InvertibleBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, logdet = block(x, cond)
            total = total + logdet
        return x, total

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = y.new_zeros(y.shape[0])
        for block in reversed(self.blocks):
            y, logdet = block.inverse(y, cond)
            total = total + logdet
        return y, total
