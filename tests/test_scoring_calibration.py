"""Calibration on real-only validation scores: thresholds hold their false-positive rate."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from flowood_ray.scoring.calibration import (
    Calibration,
    calibrate,
    dump_calibrations,
    load_calibrations,
    standardize,
    verdict,
)


@pytest.mark.parametrize("n", [20, 21, 99, 137, 1000, 5003])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_never_exceed_fpr_on_the_validation_reals(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = {"continuous": rng.normal(size=n), "tied": rng.integers(0, 5, size=n).astype(float)}
    for cal in calibrate(scores, "frame").values():
        real = scores[cal.score]
        for fpr in (0.01, 0.05):
            assert verdict(real, cal, fpr).mean() <= fpr


def test_thresholds_hold_their_rate_on_fresh_reals() -> None:
    rng = np.random.default_rng(7)
    cal = calibrate({"nll": rng.gumbel(3.0, 2.0, size=20_000)}, "video")["nll"]
    fresh = rng.gumbel(3.0, 2.0, size=400_000)
    # Tolerances are about 4 standard errors of a quantile estimated from 20k samples.
    assert abs(verdict(fresh, cal, 0.01).mean() - 0.01) < 0.003
    assert abs(verdict(fresh, cal, 0.05).mean() - 0.05) < 0.006


def test_statistics_match_numpy_and_survive_json() -> None:
    real = np.random.default_rng(3).normal(2.0, 3.0, size=500)
    cals = calibrate({"bpd": real, "lr": -real}, "frame", quantiles=(0.5, 0.99))
    cal = cals["bpd"]
    assert (cal.score, cal.level, cal.n) == ("bpd", "frame", 500)
    assert cal.mean == pytest.approx(real.mean())
    assert cal.std == pytest.approx(real.std(ddof=1))
    assert cal.quantiles == {0.5: pytest.approx(np.median(real)), 0.99: pytest.approx(np.quantile(real, 0.99))}
    assert set(cal.thresholds) == {0.01, 0.05}
    assert cal.threshold(0.01) >= cal.threshold(0.05)
    assert Calibration.model_validate_json(cal.model_dump_json()) == cal
    assert load_calibrations(dump_calibrations(cals)) == cals


def test_standardize_uses_the_real_statistics() -> None:
    real = np.random.default_rng(4).normal(10.0, 4.0, size=2000)
    z = standardize(real, calibrate({"s": real}, "frame")["s"])
    assert z.mean() == pytest.approx(0.0, abs=1e-12)
    assert z.std(ddof=1) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.r_[np.zeros(30), np.nan], "NaN or infinite"),
        (np.r_[np.zeros(30), np.inf], "NaN or infinite"),
        (np.zeros(5), "at least 20"),
        (np.zeros((30, 2)), "1-D"),
    ],
)
def test_refuses_bad_validation_scores(values: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate({"s": values}, "frame")


def test_refuses_unknown_level_and_rates() -> None:
    real = np.arange(100.0)
    with pytest.raises(ValueError, match="level"):
        calibrate({"s": real}, "clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        calibrate({"s": real}, "frame", fprs=(0.0,))


def test_verdict_only_at_calibrated_rates_and_never_on_nan() -> None:
    cal = calibrate({"s": np.arange(100.0)}, "video")["s"]
    assert verdict(np.array([0.0, 1e9]), cal).tolist() == [False, True]
    assert bool(verdict(1e9, cal, 0.05))
    with pytest.raises(ValueError, match="calibrated rates"):
        verdict(np.zeros(3), cal, fpr=0.1)
    with pytest.raises(ValueError, match="NaN"):
        verdict(np.array([np.nan]), cal)


def test_constant_reals_cannot_be_standardized() -> None:
    cal = calibrate({"s": np.ones(50)}, "frame")["s"]
    with pytest.raises(ValueError, match="constant"):
        standardize(np.ones(3), cal)


def test_the_api_has_no_way_to_see_fakes() -> None:
    # The contract "thresholds are never tuned on fakes" is enforced by the signature itself.
    assert not {"labels", "label", "fake"} & set(inspect.signature(calibrate).parameters)


def test_thresholds_are_conformal_and_agree_with_the_p_values() -> None:
    """Hand-computed: n = 39 reals 1..39 at fpr 0.05 allow K = floor(0.05 * 40) - 1 = 1 real at or above a
    flagged score, so the threshold is the 2nd largest (38) and 38.5 is flagged (p = 2/40) while 38 is
    not (p = 3/40). Catches a quantile threshold that flags more than the conformal p-value allows."""
    from flowood_ray.scoring.conformal import conformal_threshold

    reals = np.arange(1.0, 40.0)
    cal = calibrate({"s": reals}, "video", min_samples=3)["s"]
    assert cal.thresholds[0.05] == 38.0 and cal.threshold(0.05) == 38.0
    np.testing.assert_allclose(cal.p_values(np.array([38.5, 38.0, 100.0])), [2 / 40, 3 / 40, 1 / 40])
    assert verdict(np.array([38.5, 38.0]), cal, 0.05).tolist() == [True, False]
    rng = np.random.default_rng(0)
    for n in (20, 99, 250, 1000):
        real = rng.normal(size=n)
        fresh = rng.normal(size=5000)
        for fpr in (0.01, 0.05):
            threshold = conformal_threshold(real, fpr)
            flagged = fresh > (np.inf if threshold is None else threshold)
            cal = calibrate({"s": real}, "frame")["s"]
            assert np.array_equal(flagged, cal.p_values(fresh) <= fpr)


def test_too_few_reals_flag_nothing_and_say_they_are_unresolved() -> None:
    """13 reals cannot give any score a p-value of 1% (the smallest is 1/14): no threshold, nothing flagged,
    resolved False; 100 reals resolve 1%."""
    cal = calibrate({"s": np.arange(13.0)}, "video", min_samples=3)["s"]
    assert cal.thresholds[0.01] is None and cal.threshold(0.01) == float("inf")
    assert not verdict(np.array([1e9]), cal, 0.01).any()
    assert cal.resolved == {0.01: False, 0.05: False}
    assert calibrate({"s": np.arange(100.0)}, "video")["s"].resolved == {0.01: True, 0.05: True}
    reloaded = load_calibrations(dump_calibrations({"s": cal}))["s"]
    assert reloaded.thresholds[0.01] is None and reloaded.scores == tuple(np.arange(13.0))
    assert reloaded.resolved == cal.resolved


def test_frame_calibration_counts_clips_not_frames() -> None:
    """600 frames of 12 clips resolve no 5% frame threshold (19 clips needed), where 600 frames counted as
    units would; the p-values weigh each frame by 1/(frames of its clip), and the weights survive JSON.
    Catches `groups` being ignored, weights left behind at registration, and n counting frames."""
    from flowood_ray.scoring.conformal import conformal_p_values, unit_weights

    rng = np.random.default_rng(8)
    frames = rng.normal(size=600)
    clips = np.repeat(np.arange(12), 50)
    cal = calibrate({"s": frames}, "frame", groups=clips)["s"]
    assert (cal.n, cal.samples) == (12, 600)
    assert cal.thresholds == {0.01: None, 0.05: None} and cal.resolved == {0.01: False, 0.05: False}
    assert calibrate({"s": frames}, "frame")["s"].thresholds[0.05] is not None
    probes = np.array([-1.0, 0.0, 2.5, 9.0])
    weights, n = unit_weights(clips)
    np.testing.assert_allclose(cal.p_values(probes), conformal_p_values(probes, frames, weights, n), rtol=0, atol=1e-12)
    assert cal.p_values(np.array([9.0]))[0] == pytest.approx(1 / 13)  # never below 1/(clips + 1)
    assert load_calibrations(dump_calibrations({"s": cal}))["s"] == cal
    # 40 clips of uneven length resolve 5%: the threshold keeps 1 + W(c > t) <= 0.05 * 41.
    lengths = rng.integers(5, 60, size=40)
    uneven = rng.normal(size=lengths.sum())
    wide = calibrate({"s": uneven}, "frame", groups=np.repeat(np.arange(40), lengths))["s"]
    # ... and is the smallest calibration score that does (the next one down lets too much through).
    owners = np.repeat(np.arange(40), lengths)
    clip_shares = lambda cut: np.bincount(owners[uneven > cut], minlength=40) / lengths  # noqa: E731
    t = wide.threshold(0.05)
    assert 1 + clip_shares(t).sum() <= 0.05 * 41 + 1e-9
    assert 1 + clip_shares(uneven[uneven < t].max()).sum() > 0.05 * 41
    with pytest.raises(ValueError, match="600 scores but 599 clip ids"):
        calibrate({"s": frames}, "frame", groups=clips[:-1])
