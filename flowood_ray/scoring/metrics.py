"""OOD detection metrics, bootstrap confidence intervals and the per-method evaluation table.

Convention (OpenOOD v1.5, stated because its v1 used the opposite): fake = positive class = label 1,
and a higher score means more anomalous. The curves come from scikit-learn; FPR@95TPR and EER are
read off its ROC curve. Bootstrap resamples are evaluated many at once, as integer row weights on one
sort of the scores, with scikit-learn's definitions (tests check the two agree).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike
from sklearn.metrics import auc, average_precision_score, roc_curve

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "eer")
ALL_SUBSET = "all"
UNKNOWN_METHOD = "unknown"
TableLike = pa.Table | Mapping[str, ArrayLike]
MetricFn = Callable[[np.ndarray, np.ndarray], float]
# Resamples x rows per vectorised bootstrap step: bounds each weight matrix to about 32 MB.
_BOOTSTRAP_CHUNK_CELLS = 1 << 22


def _prepare(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {np.unique(y)[:10]}")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN; drop unscored rows before evaluating")
    if not np.isfinite(s).all():
        # An overflowing NLL is a legitimate "very anomalous"; every metric here depends on the order
        # of the scores only, so dense ranks keep them exact while scikit-learn refuses infinities.
        s = np.unique(s, return_inverse=True)[1].reshape(-1).astype(np.float64)
    return y.astype(np.int64), s


def _degenerate_reason(labels: np.ndarray) -> str | None:
    if labels.size == 0:
        return "no samples"
    n_fake = int(labels.sum())
    if n_fake == 0:
        return "no fake samples"
    if n_fake == labels.size:
        return "no real samples"
    return None


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Rate where the false-positive and the false-negative rates meet, interpolated on each ROC curve:
    one per row of (curves, points) arrays."""
    gap = (1.0 - tpr) - fpr  # decreases from 1 at (0, 0) to -1 at (1, 1)
    rows = np.arange(gap.shape[0])
    i = np.argmax(gap <= 0.0, axis=1)
    f0, t0, f1, t1 = fpr[rows, i - 1], tpr[rows, i - 1], fpr[rows, i], tpr[rows, i]
    d_fpr, d_tpr = f1 - f0, t1 - t0
    # gap[i - 1] > 0 >= gap[i], so d_fpr + d_tpr = gap[i - 1] - gap[i] > 0.
    t = (1.0 - t0 - f0) / (d_fpr + d_tpr)
    return np.where(gap[rows, i] == 0.0, f1, f0 + t * d_fpr)


