"""Pixel-level anomaly maps by latent restoration (Marimont & Tarroni 2021, as in document 002).

For each crop x:

1. encode x to its code map with the VQ-VAE;
2. draw ``S`` restorations of that map: every code whose NLL under the PixelSNAIL prior exceeds
   ``lambda_p`` nats is replaced by a draw from the prior (``mode``, below, says given which context);
3. decode every restoration y_j and take its residual map ``r_j = sum_channels |y_j - x|``;
4. weigh the restorations with ``w_j = softmax_j(k / sum_pixels r_j)``, so the restorations that stay
   closest to the input count most (a restoration that drifted far from x is discounted), and take
   ``sum_j w_j r_j``;
5. smooth: a 3x3 min-pool (an isolated bright pixel is noise, a region is not) then a 7x7 mean pool.

Units: x is in the [-0.5, 0.5) space of :func:`flowood_ray.models.glow.preprocess`, so a map value is an
L1 distance summed over channels (at most C while the decoder's output stays in that range).

Padding of the pools: replicate. For the min-pool that equals ignoring the missing neighbours; for the
mean pool it keeps a border pixel an average of real values, where zero padding
(``count_include_pad=True``, the reference code's default) would pull the map down along the border
of every crop.

Weighting constant k: the document's formula divides k by the *total* L1 distance; the reference code
divides k = 3 by the *mean* distance per element. ``k=None`` uses ``3 * C * H * W``, which makes the two
identical, so the default behaves the same at every crop size.

Modes, fidelity against cost:

* ``"parallel"``, the default of scoring, the report and Serve
  (:func:`~flowood_ray.models.vqvae_restore.restore_parallel`). One teacher-forced prior pass over the original
  codes gives each position's distribution given the original codes before it; every position whose
  NLL there exceeds lambda_p (the positions the sample score counts) is redrawn from that
  distribution, all at once, and the S restorations are S independent draws from the same
  distributions. A redrawn code does not condition the later ones.
* ``"autoregressive"``: :func:`~flowood_ray.models.vqvae_restore.restore`, the reference's exact procedure. In
  raster order each code is judged and redrawn given the codes already restored before it, so a
  restored region is drawn as one coherent sample, and a code that was unlikely only next to an
  anomalous neighbour is kept once that neighbour is restored (while others may become unlikely and be
  redrawn in turn). It needs a prior pass at every position after a replica's first change.

The two agree up to and including each replica's first code above lambda_p; they differ where codes
above lambda_p follow one another, and there the independently drawn parallel codes fit each other less
well. On the ramp toy of tests/test_scoring_restoration.py (16 crops with a pasted patch) the parallel
map was higher inside the patch (0.43 against 0.40) and also far from it (0.12 against 0.07): it still
localises, with less contrast (3.5 against 5.9 inside/far). Cost per 64 px crop on this project's shared
2-core CPU (1 torch thread, load average about 6; bench/restoration.py: the demo's VQ-VAE and prior,
16x16 codes, 5 restorations, lambda_p at the 90th NLL percentile): parallel 0.04 s (1 prior pass),
autoregressive 11.8 s (222 passes; an earlier measurement with the full-size default models: 22 s).

Batch independence: the restorers draw one uniform per (replica, position) for the whole batch from a
single generator, so a crop's draws would depend on its index in the batch. With
``batch_independent=True`` every crop gets its own generator, seeded from one base seed (drawn from
``generator``) and a hash of the crop's bytes, and is restored by its own call; encoding and decoding are
per crop as well, so a crop's map is bitwise the same alone, inside any batch and in any order. For the
autoregressive mode, one batched call over 3 crops took 85 passes per crop but longer per crop than
per-crop calls, because the prior forwards are compute-bound already at 5 rows.

Nothing here mutates the models (no hooks, no buffers), so maps may be computed while other threads
run the same modules, e.g. a server scoring requests with the same prior.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flowood_ray.models.vqvae import VQVAE, PixelSNAIL
from flowood_ray.models.vqvae_restore import restore, restore_parallel

ImageScore = Literal["mean", "top"]
RestorationMode = Literal["parallel", "autoregressive"]

# Reference code (lsr_mood_challenge_2020): softmax temperature 3 on the *mean* L1 distance.
REFERENCE_K_PER_ELEMENT = 3.0


@dataclass(frozen=True)
class RestorationResult:
    """Output of :func:`restoration_map`; every tensor is on the input's device."""

    pixel_map: Tensor  # (N, H, W) float: smoothed, weighted residual; higher = more anomalous
    image_score: Tensor  # (N,) float: reduction of pixel_map (see ``score``)
    resampled_fraction: Tensor  # (N,) float: share of (restoration, code position) pairs changed
    codes: Tensor  # (N, h, w) int64: code map of each crop
    restored_codes: Tensor  # (N, S, h, w) int64: the S restorations of each code map
    weights: Tensor  # (N, S) float: w_j of each restoration
    restorations: Tensor | None = None  # (N, S, C, H, W) decoded restorations when keep_restorations


