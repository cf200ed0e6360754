"""Pixel-level localization metrics: pixel AUROC and AUPRO of anomaly maps against ground-truth masks.

Conventions of metrics.py: a manipulated (fake) pixel is the positive class, mask value 1, and a
higher map value means more anomalous. Both metrics pool the pixels of all images, as the MVTec AD
evaluation (Bergmann et al., IJCV 2021) and anomalib do, rather than averaging per-image values.

Both depend on the order of the map values only, so +-inf are legitimate extreme scores (as in
metrics.py) and ties are thresholded together: one curve point per distinct map value, exactly what
sweeping every threshold gives. Cost: one O(P log P) sort of the P = N*H*W map values per call (the
time of scikit-learn's roc_auc_score, about 11 s for 10 million float32 pixels on two busy cores)
and about 55 bytes per pixel at the peak (sort order, float64 cumulative sums, one curve point per
distinct value): 50 million pixels take about 3 GB. Float maps keep their dtype: float32 stays float32.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import auc

from flowood_ray.scoring.metrics import _degenerate_reason, method_subsets

logger = logging.getLogger(__name__)

REAL_METHOD = "real"
# 8-connectivity inside each image and none along the image axis, so one call labels every image
# separately (the MVTec AD reference and cv2.connectedComponents both use 8-connectivity).
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


def _validated(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Masks as bool and maps as floats, both (N, H, W) of one shape."""
    truth, scores = np.asarray(masks), np.asarray(maps)
    if truth.ndim != 3 or truth.shape != scores.shape:
        raise ValueError(f"masks and maps must be (N, H, W) arrays of one shape, got {truth.shape} and {scores.shape}")
    if truth.dtype != np.bool_:
        if not ((truth == 0) | (truth == 1)).all():
            raise ValueError(f"masks must be binary (bool or 0/1), got values {np.unique(truth)[:10]}")
        truth = truth != 0
    if scores.dtype.kind in "biu":
        scores = scores.astype(np.float32)
    elif scores.dtype.kind != "f":
        raise ValueError(f"maps must hold real numbers, got dtype {scores.dtype}")
    n_nan = int(np.isnan(scores).sum())
    if n_nan:
        raise ValueError(f"{n_nan} map values are NaN; every pixel needs a score")
    return truth, scores


def _require_both_classes(truth: np.ndarray) -> None:
    reason = _degenerate_reason(truth.reshape(-1))
    if reason:
        raise ValueError(f"pixel metrics need mask-1 and mask-0 pixels; these {truth.size} pixels have {reason}")


def _check_max_fpr(max_fpr: float) -> None:
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")


