"""OOD detection metrics, bootstrap confidence intervals and the per-method evaluation table.

Convention (OpenOOD v1.5, stated because its v1 used the opposite): fake = positive class = label 1,
and a higher score means more anomalous. The curves come from scikit-learn; FPR@95TPR and EER are
read off its ROC curve.
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


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Rate where the false-positive and the false-negative rates meet, interpolated on the ROC curve."""
    gap = (1.0 - tpr) - fpr  # decreases from 1 at (0, 0) to -1 at (1, 1)
    i = int(np.argmax(gap <= 0.0))
    if gap[i] == 0.0:
        return float(fpr[i])
    d_fpr, d_tpr = fpr[i] - fpr[i - 1], tpr[i] - tpr[i - 1]
    t = (1.0 - tpr[i - 1] - fpr[i - 1]) / (d_fpr + d_tpr)
    return float(fpr[i - 1] + t * d_fpr)


def _metric_values(y: np.ndarray, s: np.ndarray, names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """Named metrics on prepared arrays holding both classes; one ROC curve serves three of them."""
    values: dict[str, float] = {}
    if {"auroc", "fpr_at_95_tpr", "eer"} & set(names):
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        # Same value as roc_auc_score for two classes, without sorting the scores a second time.
        values["auroc"] = float(auc(fpr, tpr))
        # tpr never decreases, so this is the first (lowest-FPR) operating point catching 95% of fakes.
        values["fpr_at_95_tpr"] = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
        values["eer"] = _eer(fpr, tpr)
    if "aupr_in" in names:
        values["aupr_in"] = float(average_precision_score(1 - y, -s))
    if "aupr_out" in names:
        values["aupr_out"] = float(average_precision_score(y, s))
    return {name: values[name] for name in names}


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


def _bootstrap_samples(
    labels: np.ndarray, groups: ArrayLike | None, n_boot: int, seed: int
) -> Iterator[np.ndarray]:
    """Row indices of stratified bootstrap resamples: each class keeps its size in groups drawn
    with replacement. Without `groups` every row is its own group."""
    group_of = np.arange(labels.size) if groups is None else np.asarray(groups).reshape(-1)
    if group_of.size != labels.size:
        raise ValueError(f"groups and labels differ in length: {group_of.size} vs {labels.size}")
    _, inverse = np.unique(group_of, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    group_label = labels[order[starts]]
    fakes_per_group = np.bincount(inverse, weights=labels)
    if not np.all((fakes_per_group == 0) | (fakes_per_group == counts)):
        # A resampled group must stay on one side of the stratification.
        raise ValueError("each group must hold rows of a single label (a video is either real or fake)")
    strata = [np.flatnonzero(group_label == 0), np.flatnonzero(group_label == 1)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        chosen = np.concatenate([rng.choice(stratum, size=stratum.size, replace=True) for stratum in strata])
        sizes = counts[chosen]
        # Row positions of the chosen groups, concatenated without a Python loop over groups.
        first_row = np.repeat(starts[chosen] - (np.cumsum(sizes) - sizes), sizes)
        yield order[first_row + np.arange(sizes.sum())]


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
    boot = np.array(
        [list(_metric_values(y[i], s[i], metrics).values()) for i in _bootstrap_samples(y, groups, n_boot, seed)]
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
    boot = np.array([metric(y[i], s[i]) for i in _bootstrap_samples(y, groups, n_boot, seed)], dtype=np.float64)
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