def restoration_weights(distances: Tensor, k: float) -> Tensor:
    """w_j = softmax_j(k / distance_j) for distances (N, S) of each restoration to its input.

    Computed in float64 with distances clamped away from 0: a perfect restoration would otherwise give
    k / 0 = inf and a NaN softmax when several restorations are perfect.
    """
    return torch.softmax(k / distances.double().clamp_min(1e-12), dim=1).to(distances.dtype)


def weighted_residual_map(images: Tensor, restorations: Tensor, k: float | None = None) -> tuple[Tensor, Tensor]:
    """images (N, C, H, W), restorations (N, S, C, H, W) -> (unsmoothed map (N, H, W), weights (N, S))."""
    residuals = (restorations - images[:, None]).abs().sum(dim=2)  # (N, S, H, W)
    if k is None:
        k = REFERENCE_K_PER_ELEMENT * images[0].numel()
    weights = restoration_weights(residuals.flatten(2).sum(dim=2), k)
    return (weights[:, :, None, None] * residuals).sum(dim=1), weights


def smooth_map(pixel_map: Tensor, min_kernel: int = 3, mean_kernel: int = 7) -> Tensor:
    """(N, H, W) -> (N, H, W): min-pool then mean-pool, stride 1, replicate padding (module docstring)."""

    def replicate(x: Tensor, kernel: int) -> Tensor:
        half = kernel // 2
        return F.pad(x, [half, half, half, half], mode="replicate")

    x = pixel_map[:, None]
    x = -F.max_pool2d(-replicate(x, min_kernel), min_kernel, stride=1)
    x = F.avg_pool2d(replicate(x, mean_kernel), mean_kernel, stride=1)
    return x[:, 0]


