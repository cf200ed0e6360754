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