def _metric_values(y: np.ndarray, s: np.ndarray, names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """Named metrics on prepared arrays holding both classes; one ROC curve serves three of them."""
    values: dict[str, float] = {}
    if {"auroc", "fpr_at_95_tpr", "eer"} & set(names):
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        # Same value as roc_auc_score for two classes, without sorting the scores a second time.
        values["auroc"] = float(auc(fpr, tpr))
        # tpr never decreases, so this is the first (lowest-FPR) operating point catching 95% of fakes.
        values["fpr_at_95_tpr"] = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
        values["eer"] = float(_eer(fpr[None], tpr[None])[0])
    if "aupr_in" in names:
        values["aupr_in"] = float(average_precision_score(1 - y, -s))
    if "aupr_out" in names:
        values["aupr_out"] = float(average_precision_score(y, s))
    return {name: values[name] for name in names}


def _weighted_curve_counts(
    positive: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Summed weights of the positives and of the negatives scoring at or above each distinct score,
    highest score first: two (weight vectors, distinct scores) arrays, scikit-learn's binary
    classification curve with sample weights, one row per weight vector."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    run_ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
    ordered = weights[:, order]
    hits = np.cumsum(ordered * positive[order], axis=1)[:, run_ends]
    false_alarms = np.cumsum(ordered * (1 - positive[order]), axis=1)[:, run_ends]
    return hits, false_alarms


def _from_origin(rates: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((rates.shape[0], 1)), rates], axis=1)


def _average_precision(hits: np.ndarray, false_alarms: np.ndarray) -> np.ndarray:
    """Per row, the recall gained at each threshold times the precision there, summed: scikit-learn's
    (uninterpolated) average_precision_score."""
    flagged = hits + false_alarms
    precision = np.divide(hits, flagged, out=np.zeros_like(hits), where=flagged > 0)
    recall_gain = np.diff(hits, axis=1, prepend=0.0) / hits[:, -1:]
    return (recall_gain * precision).sum(axis=1)


def _weighted_metric_values(y: np.ndarray, s: np.ndarray, weights: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """(weight vectors, names) metrics of the rows weighted by each row of `weights` (both classes
    weighted in every row). Integer weights give scikit-learn's values on the rows repeated that often:
    a row of weight 0 only adds an empty step to the curves."""
    columns: dict[str, np.ndarray] = {}
    if {"auroc", "fpr_at_95_tpr", "eer", "aupr_out"} & set(names):
        hits, false_alarms = _weighted_curve_counts(y, s, weights)
        tpr, fpr = _from_origin(hits / hits[:, -1:]), _from_origin(false_alarms / false_alarms[:, -1:])
        columns["auroc"] = (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0).sum(axis=1)
        columns["fpr_at_95_tpr"] = fpr[np.arange(fpr.shape[0]), np.argmax(tpr >= 0.95, axis=1)]
        columns["eer"] = _eer(fpr, tpr)
        columns["aupr_out"] = _average_precision(hits, false_alarms)
    if "aupr_in" in names:
        columns["aupr_in"] = _average_precision(*_weighted_curve_counts(1 - y, -s, weights))
    return np.stack([columns[name] for name in names], axis=1)


def ood_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    """AUROC, AUPR-in (real positive, negated scores), AUPR-out (fake positive), FPR on reals at
    95% TPR on fakes, and EER; plus n_real, n_fake and `reason` (None, or why the metrics are NaN)."""
    y, s = _prepare(labels, scores)
    reason = _degenerate_reason(y)
    values = {name: float("nan") for name in METRIC_NAMES} if reason else _metric_values(y, s)
    return {**values, "n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()), "reason": reason}


def roc_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr) with fake as the positive class; empty arrays when a class is missing."""
    y, s = _prepare(labels, scores)
    if _degenerate_reason(y):
        return np.empty(0), np.empty(0)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def _bootstrap_counts(labels: np.ndarray, groups: ArrayLike | None, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Stratified bootstrap resamples as (resamples, rows) arrays of how often each row is drawn, a chunk
    of resamples at a time: each class keeps its number of groups, drawn with replacement, and a drawn
    group brings all its rows. Without `groups` every row is its own group."""
    group_of = np.arange(labels.size) if groups is None else np.asarray(groups).reshape(-1)
    if group_of.size != labels.size:
        raise ValueError(f"groups and labels differ in length: {group_of.size} vs {labels.size}")
    _, inverse = np.unique(group_of, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    fakes_per_group = np.bincount(inverse, weights=labels)
    if not np.all((fakes_per_group == 0) | (fakes_per_group == counts)):
        # A resampled group must stay on one side of the stratification.
        raise ValueError("each group must hold rows of a single label (a video is either real or fake)")
    n_groups = counts.size
    strata = [np.flatnonzero(fakes_per_group == 0), np.flatnonzero(fakes_per_group > 0)]
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // labels.size)
    for start in range(0, n_boot, per_chunk):
        size = min(per_chunk, n_boot - start)
        # Group g of resample r counts at flat position r * n_groups + g.
        offsets = (np.arange(size) * n_groups)[:, None]
        flat = np.concatenate([(stratum[rng.integers(0, stratum.size, (size, stratum.size))] + offsets).ravel()
                               for stratum in strata if stratum.size])
        drawn = np.bincount(flat, minlength=size * n_groups).reshape(size, n_groups).astype(np.float64)
        yield drawn[:, inverse]


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if np.isnan(values).all():
        return float("nan"), float("nan")
    low, high = np.nanquantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _check_bootstrap_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def bootstrap_cis(
    labels: ArrayLike,
    scores: ArrayLike,
    metrics: Sequence[str] = METRIC_NAMES,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile (1 - alpha) intervals of several named metrics from the same resamples.

    Stratified by class; with `groups` (e.g. video ids for frame-level metrics) whole groups are
    resampled, because frames of one video are not independent and row resampling would give
    intervals that are too narrow. NaN intervals when a class is missing.
    """
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRIC_NAMES}")
    _check_bootstrap_args(n_boot, alpha)
    y, s = _prepare(labels, scores)
    if _degenerate_reason(y):
        return {name: (float("nan"), float("nan")) for name in metrics}
    # A resample's draw counts are integer row weights: scikit-learn's metrics on the repeated rows.
    boot = np.concatenate(
        [_weighted_metric_values(y, s, drawn, metrics) for drawn in _bootstrap_counts(y, groups, n_boot, seed)]
    )
    return {name: _percentile_interval(boot[:, j], alpha) for j, name in enumerate(metrics)}


def bootstrap_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    metric: str | MetricFn,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile (1 - alpha) interval of one metric: a name from METRIC_NAMES or a function
    (labels, scores) -> float. Resampling as in `bootstrap_cis`."""
    if isinstance(metric, str):
        return bootstrap_cis(labels, scores, (metric,), n_boot, alpha, seed, groups)[metric]
    _check_bootstrap_args(n_boot, alpha)
    y, s = _prepare(labels, scores)
    if _degenerate_reason(y):
        return float("nan"), float("nan")
    values = []
    for drawn in _bootstrap_counts(y, groups, n_boot, seed):
        for row_counts in drawn.astype(np.int64):
            rows = np.repeat(np.arange(y.size), row_counts)
            values.append(metric(y[rows], s[rows]))
    boot = np.array(values, dtype=np.float64)
    return _percentile_interval(boot, alpha)


def table_column_names(rows: TableLike) -> list[str]:
    """Column names of an Arrow table or a mapping of arrays."""
    return list(rows.column_names) if isinstance(rows, pa.Table) else list(rows)


def table_columns(rows: TableLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Named columns of an Arrow table or a mapping of arrays as numpy arrays (Arrow nulls become
    NaN in numeric columns and None in string columns)."""
    available = table_column_names(rows)
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"missing columns {missing}; the table has {list(available)}")
    if isinstance(rows, pa.Table):
        return {name: rows.column(name).to_numpy() for name in names}
    return {name: np.asarray(rows[name]) for name in names}


def method_subsets(labels: np.ndarray, methods: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """("all", every row) then one (method, mask) per manipulation method: that method's fakes
    against ALL reals, so each method is judged on the same real data."""
    y = np.asarray(labels)
    fake_methods = np.array([UNKNOWN_METHOD if m is None else str(m) for m in np.asarray(methods, dtype=object)])
    real = y == 0
    subsets = [(ALL_SUBSET, np.ones(y.shape, dtype=bool))]
    for method in sorted(set(fake_methods[y == 1].tolist())):
        subsets.append((method, real | ((y == 1) & (fake_methods == method))))
    return subsets


def evaluate_table(
    rows: TableLike,
    level: str,
    score_names: Sequence[str],
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    group_column: str | None = None,
) -> list[dict[str, Any]]:
    """Metrics with bootstrap intervals for every score, overall and per manipulation method.

    `rows` has columns `label` (0 real, 1 fake, null unknown), `method` and the score columns.
    Rows with an unknown label are left out; rows with a NaN/null score are left out of that
    score only (counted in `n_missing`). Bootstrap groups: `group_column` when given, else
    `video_id` at frame level when the table has it, else rows.
    One dict per (score, subset): level, score, subset, n_real, n_fake, n_missing, bootstrap_unit,
    each metric with `<metric>_lo` / `<metric>_hi`, and `reason` (None, or why metrics are NaN).
    """
    if group_column is None and level == "frame" and "video_id" in table_column_names(rows):
        group_column = "video_id"
    extra = [group_column] if group_column else []
    columns = table_columns(rows, ["label", "method", *score_names, *extra])
    label = columns["label"].astype(np.float64)
    known = ~np.isnan(label)
    if not known.all():
        logger.info("%s level: leaving out %d rows with an unknown label", level, int((~known).sum()))
    y = label[known].astype(np.int64)
    groups = columns[group_column][known] if group_column else None
    subsets = method_subsets(y, columns["method"][known])
    results: list[dict[str, Any]] = []
    for score in score_names:
        values = columns[score][known].astype(np.float64)
        for subset, mask in subsets:
            scored = mask & ~np.isnan(values)
            sub_y, sub_s = y[scored], values[scored]
            sub_groups = groups[scored] if groups is not None else None
            point = ood_metrics(sub_y, sub_s)
            intervals = bootstrap_cis(sub_y, sub_s, METRIC_NAMES, n_boot, alpha, seed, sub_groups)
            row: dict[str, Any] = {
                "level": level,
                "score": score,
                "subset": subset,
                "n_real": point["n_real"],
                "n_fake": point["n_fake"],
                "n_missing": int((mask & np.isnan(values)).sum()),
                "bootstrap_unit": group_column or "row",
            }
            for name in METRIC_NAMES:
                row[name] = point[name]
                row[f"{name}_lo"], row[f"{name}_hi"] = intervals[name]
            row["reason"] = point["reason"]
            if point["reason"]:
                logger.warning(
                    "%s level, score %r, subset %r: metrics are NaN (%s)", level, score, subset, point["reason"]
                )
            results.append(row)
    logger.info("evaluated %d score(s) at %s level: %d rows", len(score_names), level, len(results))
    return results