def image_scores(pixel_map: Tensor, score: ImageScore = "top", top_fraction: float = 0.01) -> Tensor:
    """(N, H, W) -> (N,): the map's mean, or the mean of its ``top_fraction`` largest values.

    The top-fraction score stays sensitive to an anomaly covering a small part of the crop (a pasted
    mouth, a blending seam), which the plain mean dilutes by the crop's area.
    """
    flat = pixel_map.flatten(1)
    if score == "mean":
        return flat.mean(dim=1)
    if score == "top":
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        count = max(1, math.ceil(top_fraction * flat.shape[1]))
        return flat.topk(count, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score {score!r}")


def prior_passes_used(codes: Tensor, restored_codes: Tensor, batch_independent: bool = True) -> int:
    """Prior forwards that :func:`restore` (``mode="autoregressive"``) makes with ``mask=None`` and a
    threshold, from its output.

    ``restore`` makes one initial forward, then one batched forward at every raster position after the
    first position where any replica of its call changed a code (every position is eligible, and a
    replica with a changed code needs fresh logits). That is at most h*w per call, against
    S*h*w for one forward per position per restoration. ``batch_independent`` says whether each crop had
    its own call (as :func:`restoration_map` does then) or the batch shared one. The parallel mode makes
    exactly one forward per call.
    """
    n, s, h, w = restored_codes.shape
    changed = (restored_codes != codes[:, None]).reshape(n, s, h * w).any(dim=1)  # (N, h*w)
    groups = changed if batch_independent else changed.any(dim=0, keepdim=True)
    passes = 0
    for row in groups:
        positions = torch.nonzero(row).flatten()
        passes += 1 + (h * w - 1 - int(positions[0]) if positions.numel() else 0)
    return passes


def _weigh_restorations(
    vqvae: VQVAE, images: Tensor, restored_codes: Tensor, k: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode restorations (N, S, h, w) -> (restorations (N, S, C, H, W), raw map (N, H, W), weights (N, S))."""
    n, s, h, w = restored_codes.shape
    restorations = vqvae.decode_codes(restored_codes.reshape(n * s, h, w)).view(n, s, *images.shape[1:])
    raw_map, weights = weighted_residual_map(images, restorations, k)
    return restorations, raw_map, weights


def _crop_seed(base_seed: int, crop: Tensor) -> int:
    """A 63-bit seed from the base seed and the crop's bytes: the same crop always gets the same draws."""
    digest = hashlib.blake2b(base_seed.to_bytes(8, "little"), digest_size=8)
    digest.update(crop.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


@torch.no_grad()
def restoration_map(
    vqvae: VQVAE,
    prior: PixelSNAIL,
    images: Tensor,
    lambda_p: float,
    n_restorations: int = 5,
    k: float | None = None,
    generator: torch.Generator | None = None,
    batch_independent: bool = True,
    *,
    mode: RestorationMode = "parallel",
    temperature: float = 1.0,
    score: ImageScore = "top",
    top_fraction: float = 0.01,
    keep_restorations: bool = False,
) -> RestorationResult:
    """Restoration anomaly map of float images (N, C, H, W) from ``preprocess(..., "center")``.

    ``lambda_p``: NLL threshold in nats above which a code is resampled (the reference uses about the
    90th percentile of real codes' NLL; +inf restores nothing and the map is the pooled reconstruction
    residual). ``k``: softmax temperature of the restoration weights on the total L1 distance (None:
    the reference's k=3 on the mean distance, see the module docstring). ``generator`` seeds the
    restorations: with ``batch_independent`` one base seed is drawn from it per call and each crop's
    generator derives from that and the crop's bytes; otherwise the whole batch shares it in one
    restorer call (fewer, larger prior passes, which can pay on an accelerator, but a crop's map then
    depends on the rest of the batch). ``mode``: ``"parallel"`` (one prior pass per restorer call) or
    ``"autoregressive"`` (exact, up to one pass per code position); see the module docstring. Both
    models must be in eval mode (the restorers check the prior).
    """
    if images.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    if n_restorations < 1:
        raise ValueError(f"n_restorations must be >= 1, got {n_restorations}")
    if mode not in ("parallel", "autoregressive"):
        raise ValueError(f"mode must be 'parallel' or 'autoregressive', got {mode!r}")
    resample = restore_parallel if mode == "parallel" else restore

    def restored(codes: Tensor, crop_generator: torch.Generator | None) -> Tensor:
        return resample(prior, codes, None, crop_generator, n_restorations, threshold=lambda_p, temperature=temperature)

    if batch_independent:
        seed_device = generator.device if generator is not None else torch.device("cpu")
        base_seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=seed_device))
        codes_list, restored_list = [], []
        for crop in images.split(1):
            crop_generator = torch.Generator(device=images.device).manual_seed(_crop_seed(base_seed, crop))
            crop_codes = vqvae.encode(crop)
            codes_list.append(crop_codes)
            restored_list.append(restored(crop_codes, crop_generator))
        codes, restored_codes = torch.cat(codes_list), torch.cat(restored_list)
    else:
        codes = vqvae.encode(images)
        restored_codes = restored(codes, generator)

    # Per crop, decoding and pooling keep their float results independent of the batch's size too.
    chunks = zip(images.split(1), restored_codes.split(1)) if batch_independent else [(images, restored_codes)]
    restorations, raw_maps, weights = zip(*(_weigh_restorations(vqvae, x, r, k) for x, r in chunks), strict=True)
    pixel_map = torch.cat([smooth_map(raw) for raw in raw_maps])
    return RestorationResult(
        pixel_map=pixel_map,
        image_score=image_scores(pixel_map, score, top_fraction),
        resampled_fraction=(restored_codes != codes[:, None]).flatten(1).float().mean(dim=1),
        codes=codes,
        restored_codes=restored_codes,
        weights=torch.cat(weights),
        restorations=torch.cat(restorations) if keep_restorations else None,
    )