def _thresholds(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel order by decreasing score, and for each distinct score the position (in that order) of
    its last pixel: the threshold at that score flags every pixel up to there."""
    flat = scores.reshape(-1)
    order = np.argsort(flat)[::-1]
    ranked = flat[order]
    run_ends = np.empty(ranked.size, dtype=bool)
    # `!=` rather than np.diff, whose inf - inf = NaN would split tied infinite scores.
    np.not_equal(ranked[1:], ranked[:-1], out=run_ends[:-1])
    run_ends[-1] = True
    return order, np.flatnonzero(run_ends)


def _flagged_share(order: np.ndarray, last_of_run: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Share of the total pixel weight at or above each threshold, preceded by 0 (nothing flagged)."""
    cumulative = np.cumsum(weights.reshape(-1)[order], dtype=np.float64)
    share = np.empty(last_of_run.size + 1)
    share[0] = 0.0
    np.take(cumulative, last_of_run, out=share[1:])
    share[1:] /= share[-1]
    return share


def _region_weights(truth: np.ndarray) -> np.ndarray:
    """1 / (region size * number of regions) on each mask pixel, 0 elsewhere: summed over the flagged
    pixels it is the mean over all regions of all images of the flagged fraction of the region."""
    regions, n_regions = ndimage.label(truth, structure=_EIGHT_CONNECTED_PER_IMAGE)
    sizes = np.bincount(regions.reshape(-1))
    weight_of_region = np.zeros(n_regions + 1)
    weight_of_region[1:] = 1.0 / (sizes[1:] * n_regions)
    return weight_of_region[regions]


def _auroc_from_order(truth: np.ndarray, order: np.ndarray, last_of_run: np.ndarray) -> float:
    tpr = _flagged_share(order, last_of_run, truth)
    fpr = _flagged_share(order, last_of_run, ~truth)
    return float(auc(fpr, tpr))


def _aupro_from_order(truth: np.ndarray, order: np.ndarray, last_of_run: np.ndarray, max_fpr: float) -> float:
    fpr = _flagged_share(order, last_of_run, ~truth)
    pro = _flagged_share(order, last_of_run, _region_weights(truth))
    # Points with FPR <= max_fpr; fpr[0] = 0 so there is at least one.
    inside = int(np.searchsorted(fpr, max_fpr, side="right"))
    fpr_kept, pro_kept = fpr[:inside], pro[:inside]
    if inside < fpr.size:
        # The curve is linear between thresholds (as in the reference), so cut its crossing segment.
        before, after = inside - 1, inside
        step = (max_fpr - fpr[before]) / (fpr[after] - fpr[before])
        fpr_kept = np.append(fpr_kept, max_fpr)
        pro_kept = np.append(pro_kept, pro[before] + step * (pro[after] - pro[before]))
    # Normalised so that a perfect map scores 1 whatever max_fpr is.
    return float(auc(fpr_kept, pro_kept) / max_fpr)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC over all pixels of all images together. masks: (N, H, W) bool or 0/1; maps: (N, H, W)
    anomaly maps, higher = more anomalous. Tied scores count one half, as in scikit-learn."""
    truth, scores = _validated(masks, maps)
    _require_both_classes(truth)
    return _auroc_from_order(truth, *_thresholds(scores))


def aupro(masks: ArrayLike, maps: ArrayLike, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `max_fpr`, divided by `max_fpr` (Bergmann et al.).

    Regions are the 8-connected components of each image's mask. At a threshold, PRO is the mean
    over all regions of all images of the fraction of the region at or above it, and FPR the
    fraction of all mask-0 pixels at or above it. The curve has one point per distinct map value
    (no threshold grid), starts at (0, 0), is integrated with the trapezoid rule and interpolated
    linearly at exactly `max_fpr`. A region is weighted equally whatever its size.
    """
    _check_max_fpr(max_fpr)
    truth, scores = _validated(masks, maps)
    _require_both_classes(truth)
    return _aupro_from_order(truth, *_thresholds(scores), max_fpr)


def localization_table(
    masks: ArrayLike, maps: ArrayLike, methods: ArrayLike, max_fpr: float = 0.3
) -> dict[str, dict[str, Any]]:
    """{subset: {"pixel_auroc", "aupro", "images", "reason"}} for "all" and each fake method.

    `methods` labels each image: "real" for real images (whose masks must be empty), else the
    manipulation method. A method's subset is its fakes plus ALL real images, as anomalib keeps the
    normal test images in its pixel metrics: their pixels are negatives that can raise false
    positives. A subset without mask-1 (or mask-0) pixels gets NaN metrics and a `reason`, as
    metrics.evaluate_table does, so one empty method does not sink the table.
    """
    _check_max_fpr(max_fpr)
    truth, scores = _validated(masks, maps)
    method_of = np.asarray(methods, dtype=object).reshape(-1)
    if method_of.size != truth.shape[0]:
        raise ValueError(f"{method_of.size} method labels for {truth.shape[0]} images")
    is_fake = method_of != REAL_METHOD
    marked_reals = np.flatnonzero(~is_fake & truth.any(axis=(1, 2)))
    if marked_reals.size:
        raise ValueError(f"images labelled {REAL_METHOD!r} must have empty masks; images {marked_reals[:10]} do not")
    table: dict[str, dict[str, Any]] = {}
    for subset, chosen in method_subsets(is_fake.astype(np.int64), method_of):
        sub_truth = truth[chosen]
        reason = _degenerate_reason(sub_truth.reshape(-1))
        if reason:
            logger.warning("localization subset %r: metrics are NaN (%s among its pixels)", subset, reason)
            values = (float("nan"), float("nan"))
        else:
            # One sort serves both metrics.
            order, last_of_run = _thresholds(scores[chosen])
            values = (
                _auroc_from_order(sub_truth, order, last_of_run),
                _aupro_from_order(sub_truth, order, last_of_run, max_fpr),
            )
        table[subset] = {"pixel_auroc": values[0], "aupro": values[1], "images": int(chosen.sum()), "reason": reason}
    return table
