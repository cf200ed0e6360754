"""Latent arithmetic on Glow's standardised latents (seed 001: attribute manipulation, mean faces and
expression transfer between identities).

A *latent* is the list :meth:`Glow.encode` returns, one (N, C, H, W) tensor per level, finest first;
:meth:`Glow.inverse` maps it back. Every function here acts level by level and elementwise, so a
list of levels behaves like one long vector of D = C*H*W numbers; :func:`flatten_latents` and
:func:`unflatten_latents` convert between the two views. Statistics of a set of crops (a mean face,
a per-dimension spread) keep a batch axis of 1, so they broadcast against a batch and decode as is.

Expression transfer (source S onto target T; O = one original frame, M = an identity's mean latent):

* linear:   z_OT = alpha * z_expr + z_MT, with z_expr = z_OS - z_MS or, halved, (z_OS - z_MS) / 2;
* variance: z_OT = alpha * z_expr * (sd_T + eps) / (sd_S + eps) + z_MT.

The variance variant re-scales the source's deviation from its neutral face, per latent dimension,
from the source's spread to the target's: an expression that is a large excursion for a face that
barely moves becomes a proportionate one for the target. The slides print
``((z_OS - z_MS) / (var_S + eps) + z_MT) / (var_T + eps)``, which also divides the target's mean by
its spread (at z_OS = z_MS it would not return the target's neutral face) and has no alpha; we read
it as whitening by the source and re-colouring by the target, with standard deviations rather than
variances because a deviation scales with the former. eps enters numerator and denominator alike,
so equal spreads reduce the variance variant to the linear one exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Latents = list[Tensor]


def _check_levels(*latents: Sequence[Tensor]) -> None:
    counts = {len(z) for z in latents}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"latents must have the same, non-zero number of levels, got {sorted(counts)}")
    for level in zip(*latents):
        shapes = {tuple(t.shape[1:]) for t in level}
        if len(shapes) != 1:
            raise ValueError(f"latent levels disagree in shape: {sorted(shapes)}")


def _levelwise(fn: Callable[..., Tensor], *latents: Sequence[Tensor]) -> Latents:
    _check_levels(*latents)
    return [fn(*level) for level in zip(*latents)]


def flatten_latents(latents: Sequence[Tensor]) -> Tensor:
    """Levels (N, C_l, H_l, W_l) -> (N, D), finest level first."""
    _check_levels(latents)
    return torch.cat([z.flatten(1) for z in latents], dim=1)


def unflatten_latents(flat: Tensor, shapes: Sequence[tuple[int, int, int]]) -> Latents:
    """(N, D) -> levels of the given (C, H, W) shapes (e.g. :attr:`Glow.latent_shapes`)."""
    sizes = [math.prod(shape) for shape in shapes]
    if flat.dim() != 2 or flat.shape[1] != sum(sizes):
        raise ValueError(f"expected (N, {sum(sizes)}) latents for shapes {list(shapes)}, got {tuple(flat.shape)}")
    return [part.reshape(len(flat), *shape) for part, shape in zip(flat.split(sizes, dim=1), shapes)]


def batch_size(latents: Sequence[Tensor]) -> int:
    sizes = {len(z) for z in latents}
    if len(sizes) != 1:
        raise ValueError(f"latent levels hold different numbers of samples: {sorted(sizes)}")
    return sizes.pop()


def concat_latents(parts: Sequence[Sequence[Tensor]]) -> Latents:
    """Batches of latents (e.g. encoded in chunks) -> one batch."""
    return _levelwise(lambda *level: torch.cat(level, dim=0), *parts)


def mean_latent(latents: Sequence[Tensor]) -> Latents:
    """Mean over the batch, level by level, shape (1, C, H, W): an identity's neutral face."""
    if batch_size(latents) == 0:
        raise ValueError("the mean of no latents is undefined")
    return _levelwise(lambda z: z.mean(dim=0, keepdim=True), latents)


def std_latent(latents: Sequence[Tensor]) -> Latents:
    """Per-dimension sample standard deviation over the batch (Bessel-corrected), shape (1, C, H, W)."""
    if batch_size(latents) < 2:
        raise ValueError("a per-dimension spread needs at least two latents")
    return _levelwise(lambda z: z.std(dim=0, keepdim=True), latents)


def attribute_vector(z_pos: Sequence[Tensor], z_neg: Sequence[Tensor]) -> Latents:
    """mean(z_pos) - mean(z_neg): the direction from faces without an attribute to faces with it."""
    return _levelwise(torch.sub, mean_latent(z_pos), mean_latent(z_neg))


def edit(z: Sequence[Tensor], vector: Sequence[Tensor], alpha: float) -> Latents:
    """z + alpha * vector; alpha = 0 returns z itself, bit for bit."""
    if alpha == 0:
        return list(z)
    return _levelwise(lambda a, v: a + alpha * v, z, vector)


def expression_vector(z_source: Sequence[Tensor], source_mean: Sequence[Tensor], half: bool = False) -> Latents:
    """z_OS - z_MS, or (z_OS - z_MS) / 2 (the slides' best variant): each frame's departure from neutral."""
    scale = 0.5 if half else 1.0
    return _levelwise(lambda z, m: scale * (z - m), z_source, source_mean)


def transfer_linear(
    z_source: Sequence[Tensor], source_mean: Sequence[Tensor], target_mean: Sequence[Tensor], alpha: float,
    half: bool = False,
) -> Latents:
    """z_OT = alpha * z_expr + z_MT for every source frame."""
    return _levelwise(lambda e, t: alpha * e + t, expression_vector(z_source, source_mean, half), target_mean)


def transfer_variance(
    z_source: Sequence[Tensor], source_mean: Sequence[Tensor], source_std: Sequence[Tensor],
    target_mean: Sequence[Tensor], target_std: Sequence[Tensor], alpha: float, half: bool = False,
    eps: float = 1e-2,
) -> Latents:
    """z_OT = alpha * z_expr * (sd_T + eps) / (sd_S + eps) + z_MT (see the module docstring)."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    expression = expression_vector(z_source, source_mean, half)
    return _levelwise(
        lambda e, s, t, m: alpha * e * ((t + eps) / (s + eps)) + m, expression, source_std, target_std, target_mean
    )
