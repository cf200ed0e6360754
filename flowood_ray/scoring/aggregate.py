"""Per-video aggregation of frame scores, and the typicality test over a clip's frames.

Rows arrive from distributed scoring in no particular order, so every function here gives the same
result for any permutation of its input rows: rows are first sorted by (video, score), which makes
even the floating-point summation order independent of the arrival order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

AggregationMethod = Literal["mean", "max", "topk", "quantile"]
AGGREGATION_METHODS: tuple[str, ...] = ("mean", "max", "topk", "quantile")


def aggregate_frames(
    video_ids: np.ndarray,
    scores: np.ndarray,
    method: AggregationMethod = "mean",
    *,
    k: int | None = None,
    top_fraction: float = 0.25,
    q: float = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate frame scores to one score per video.

    method: "mean"; "max"; "topk" = mean of the k highest frame scores (`k` frames when given,
    else ceil(`top_fraction` * frames), at least 1, at most all); "quantile" = the `q` quantile
    (linear interpolation, as numpy's default).
    Returns (unique video ids in sorted order, float64 video scores).
    """
    ids = np.asarray(video_ids)
    values = np.asarray(scores, dtype=np.float64)
    if ids.ndim != 1 or values.ndim != 1 or ids.shape != values.shape:
        raise ValueError(f"video_ids and scores must be 1-D of equal length, got {ids.shape} and {values.shape}")
    if method not in AGGREGATION_METHODS:
        raise ValueError(f"unknown aggregation {method!r}; choose from {AGGREGATION_METHODS}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    if np.isnan(values).any():
        # NaN would sort last and silently become every video's max; unscored frames must be dropped upstream.
        raise ValueError(f"{int(np.isnan(values).sum())} frame scores are NaN; drop unscored frames before aggregating")
    if ids.size == 0:
        return ids[:0], values[:0]

    unique_ids, group = np.unique(ids, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((values, group))
    sorted_values = values[order]
    counts = np.bincount(group, minlength=unique_ids.size)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ends = starts + counts

    if method == "mean":
        result = np.add.reduceat(sorted_values, starts) / counts
    elif method == "max":
        result = sorted_values[ends - 1]
    elif method == "topk":
        if k is not None:
            kept = np.minimum(counts, k)
        else:
            kept = np.maximum(1, np.ceil(top_fraction * counts).astype(np.int64))
        # Within a group values ascend, so the top k are the last k rows of the group.
        rank = np.arange(sorted_values.size) - np.repeat(starts, counts)
        in_top = rank >= np.repeat(counts - kept, counts)
        result = np.add.reduceat(np.where(in_top, sorted_values, 0.0), starts) / kept
    else:
        position = q * (counts - 1)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, counts - 1)
        low, high = sorted_values[starts + below], sorted_values[starts + above]
        result = low + (position - below) * (high - low)
    return unique_ids, result.astype(np.float64)


def typicality(frame_nll_per_video: Sequence[np.ndarray] | np.ndarray, train_entropy: float) -> np.ndarray:
    """Typicality test statistic per clip (Nalisnick et al., 2019): |mean frame NLL - train entropy|.

    `frame_nll_per_video` is one 1-D array of frame NLLs per clip (or a 2-D array, one row per clip);
    `train_entropy` is the mean NLL of the model on its real training frames, in the same units.
    A clip is atypical when its frames are either less likely than real footage or more likely than
    real footage ever is, which catches the smooth, over-likely inputs that raw likelihood misses.
    """
    if not math.isfinite(train_entropy):
        raise ValueError(f"train_entropy must be finite, got {train_entropy}")
    clips = [np.asarray(nll, dtype=np.float64).reshape(-1) for nll in frame_nll_per_video]
    empty = [i for i, nll in enumerate(clips) if nll.size == 0]
    if empty:
        raise ValueError(f"clips {empty[:5]} have no frames; typicality needs at least one frame per clip")
    unscored = [i for i, nll in enumerate(clips) if np.isnan(nll).any()]
    if unscored:
        raise ValueError(f"clips {unscored[:5]} have NaN frame NLLs; drop unscored frames first")
    return np.abs(np.array([nll.mean() for nll in clips], dtype=np.float64) - train_entropy)


def typicality_by_video(
    video_ids: np.ndarray, frame_nll: np.ndarray, train_entropy: float
) -> tuple[np.ndarray, np.ndarray]:
    """`typicality` on flat (video_id, frame NLL) rows as the scorers write them; vectorised.

    Returns (unique video ids in sorted order, typicality per video).
    """
    if not math.isfinite(train_entropy):
        raise ValueError(f"train_entropy must be finite, got {train_entropy}")
    unique_ids, mean_nll = aggregate_frames(video_ids, frame_nll, "mean")
    return unique_ids, np.abs(mean_nll - train_entropy)
