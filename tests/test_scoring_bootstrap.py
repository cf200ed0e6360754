"""The vectorised bootstrap gives scikit-learn's metrics on every resample, and is fast enough for reports."""

from __future__ import annotations

import time

import numpy as np
import pytest

from flowood_ray.scoring.metrics import METRIC_NAMES, _bootstrap_counts, _metric_values, bootstrap_cis


def _scored(n_real: int, n_fake: int, seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_real, dtype=np.int64), np.ones(n_fake, dtype=np.int64)]
    scores = np.r_[rng.normal(size=n_real), rng.normal(0.8, 1.0, size=n_fake)]
    if ties:
        # Coarse scores tie across classes, where the ROC and precision-recall steps are easiest to get wrong.
        scores = np.round(scores * 2) / 2
    return labels, scores


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.nanquantile(values, [0.025, 0.975])
    return float(low), float(high)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_intervals_equal_scikit_learn_on_the_same_resamples(ties: bool, grouped: bool) -> None:
    # Catches a weighted curve that differs from scikit-learn's on repeated rows: a tie split into two
    # steps, precision taken before the threshold's rows are counted, AUPR-in without the reversed
    # order, the 95% TPR point one step late, or EER interpolated on the wrong segment.
    labels, scores = _scored(30, 18, seed=3, ties=ties)
    groups = np.repeat(np.arange(labels.size // 3), 3) if grouped else None
    resamples = [np.repeat(np.arange(labels.size), row) for drawn in _bootstrap_counts(labels, groups, 60, 5)
                 for row in drawn.astype(np.int64)]
    reference = np.array([list(_metric_values(labels[rows], scores[rows]).values()) for rows in resamples])
    intervals = bootstrap_cis(labels, scores, METRIC_NAMES, n_boot=60, seed=5, groups=groups)
    for j, name in enumerate(METRIC_NAMES):
        assert intervals[name] == pytest.approx(_interval(reference[:, j]), abs=1e-12), name


def test_resamples_keep_each_class_size_and_whole_groups() -> None:
    # Catches resampling that mixes the classes (a resample with fewer fakes than the data), splits a video
    # between draws, or draws every resample alike; and chunks that repeat or drop resamples.
    labels = np.repeat([0, 0, 0, 1, 1], [3, 2, 4, 1, 5])  # groups of 3, 2, 4 reals and of 1, 5 fakes
    groups = np.repeat(["a", "b", "c", "d", "e"], [3, 2, 4, 1, 5])
    drawn = np.concatenate(list(_bootstrap_counts(labels, groups, 500, seed=1)))
    assert drawn.shape == (500, labels.size)
    per_group = {g: drawn[:, groups == g] for g in "abcde"}
    for g, counts in per_group.items():
        assert (counts == counts[:, :1]).all(), g
    real_groups = sum(per_group[g][:, 0] for g in "abc")
    fake_groups = sum(per_group[g][:, 0] for g in "de")
    assert (real_groups == 3).all() and (fake_groups == 2).all()
    # Each real group is drawn once per resample on average, and 500 resamples meet every possible one:
    # 3 real groups drawn 3 times make C(5, 3) = 10 multisets, 2 fake groups drawn twice C(3, 2) = 3.
    assert per_group["a"][:, 0].mean() == pytest.approx(1.0, abs=0.15)
    assert len({tuple(row) for row in drawn}) == 10 * 3


def test_infinite_scores_resample_like_their_ranks() -> None:
    # Catches the vectorised path sorting raw infinities differently from the dense ranks the point
    # estimates use (an overflowing NLL must stay the most anomalous score).
    labels, scores = _scored(20, 20, seed=4, ties=False)
    scores[[0, 25]] = np.inf
    ranks = np.unique(scores, return_inverse=True)[1].astype(np.float64)
    assert bootstrap_cis(labels, scores, n_boot=40) == bootstrap_cis(labels, ranks, n_boot=40)


def test_a_subset_of_metrics_matches_the_full_set() -> None:
    # Catches metrics read from the wrong column when only some are asked for.
    labels, scores = _scored(25, 25, seed=6, ties=True)
    full = bootstrap_cis(labels, scores, n_boot=30)
    assert bootstrap_cis(labels, scores, ("eer", "aupr_in"), n_boot=30) == {k: full[k] for k in ("eer", "aupr_in")}


def test_many_resamples_of_a_frame_table_take_well_under_a_second() -> None:
    # Catches a return to one scikit-learn call per resample: 9 s against 0.3 s vectorised, measured on two
    # cores shared with other jobs (load average 16).
    labels, scores = _scored(600, 600, seed=7, ties=False)
    groups = np.repeat(np.arange(labels.size // 24), 24)
    started = time.perf_counter()
    bootstrap_cis(labels, scores, n_boot=200, groups=groups)
    assert time.perf_counter() - started < 1.0
