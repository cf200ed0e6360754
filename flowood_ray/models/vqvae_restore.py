"""Latent restoration with the PixelSNAIL prior of the VQ-VAE family (Marimont & Tarroni 2021).

:func:`restore` resamples chosen (or unlikely) codes from the prior conditioned on the rest, in raster
order (up to one prior pass per position); :func:`restore_parallel` is its one-pass approximation that
judges and redraws every code given the original codes before it. The pixel-wise score
(scoring/restoration.py) decodes several restorations and weighs the residuals.

Codes are (N, h, w) int64 tensors; NLLs are in nats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from flowood_ray.models.randomness import draw

if TYPE_CHECKING:
    from flowood_ray.models.vqvae import PixelSNAIL


def _sample_inverse_cdf(logits: Tensor, uniforms: Tensor, temperature: float) -> Tensor:
    """Categorical draw by inverting the CDF of softmax(logits / T) at the given uniforms (float64)."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    return (cdf < uniforms[:, None]).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


def _eligible_positions(prior: PixelSNAIL, codes: Tensor, mask: Tensor | None) -> Tensor:
    """The checked (N, h, w) bool mask of positions a restoration may change (None: all of them)."""
    if prior.training:
        raise ValueError("call prior.eval() before restore: dropout would randomise the restorations")
    if codes.dim() != 3:
        raise ValueError(f"expected codes (N, h, w), got {tuple(codes.shape)}")
    if mask is None:
        return torch.ones_like(codes, dtype=torch.bool)
    if mask.shape != codes.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match codes {tuple(codes.shape)}")
    return mask


@torch.no_grad()
def restore(
    prior: PixelSNAIL,
    codes: Tensor,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    n_samples: int = 1,
    *,
    threshold: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Resample codes from the prior, in raster order, conditioned on everything before them.

    codes (N, h, w); mask (N, h, w) bool marks the eligible positions (None: all). An eligible position
    is resampled if ``threshold`` is None, or if its NLL under the *current* (partly restored) context
    exceeds ``threshold`` nats (Marimont & Tarroni's restoration with lambda_p). Returns
    (N, n_samples, h, w); positions that are not eligible are never changed.

    Cost. Positions are visited in raster order and position i depends only on positions < i, so a
    replica whose codes have not changed yet still has the logits of the initial forward pass. One
    forward on the unmodified maps therefore serves every replica until it first changes a code; after
    that, a replica needs a fresh forward only at the eligible positions it visits later, and that
    forward takes the map cropped to the rows up to the current one. All replicas that need a
    position are batched into one call: at most one prior forward per distinct eligible raster
    position (the first such position needs none beyond the initial pass), instead of one full
    forward per position of the map.

    Randomness. One uniform per (replica, position) is drawn up front as
    ``torch.rand((N * n_samples, h * w), generator=generator, dtype=torch.float64)`` (replica j of
    image i is row ``i * n_samples + j``) and a code is drawn by inverting the CDF of
    ``softmax(logits / temperature)`` at its uniform, so the result depends only on the seed, not on
    which forwards could be skipped. ``prior`` must be in eval mode.
    """
    mask = _eligible_positions(prior, codes, mask)
    n, h, w = codes.shape
    length = h * w
    current = codes.repeat_interleave(n_samples, dim=0).contiguous()
    flat = current.view(-1, length)
    eligible = mask.repeat_interleave(n_samples, dim=0).reshape(-1, length)
    uniforms = draw(torch.rand, flat.shape, generator, codes.device, torch.float64)
    initial_logits = prior(codes).flatten(2)  # (N, K, h*w)
    changed = torch.zeros(flat.shape[0], dtype=torch.bool, device=codes.device)

    for position in range(length):
        rows = torch.nonzero(eligible[:, position]).flatten()
        if rows.numel() == 0:
            continue
        logits = initial_logits[rows // n_samples, :, position]
        stale = changed[rows]
        if bool(stale.any()):
            row, col = divmod(position, w)
            fresh = prior(current[rows[stale], : row + 1])
            logits = logits.clone()
            logits[stale] = fresh[:, :, row, col].to(logits.dtype)
        old = flat[rows, position]
        take = torch.ones_like(old, dtype=torch.bool)
        if threshold is not None:
            take = F.cross_entropy(logits, old, reduction="none") > threshold
        new = torch.where(take, _sample_inverse_cdf(logits, uniforms[rows, position], temperature), old)
        differs = new != old
        flat[rows[differs], position] = new[differs]
        changed[rows[differs]] = True
    return current.view(n, n_samples, h, w)


@torch.no_grad()
def restore_parallel(
    prior: PixelSNAIL,
    codes: Tensor,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    n_samples: int = 1,
    *,
    threshold: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """One-pass approximation of :func:`restore`, with the same arguments, randomness and output.

    One teacher-forced prior forward over the original codes gives every position's distribution
    given the original codes before it. An eligible position is resampled if ``threshold`` is None
    or if its NLL there (``prior.nll_map(codes)``, the map the sample score thresholds) exceeds
    ``threshold``, and all resampled positions of all ``n_samples`` replicas are drawn at once from
    those distributions, with the uniforms ``restore`` would use.

    What is approximated: in :func:`restore` a redrawn code becomes context for every later position,
    both for its distribution and for the threshold test. Here it does not, so neighbouring redrawn
    codes are drawn independently of each other, and the codes judged unlikely are exactly those the
    original context makes unlikely. Per replica and from the same generator state, the two agree on
    every position up to and including the first one above ``threshold``, and entirely when that is
    the only code above it in either context (when it is the last position, say).
    """
    mask = _eligible_positions(prior, codes, mask)
    n, h, w = codes.shape
    flat = codes.reshape(n, h * w)
    uniforms = draw(torch.rand, (n * n_samples, h * w), generator, codes.device, torch.float64)
    raw_logits = prior(codes)  # (N, K, h, w): position i given the original codes before it
    take = mask
    if threshold is not None:
        # Computed as prior.nll_map computes it, so exactly the codes the sample score counts are redrawn.
        take = take & (F.cross_entropy(raw_logits, codes, reduction="none") > threshold)
    logits = raw_logits.flatten(2).transpose(1, 2)  # (N, h*w, K)
    image, position = torch.nonzero(take.reshape(n, h * w), as_tuple=True)
    chosen = logits[image, position]  # (M, K)
    replica_uniforms = uniforms.view(n, n_samples, h * w)[image, :, position]  # (M, n_samples)
    drawn = _sample_inverse_cdf(
        chosen.repeat_interleave(n_samples, dim=0), replica_uniforms.reshape(-1), temperature
    ).view(-1, n_samples)
    restored = flat[:, None].repeat(1, n_samples, 1)
    restored[image, :, position] = drawn
    return restored.view(n, n_samples, h, w)
