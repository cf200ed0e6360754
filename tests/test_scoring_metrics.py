"""OOD metrics against known values, bootstrap intervals, and the per-method evaluation table."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from flowood_ray.scoring.metrics import METRIC_NAMES, bootstrap_ci, bootstrap_cis, evaluate_table, ood_metrics


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _two_classes(n_real: int, n_fake: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_real, dtype=int), np.ones(n_fake, dtype=int)]
    return labels, np.r_[rng.normal(size=n_real), rng.normal(shift, 1.0, size=n_fake)]


def test_perfect_separation() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    m = ood_metrics(labels, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert (m["auroc"], m["aupr_in"], m["aupr_out"], m["fpr_at_95_tpr"], m["eer"]) == (1.0, 1.0, 1.0, 0.0, 0.0)
    assert (m["n_real"], m["n_fake"], m["reason"]) == (3, 3, None)
    assert ood_metrics(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])["auroc"] == 0.0


def test_identical_distributions_are_chance() -> None:
    m = ood_metrics(*_two_classes(20_000, 20_000, shift=0.0))
    assert m["auroc"] == pytest.approx(0.5, abs=0.01)
    assert m["eer"] == pytest.approx(0.5, abs=0.01)
    assert m["fpr_at_95_tpr"] == pytest.approx(0.95, abs=0.01)
    assert m["aupr_out"] == pytest.approx(0.5, abs=0.01)


def test_gaussians_with_known_separation() -> None:
    d = 1.5
    m = ood_metrics(*_two_classes(20_000, 20_000, shift=d, seed=1))
    assert m["auroc"] == pytest.approx(_phi(d / math.sqrt(2.0)), abs=0.01)
    assert m["eer"] == pytest.approx(_phi(-d / 2.0), abs=0.01)
    # 95% of fakes lie above d - 1.645; the reals above that line are the false positives.
    assert m["fpr_at_95_tpr"] == pytest.approx(1.0 - _phi(d - 1.6449), abs=0.015)


def test_aupr_in_takes_reals_as_positive() -> None:
    # With few fakes the two precision-recall views differ sharply, which pins down the convention.
    labels, scores = _two_classes(1000, 50, shift=2.0, seed=2)
    m = ood_metrics(labels, scores)
    assert m["aupr_in"] > 0.95 > m["aupr_out"]
    flipped = ood_metrics(1 - labels, -scores)
    assert flipped["aupr_in"] == pytest.approx(m["aupr_out"])
    assert flipped["auroc"] == pytest.approx(m["auroc"])


def test_infinite_scores_keep_their_order() -> None:
    m = ood_metrics([0, 0, 1, 1], [-np.inf, 0.0, 5.0, np.inf])
    assert m["auroc"] == 1.0 and m["fpr_at_95_tpr"] == 0.0


@pytest.mark.parametrize(
    ("labels", "reason"), [([0, 0, 0], "no fake samples"), ([1, 1], "no real samples"), ([], "no samples")]
)
def test_degenerate_inputs_give_nan_with_a_reason(labels: list[int], reason: str) -> None:
    m = ood_metrics(labels, np.arange(len(labels), dtype=float))
    assert m["reason"] == reason
    assert all(math.isnan(m[name]) for name in METRIC_NAMES)
    low, high = bootstrap_ci(labels, np.arange(len(labels), dtype=float), "auroc", n_boot=5)
    assert math.isnan(low) and math.isnan(high)


def test_refuses_nan_scores_and_bad_labels() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([0, 1], [0.0, np.nan])
    with pytest.raises(ValueError, match="labels must be"):
        ood_metrics([0, 2], [0.0, 1.0])


def test_bootstrap_contains_the_estimate_and_narrows_with_data() -> None:
    widths = []
    for n in (100, 3000):
        labels, scores = _two_classes(n, n, shift=1.0, seed=3)
        point = ood_metrics(labels, scores)
        cis = bootstrap_cis(labels, scores, n_boot=60, seed=0)
        for name in METRIC_NAMES:
            low, high = cis[name]
            assert low <= point[name] <= high, name
        widths.append(cis["auroc"][1] - cis["auroc"][0])
    # Width shrinks as 1/sqrt(n): a 30x larger sample should be at least 3x narrower.
    assert widths[1] < widths[0] / 3


def test_bootstrap_is_reproducible_and_accepts_a_function() -> None:
    labels, scores = _two_classes(200, 150, shift=0.8, seed=4)
    named = bootstrap_ci(labels, scores, "auroc", n_boot=50, seed=11)
    assert bootstrap_ci(labels, scores, "auroc", n_boot=50, seed=11) == named
    # The same resamples through scikit-learn's own AUROC give the same interval.
    as_function = bootstrap_ci(labels, scores, lambda y, s: float(roc_auc_score(y, s)), n_boot=50, seed=11)
    assert as_function == pytest.approx(named)
    with pytest.raises(ValueError, match="unknown metrics"):
        bootstrap_ci(labels, scores, "accuracy")


def test_group_bootstrap_is_wider_when_frames_of_a_video_are_correlated() -> None:
    rng = np.random.default_rng(5)
    n_videos, frames = 40, 25
    video_label = np.r_[np.zeros(n_videos // 2, dtype=int), np.ones(n_videos // 2, dtype=int)]
    video_effect = rng.normal(size=n_videos) + 0.7 * video_label
    labels = np.repeat(video_label, frames)
    scores = np.repeat(video_effect, frames) + 0.1 * rng.normal(size=labels.size)
    groups = np.repeat(np.arange(n_videos), frames)
    row_low, row_high = bootstrap_ci(labels, scores, "auroc", n_boot=100)
    group_low, group_high = bootstrap_ci(labels, scores, "auroc", n_boot=100, groups=groups)
    # 1000 frames carry the information of only 40 videos; row resampling pretends otherwise.
    assert group_high - group_low > 2.5 * (row_high - row_low)
    with pytest.raises(ValueError, match="single label"):
        bootstrap_ci([0, 1], [0.0, 1.0], "auroc", n_boot=2, groups=["v", "v"])


def _table(seed: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_real, n_a, n_b = 300, 120, 80
    labels = np.r_[np.zeros(n_real), np.ones(n_a + n_b)].astype(int)
    methods = np.array(["real"] * n_real + ["Deepfakes"] * n_a + ["FaceSwap"] * n_b, dtype=object)
    # Deepfakes is easy to detect, FaceSwap is indistinguishable from real on this score.
    nll = np.r_[rng.normal(size=n_real), rng.normal(3.0, 1.0, size=n_a), rng.normal(size=n_b)]
    return {"label": labels, "method": methods, "nll": nll, "neg_nll": -nll}


def test_evaluate_table_overall_and_per_method() -> None:
    rows = evaluate_table(_table(), "video", ["nll", "neg_nll"], n_boot=30)
    by_key = {(r["score"], r["subset"]): r for r in rows}
    assert list(by_key) == [(s, m) for s in ("nll", "neg_nll") for m in ("all", "Deepfakes", "FaceSwap")]
    easy, hard, overall = by_key["nll", "Deepfakes"], by_key["nll", "FaceSwap"], by_key["nll", "all"]
    # Every method is judged against all reals.
    assert easy["n_real"] == hard["n_real"] == overall["n_real"] == 300
    assert (easy["n_fake"], hard["n_fake"], overall["n_fake"]) == (120, 80, 200)
    assert easy["auroc"] > 0.95
    assert hard["auroc"] == pytest.approx(0.5, abs=0.1)
    assert hard["auroc"] < overall["auroc"] < easy["auroc"]
    assert by_key["neg_nll", "Deepfakes"]["auroc"] == pytest.approx(1.0 - easy["auroc"])
    for row in rows:
        assert row["level"] == "video" and row["reason"] is None and row["bootstrap_unit"] == "row"
        for name in METRIC_NAMES:
            assert row[f"{name}_lo"] <= row[f"{name}_hi"]
            # Not for the inverted score: at AUROC ~0 the AP sits at its floor, where resampling
            # ties can only raise it, so a percentile interval may sit just above the estimate.
            if row["score"] == "nll":
                assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"]


def test_evaluate_table_from_arrow_with_nulls_and_video_groups() -> None:
    data = _table()
    n = data["label"].size
    label = pa.array([None if i % 50 == 0 else int(v) for i, v in enumerate(data["label"])], pa.int8())
    nll = pa.array([None if i % 7 == 0 else float(v) for i, v in enumerate(data["nll"])], pa.float32())
    video_ids = [f"v{i // 4}" for i in range(n)]
    table = pa.table({"video_id": video_ids, "label": label, "method": data["method"], "nll": nll})
    rows = evaluate_table(table, "frame", ["nll"], n_boot=20)
    overall = rows[0]
    known = [i for i in range(n) if i % 50]
    assert overall["bootstrap_unit"] == "video_id"
    assert overall["n_missing"] == sum(1 for i in known if i % 7 == 0)
    assert overall["n_real"] + overall["n_fake"] + overall["n_missing"] == len(known)


def test_evaluate_table_without_fakes_does_not_crash() -> None:
    only_reals = {"label": np.zeros(30), "method": ["real"] * 30, "s": np.arange(30.0)}
    rows = evaluate_table(only_reals, "video", ["s"], n_boot=5)
    assert len(rows) == 1
    assert rows[0]["reason"] == "no fake samples"
    assert math.isnan(rows[0]["auroc"]) and math.isnan(rows[0]["auroc_lo"])
    with pytest.raises(ValueError, match="missing columns"):
        evaluate_table({"label": np.zeros(3), "method": ["real"] * 3}, "video", ["s"], n_boot=5)
