"""Split-conformal p-values and the archive drift check against real calibration scores."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from flowood_ray.scoring.conformal import (
    DriftCheck,
    conformal_p_values,
    conformal_threshold,
    drift_check,
    flagged,
    min_calibration_size,
    require_calibration_size,
    unit_weights,
)

# Three calibration clips: A has four frames (weight 1/4 each), B one (1), C two (1/2 each).
CLIP_SCORES = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 2.0, 6.0])
CLIP_IDS = np.array(["A", "A", "A", "A", "B", "C", "C"])


def test_p_values_by_hand_with_ties() -> None:
    # Catches `>` for `>=` (s = 2 would give 0.4), a missing +1 in numerator or denominator, and a
    # calibration set that is searched without being sorted (it is given out of order).
    calibration = [3.0, 2.0, 1.0, 2.0]
    p = conformal_p_values([2.0, 3.5, 0.0, 3.0, 1.0], calibration)
    np.testing.assert_allclose(p, [4 / 5, 1 / 5, 5 / 5, 2 / 5, 5 / 5], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(flagged(p, 0.4), [False, True, False, True, False])


def test_p_values_keep_the_shape_and_nan_stays_nan() -> None:
    # Catches NaN scores becoming the most anomalous p = 1/(n+1) (searchsorted sorts NaN last).
    p = conformal_p_values([[np.nan, 10.0], [-10.0, np.nan]], [1.0, 2.0, 3.0])
    assert p.shape == (2, 2)
    assert np.isnan(p[0, 0]) and np.isnan(p[1, 1])
    assert (p[0, 1], p[1, 0]) == (0.25, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        flagged(p, 0.25)


@pytest.mark.parametrize("calibration", [[1.0, np.nan], [1.0, np.inf], [[1.0, 2.0]], []])
def test_bad_calibration_scores_are_refused(calibration: list) -> None:
    # Catches non-finite or multi-dimensional calibration scores being silently sorted and used.
    with pytest.raises(ValueError):
        conformal_p_values([1.0], calibration)


@pytest.mark.parametrize(
    ("alpha", "n", "exact_rate"),
    # exact_rate = floor(alpha (n + 1)) / (n + 1), worked out by hand: 2/200, 5/100, floor(6.55)/131.
    [(0.01, 199, 2 / 200), (0.05, 99, 5 / 100), (0.05, 130, 6 / 131)],
)
def test_coverage_is_valid_and_tight(alpha: float, n: int, exact_rate: float) -> None:
    # Catches an anti-conservative p-value (no +1 in the numerator: 3/200 at alpha = 0.01, n = 199),
    # an over-conservative one (+1 in both: 1/200) and `p < alpha` for `p <= alpha` (1/200).
    rng = np.random.default_rng(11)
    repetitions, fresh = 3000, 40
    calibrations = rng.lognormal(0.0, 1.0, size=(repetitions, n))
    tests = rng.lognormal(0.0, 1.0, size=(repetitions, fresh))
    fractions = np.array([flagged(conformal_p_values(t, c), alpha).mean() for c, t in zip(calibrations, tests)])
    # The fresh scores of one repetition share its calibration set, so the standard error comes
    # from the spread of whole repetitions, not of single scores.
    standard_error = fractions.std(ddof=1) / np.sqrt(repetitions)
    assert fractions.mean() <= alpha + 3 * standard_error
    assert abs(fractions.mean() - exact_rate) <= 3 * standard_error


def test_clip_weighted_p_values_and_threshold_by_hand() -> None:
    """p(s) = (1 + W(c >= s)) / (n + 1) with n = 3 clips: p(4.5) = (1 + 1 + 1/2) / 4, where counting frames
    as units gives (1 + 2) / 8; p(2) = (1 + 3/4 + 1 + 1) / 4 and p(6) = (1 + 1/2) / 4 (ties count).
    At alpha 0.5 the threshold is the smallest t with 1 + W(c > t) <= 2: W(c > 4) = 1.5, W(c > 5) = 0.5,
    so t = 5 (frames as units would give 3). Catches frames counted as units, weights that do not follow
    the clips, and a > for >= slip."""
    weights, n = unit_weights(CLIP_IDS)
    assert n == 3 and weights.tolist() == [0.25] * 4 + [1.0, 0.5, 0.5]
    p = conformal_p_values([4.5, 2.0, 6.0, 7.0, 0.0], CLIP_SCORES, weights, n)
    np.testing.assert_allclose(p, [2.5 / 4, 3.75 / 4, 1.5 / 4, 1 / 4, 1.0], rtol=0, atol=1e-15)
    assert conformal_threshold(CLIP_SCORES, 0.5, weights, n) == 5.0
    assert conformal_threshold(CLIP_SCORES, 0.5) == 3.0
    # The threshold and the p-values say the same: flagged exactly above t.
    np.testing.assert_array_equal(flagged(conformal_p_values([5.0, 5.5], CLIP_SCORES, weights, n), 0.5), [False, True])
    # Three clips cannot resolve alpha = 0.2 (1/(n + 1) = 0.25), however many frames they hold.
    assert conformal_threshold(CLIP_SCORES, 0.2, weights, n) is None


def test_one_frame_per_clip_is_the_plain_p_value() -> None:
    rng = np.random.default_rng(4)
    calibration, scores = rng.normal(size=60), rng.normal(size=200)
    weights, n = unit_weights(np.arange(60))
    np.testing.assert_array_equal(conformal_p_values(scores, calibration, weights, n),
                                  conformal_p_values(scores, calibration))
    for alpha in (0.02, 0.05, 0.1):
        assert conformal_threshold(calibration, alpha, weights, n) == conformal_threshold(calibration, alpha)


def test_weights_must_add_up_to_the_clips() -> None:
    # Catches frames weighted 1 (summing to the frame count) being read as that many clips.
    with pytest.raises(ValueError, match="sum to 7, not to the 3 units"):
        conformal_p_values([1.0], CLIP_SCORES, np.ones(7), 3)
    with pytest.raises(ValueError, match="one per score"):
        conformal_p_values([1.0], CLIP_SCORES, np.ones(3), 3)


def _clustered_clips(rng: np.random.Generator, clips: int, frames: int) -> np.ndarray:
    """Scores of real clips whose frames share a strong clip effect (person, camera, codec) and
    differ little within the clip: a heavy-tailed clip level plus small frame noise."""
    return rng.standard_t(3, size=(clips, 1)) + rng.normal(0.0, 0.1, size=(clips, frames))


def test_clip_weighted_coverage_holds_for_a_new_clip_where_pooled_frames_do_not() -> None:
    """Frames of one clip are not exchangeable units. On 9 calibration clips of 32 frames, the plain
    p-value over their 288 pooled frames 'resolves' 5% and flags about 1 in 10 of a new clip's frames
    (the new clip lies above the top calibration clip with chance 1/10); counted as 9 clips nothing can
    be flagged at 5%. With 24 clips the clip-weighted p-value flags at most 5% of a new clip's frames
    on average. Catches frame-level calibration that counts frames as units."""
    rng = np.random.default_rng(12)
    alpha, frames, repetitions = 0.05, 32, 2000
    few_pooled, few_weighted, enough = [], [], []
    for _ in range(repetitions):
        for clips, out in ((9, None), (24, enough)):
            data = _clustered_clips(rng, clips + 1, frames)
            calibration, new = data[:clips].ravel(), data[clips]
            weights, n = unit_weights(np.repeat(np.arange(clips), frames))
            shares = flagged(conformal_p_values(new, calibration, weights, n), alpha).mean()
            if out is None:
                few_pooled.append(flagged(conformal_p_values(new, calibration), alpha).mean())
                few_weighted.append(shares)
            else:
                out.append(shares)
    pooled = np.array(few_pooled)
    assert pooled.mean() > alpha + 5 * pooled.std(ddof=1) / np.sqrt(repetitions)
    assert max(few_weighted) == 0.0
    shares = np.array(enough)
    assert shares.mean() <= alpha + 3 * shares.std(ddof=1) / np.sqrt(repetitions)


def test_min_calibration_size_matches_a_brute_force_search() -> None:
    # Catches floor for ceil, 1/alpha for 1/alpha - 1 (100 at alpha = 0.01) and float round-up.
    assert (min_calibration_size(0.01), min_calibration_size(0.05)) == (99, 19)
    for alpha in (0.001, 0.01, 0.02, 0.05, 0.07, 0.1, 0.3, 0.5, 0.9):
        exact = Fraction(str(alpha))
        smallest = next(n for n in range(1, 10_000) if Fraction(1, n + 1) <= exact)
        assert min_calibration_size(alpha) == smallest, alpha


def test_too_few_calibration_scores_are_refused_in_words() -> None:
    # Catches an off-by-one at the boundary and a message without the numbers a user needs.
    require_calibration_size(99, 0.01)
    with pytest.raises(ValueError, match=r"^need at least 99 real clips for fpr=0.01, got 12$"):
        require_calibration_size(12, 0.01)
    with pytest.raises(ValueError, match=r"^need at least 19 real frames for fpr=0.05, got 18$"):
        require_calibration_size(18, 0.05, what="real frames")
    with pytest.raises(ValueError, match="need at least 99"):
        drift_check(np.zeros(50), np.arange(98.0))


def test_same_distribution_gives_no_warning() -> None:
    # Catches a lower-half test that fires on sampling noise alone.
    rng = np.random.default_rng(0)
    check = drift_check(rng.gumbel(0.0, 1.0, 1000), rng.gumbel(0.0, 1.0, 2000))
    assert (check.drift, check.fake_rich, check.warning) == (False, False, None)
    assert check.null_interval[0] <= check.flagged_fraction <= check.null_interval[1]
    assert check.lower_half_p_value > 0.1


def test_shifted_reals_give_a_drift_warning() -> None:
    # Catches a reversed one-sided test (it would see an upward shift as "more mass below").
    rng = np.random.default_rng(1)
    calibration = rng.normal(0.0, 1.0, 2000)
    check = drift_check(rng.normal(0.6, 1.0, 1000), calibration)
    assert check.drift and not check.fake_rich
    # By hand: Phi(-1.2816 - 0.6) = 3.0% of the shifted reals lie below the reals' 10% quantile.
    assert check.lower_half[0].level == 0.1
    assert check.lower_half[0].archive_fraction == pytest.approx(0.030, abs=0.012)
    assert check.lower_half_p_value < 1e-6
    assert check.warning is not None
    assert "scores higher than the calibration reals" in check.warning
    assert "flowood calibrate MODEL --reals" in check.warning
    assert f"{check.flagged_ratio:.1f}x the intended 1%" in check.warning
    # Reals scoring lower than the calibration reals make thresholds conservative, not wrong.
    assert not drift_check(rng.normal(-0.6, 1.0, 1000), calibration).drift


def test_twenty_percent_high_fakes_are_fake_rich_not_drift() -> None:
    # Catches a lower-half statistic that uses the archive's own median (moved to the reals' 62.5%
    # quantile by the fakes) and a fake tolerance that counts all m samples as reals.
    rng = np.random.default_rng(2)
    calibration = rng.gumbel(0.0, 1.0, 2000)
    archive = np.concatenate([rng.gumbel(0.0, 1.0, 800), rng.uniform(8.0, 12.0, 200)])
    check = drift_check(archive, calibration)
    assert not check.drift and check.fake_rich
    assert check.flagged_fraction >= 0.2 > 5 * check.null_interval[1]
    assert check.flagged_ratio == pytest.approx(check.flagged_fraction / 0.01)
    assert check.warning is not None
    assert "fake-rich, not drifted" in check.warning
    assert "recalibrate" not in check.warning
    # With no fakes tolerated, the same archive is (wrongly, but by design) called drifted.
    assert drift_check(archive, calibration, max_fake_fraction=0.0).drift


def test_null_intervals_and_lower_half_p_values_hold_their_level() -> None:
    # Catches Binomial(m, alpha) / Binomial(m, u) nulls, which ignore the calibration's own
    # sampling error: with m = 2n they would miss about a quarter of the time instead of 5%.
    rng = np.random.default_rng(5)
    repetitions, n, m = 300, 199, 400
    outside, small_p = [], []
    for _ in range(repetitions):
        check = drift_check(rng.normal(size=m), rng.normal(size=n), alpha=0.05, max_fake_fraction=0.0)
        outside.append(not check.null_interval[0] <= check.flagged_fraction <= check.null_interval[1])
        small_p.append([c.p_value <= 0.1 for c in check.lower_half])
    outside_rate, small_p_rate = np.mean(outside), np.mean(small_p, axis=0)
    assert outside_rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / repetitions)
    assert np.all(small_p_rate <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / repetitions))
    # Exact but not vacuous: the tests still reject near their level.
    assert np.all(small_p_rate >= 0.04)


def test_nan_scores_are_counted_and_left_out() -> None:
    # Catches NaN scores entering the fractions (as unflagged or as below every quantile).
    rng = np.random.default_rng(3)
    calibration, archive = rng.normal(size=500), rng.normal(size=300)
    with_nan = np.concatenate([archive[:100], np.full(37, np.nan), archive[100:]])
    check = drift_check(with_nan, calibration)
    clean = drift_check(archive, calibration)
    assert (check.n_unscored, check.n_scored, clean.n_unscored) == (37, 300, 0)
    assert check.model_dump(exclude={"n_unscored"}) == clean.model_dump(exclude={"n_unscored"})
    # By hand: the share of the 300 scored values at or below the calibration's 51st smallest score,
    # j = ceil(0.1 * 501).
    assert check.lower_half[0].archive_fraction == np.count_nonzero(archive <= np.sort(calibration)[50]) / 300
    with pytest.raises(ValueError, match="no scored clips"):
        drift_check(np.full(5, np.nan), calibration)


def test_drift_check_round_trips_through_json() -> None:
    # Catches a field that pydantic cannot serialise (numpy scalars, NaN) in score.json.
    rng = np.random.default_rng(4)
    check = drift_check(rng.normal(size=200), rng.normal(size=300), alpha=0.05)
    assert DriftCheck.model_validate_json(check.model_dump_json()) == check
