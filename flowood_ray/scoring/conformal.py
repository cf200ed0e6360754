"""Split-conformal p-values of anomaly scores against real calibration scores, and a drift check.

Convention as in `calibration`: higher score = more anomalous. A score's p-value is the fraction
of real calibration scores at least as anomalous, with the test score counted among them:
p(s) = (1 + #{c >= s}) / (n + 1). If the test real and the n calibration reals are exchangeable,
P(p <= alpha) = floor(alpha (n + 1)) / (n + 1) <= alpha (exactly alpha when alpha (n + 1) is an
integer and scores have no ties; ties only make p larger).

Frames of one clip are not exchangeable units: they share a person, a camera and a codec, so a
threshold set on the pooled frames of a few clips is exceeded by a new clip's frames far more often
than its stated rate. At frame level the units are therefore clips: each calibration frame weighs
1/m_i, m_i the frames of its clip, and with n clips
p(s) = (1 + sum of the weights of calibration frames >= s) / (n + 1).
This is conformal risk control with a clip's flagged share of frames as the loss (Angelopoulos et al.,
2022): for a new clip exchangeable with the n calibration clips, the expected share of its frames with
p <= alpha is at most alpha, however strongly frames of a clip agree. With one frame per clip it is
the p-value above, and like it, it needs n >= 1/alpha - 1 clips before anything can be flagged.

The drift check asks whether an archive's reals still look like the calibration reals, which the
guarantee above needs. It cannot use labels, so it reads the flagged fraction against its null
interval and compares the lower half of the scores, where fakes rarely sit (see `drift_check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict
from scipy.stats import betabinom

DEFAULT_LOWER_LEVELS: tuple[float, ...] = (0.1, 0.25, 0.5)
RECALIBRATE_HINT = "recalibrate with `flowood calibrate MODEL --reals <known-real {what} of this archive>`"


def check_real_scores(name: str, values: np.ndarray, min_samples: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"score {name!r}: expected a 1-D array of real validation scores, got shape {array.shape}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(
            f"score {name!r}: {bad} of {array.size} real validation scores are NaN or infinite; "
            "drop unscored samples before calibrating"
        )
    if array.size < min_samples:
        raise ValueError(
            f"score {name!r}: {array.size} real validation scores, at least {min_samples} are needed to calibrate"
        )
    return array


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _percent(rate: float) -> str:
    return f"{rate * 100:g}%"


def unit_weights(groups: ArrayLike) -> tuple[np.ndarray, int]:
    """(weight of each sample, number of units): 1/m for each of the m samples of a unit (a clip), so
    every unit weighs 1 in all."""
    keys = np.asarray(groups)
    if keys.ndim != 1 or keys.size == 0:
        raise ValueError(f"groups must be a non-empty 1-D array, got shape {keys.shape}")
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse], int(counts.size)


def _sorted_calibration(calibration_scores: ArrayLike, weights: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """Calibration scores sorted ascending, and the total weight at or above each position (one entry
    more, 0, for 'above everything')."""
    calibration = check_real_scores("calibration", np.asarray(calibration_scores), min_samples=1)
    weight = np.ones_like(calibration) if weights is None else np.asarray(weights, dtype=np.float64)
    if weight.shape != calibration.shape or not np.all(weight > 0.0):
        raise ValueError(f"calibration weights must be positive, one per score: got shape {weight.shape} "
                         f"for {calibration.size} scores")
    order = np.argsort(calibration, kind="stable")
    tail = np.concatenate([np.cumsum(weight[order][::-1])[::-1], [0.0]])
    return calibration[order], tail


def _units(tail: np.ndarray, n_units: int | None) -> int:
    n = round(float(tail[0])) if n_units is None else int(n_units)
    if n < 1 or not math.isclose(float(tail[0]), n, rel_tol=1e-9):
        raise ValueError(f"calibration weights sum to {float(tail[0]):g}, not to the {n} units they stand for")
    return n


def conformal_p_values(
    scores: ArrayLike, calibration_scores: ArrayLike, weights: ArrayLike | None = None, n_units: int | None = None
) -> np.ndarray:
    """p(s) = (1 + W(c >= s)) / (n + 1) for every score, in the scores' shape; NaN where s is NaN.

    Without weights every calibration score is a unit (W counts them). With `weights` (`unit_weights` of
    the scores' clips) W sums the weights and n is the number of clips, which they must add up to."""
    calibration, tail = _sorted_calibration(calibration_scores, weights)
    n = _units(tail, n_units)
    values = np.asarray(scores, dtype=np.float64)
    # side="left" skips the calibration scores strictly below s, so ties with s count as >= s.
    at_least = tail[np.searchsorted(calibration, values, side="left")]
    p_values = np.minimum(1.0, (1.0 + at_least) / (n + 1.0))
    return np.where(np.isnan(values), np.nan, p_values)


def conformal_threshold(
    calibration_scores: ArrayLike, alpha: float, weights: ArrayLike | None = None, n_units: int | None = None
) -> float | None:
    """The smallest calibration score t such that every s > t has p(s) <= alpha, i.e. the smallest t with
    1 + W(c > t) <= alpha (n + 1); None when even the largest fails (n < 1/alpha - 1): nothing can be
    flagged at that rate."""
    _check_alpha(alpha)
    calibration, tail = _sorted_calibration(calibration_scores, weights)
    n = _units(tail, n_units)
    above = tail[np.searchsorted(calibration, calibration, side="right")]
    # The tolerance keeps sums of 1/m weights from missing an exact boundary through rounding.
    allowed = np.flatnonzero(1.0 + above <= alpha * (n + 1) + 1e-9)
    return None if allowed.size == 0 else float(calibration[allowed[0]])


def flagged(p_values: ArrayLike, alpha: float) -> np.ndarray:
    """True where p <= alpha (flagged as fake at false-positive rate alpha)."""
    _check_alpha(alpha)
    values = np.asarray(p_values, dtype=np.float64)
    if np.isnan(values).any():
        # As `calibration.verdict`: a boolean cannot say "unscored"; the caller decides what that means.
        raise ValueError(f"{int(np.isnan(values).sum())} p-values are NaN (unscored); they have no verdict")
    return values <= alpha


def min_calibration_size(alpha: float) -> int:
    """Smallest n with 1 / (n + 1) <= alpha: below it no score can ever be flagged at alpha."""
    _check_alpha(alpha)
    # The tolerance keeps 1/0.01 - 1 = 99 from rounding up to 100 through floating-point error.
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def require_calibration_size(n: int, alpha: float, what: str = "real clips") -> None:
    """ValueError unless n calibration scores can resolve the false-positive rate alpha."""
    needed = min_calibration_size(alpha)
    if n < needed:
        raise ValueError(f"need at least {needed} {what} for fpr={alpha:g}, got {n}")


class LowerQuantileComparison(BaseModel):
    """The archive's share at or below one lower quantile of the calibration reals."""

    model_config = ConfigDict(frozen=True)

    level: float
    calibration_score: float  # the j-th smallest calibration score, j = ceil(level (n + 1))
    expected_fraction: float  # j / (n + 1): the share a fresh real falls at or below it
    archive_fraction: float
    p_value: float  # one-sided: archive too high, allowing up to max_fake_fraction fakes


class DriftCheck(BaseModel):
    """Flagged fraction and lower-half comparison of an archive's scores against the calibration reals."""

    model_config = ConfigDict(frozen=True)

    alpha: float
    n_calibration: int
    n_scored: int
    n_unscored: int  # NaN scores, left out of every statistic
    flagged_fraction: float
    null_interval: tuple[float, float]  # central interval of flagged_fraction for an all-real, undrifted archive
    interval_level: float
    flagged_ratio: float  # flagged_fraction / alpha
    lower_half: tuple[LowerQuantileComparison, ...]
    lower_half_p_value: float  # Bonferroni over lower_half
    max_fake_fraction: float
    drift_level: float
    drift: bool
    fake_rich: bool
    warning: str | None


def drift_check(
    archive_scores: ArrayLike,
    calibration_scores: ArrayLike,
    alpha: float = 0.01,
    *,
    max_fake_fraction: float = 0.25,
    drift_level: float = 0.01,
    lower_levels: Sequence[float] = DEFAULT_LOWER_LEVELS,
    interval_level: float = 0.95,
    what: str = "clips",
) -> DriftCheck:
    """Compare an archive's scores with the real calibration scores; NaN archive scores are counted, then left out.

    (a) Flagged fraction. With an undrifted all-real archive the number of its m scores flagged at
    alpha is BetaBinomial(m, r, n + 1 - r), r = floor(alpha (n + 1)): each is flagged iff it lies
    above the r-th largest calibration score, whose exceedance probability is Beta(r, n + 1 - r).
    This is Binomial(m, alpha) widened by the calibration's own sampling error, which a plain
    binomial interval ignores and which dominates once m is not small against n.

    (b) Lower half. At each calibration quantile level u in `lower_levels` (within (0, 0.5]) take
    the j-th smallest calibration score c_(j), j = ceil(u (n + 1)), and count the K archive scores
    at or below it. For m exchangeable reals, K ~ BetaBinomial(m, j, n + 1 - j) exactly whatever
    the score distribution (ties only raise K). Fakes can only add to K, so if at most a fraction
    `max_fake_fraction` of the archive is fake, K is stochastically at least
    BetaBinomial(m_real, j, n + 1 - j) with m_real = ceil((1 - max_fake_fraction) m), and its
    cdf at K is a valid one-sided p-value for "the archive's reals score higher". The levels are
    combined by Bonferroni; drift is declared when that p-value is at most `drift_level`.
    This is why the test does not use the archive's own median or quantiles: 20% high fakes move
    the archive's median to the reals' 62.5% quantile, which a KS test between the halves below
    each sample's median, or a quantile-by-quantile bootstrap, then reports as drift.
    Limits: up to `max_fake_fraction` fakes are tolerated wherever they score; beyond it, high
    fakes can look like drift. The price is power: drift is seen only where the archive's share
    below c_(j) falls under (1 - max_fake_fraction) u, e.g. a location shift of about 0.16 sd at
    the 10% level and 0.32 sd at the median for normal scores with the default 0.25, before
    sampling error. Only upward drift is tested, the kind that inflates false positives.

    (c) `warning`: drift (thresholds calibrated elsewhere do not hold), or a flagged fraction above
    the null interval with an undrifted lower half (a fake-rich archive), else None.
    """
    _check_alpha(alpha)
    for name, rate in (("max_fake_fraction", max_fake_fraction), ("drift_level", drift_level)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {rate}")
    if not 0.0 < interval_level < 1.0:
        raise ValueError(f"interval_level must lie in (0, 1), got {interval_level}")
    if not lower_levels or not all(0.0 < u <= 0.5 for u in lower_levels):
        raise ValueError(f"lower_levels must be a non-empty sequence in (0, 0.5], got {tuple(lower_levels)}")
    calibration = np.sort(check_real_scores("calibration", np.asarray(calibration_scores), min_samples=1))
    n = int(calibration.size)
    require_calibration_size(n, alpha, what=f"real calibration {what}")
    archive = np.asarray(archive_scores, dtype=np.float64)
    if archive.ndim != 1:
        raise ValueError(f"archive scores must be 1-D, got shape {archive.shape}")
    unscored = np.isnan(archive)
    archive = np.sort(archive[~unscored])
    m = int(archive.size)
    if m == 0:
        raise ValueError(f"no scored {what} in the archive ({int(unscored.sum())} NaN scores)")

    flagged_fraction = float(flagged(conformal_p_values(archive, calibration), alpha).mean())
    flag_rank = math.floor(alpha * (n + 1) + 1e-9)
    flag_null = betabinom(m, flag_rank, n + 1 - flag_rank)
    tail = (1.0 - interval_level) / 2.0
    null_interval = (float(flag_null.ppf(tail)) / m, float(flag_null.ppf(1.0 - tail)) / m)

    m_real = math.ceil((1.0 - max_fake_fraction) * m - 1e-9)
    lower_half = []
    for level in lower_levels:
        j = min(n, math.ceil(level * (n + 1) - 1e-9))
        at_or_below = int(np.searchsorted(archive, calibration[j - 1], side="right"))
        lower_half.append(
            LowerQuantileComparison(
                level=float(level),
                calibration_score=float(calibration[j - 1]),
                expected_fraction=j / (n + 1),
                archive_fraction=at_or_below / m,
                p_value=float(betabinom.cdf(at_or_below, m_real, j, n + 1 - j)),
            )
        )
    lower_half_p_value = min(1.0, len(lower_half) * min(c.p_value for c in lower_half))
    drift = lower_half_p_value <= drift_level
    fake_rich = not drift and flagged_fraction > null_interval[1]
    flagged_ratio = flagged_fraction / alpha

    warning = None
    if drift:
        worst = min(lower_half, key=lambda c: c.p_value)
        warning = (
            f"the real-looking half of this archive scores higher than the calibration reals: only "
            f"{worst.archive_fraction:.1%} of its {what} score at or below the calibration's {_percent(worst.level)} "
            f"quantile, where at least {(1.0 - max_fake_fraction) * worst.expected_fraction:.1%} are expected even "
            f"with {max_fake_fraction:.0%} fakes (p = {lower_half_p_value:.2g}); thresholds calibrated elsewhere "
            f"flag {flagged_ratio:.1f}x the intended {_percent(alpha)} here, real {what} among them; "
            + RECALIBRATE_HINT.format(what=what)
        )
    elif fake_rich:
        warning = (
            f"this archive flags {flagged_ratio:.1f}x the intended {_percent(alpha)} ({flagged_fraction:.1%} of "
            f"{m} {what}; real {what} alone stay at or under {null_interval[1]:.1%} in {1.0 - tail:.1%} of archives), "
            f"but its real-looking half "
            f"matches the calibration reals (p = {lower_half_p_value:.2g}): it looks fake-rich, not drifted, "
            "and the thresholds stand"
        )
    return DriftCheck(
        alpha=alpha,
        n_calibration=n,
        n_scored=m,
        n_unscored=int(unscored.sum()),
        flagged_fraction=flagged_fraction,
        null_interval=null_interval,
        interval_level=interval_level,
        flagged_ratio=flagged_ratio,
        lower_half=tuple(lower_half),
        lower_half_p_value=lower_half_p_value,
        max_fake_fraction=max_fake_fraction,
        drift_level=drift_level,
        drift=drift,
        fake_rich=fake_rich,
        warning=warning,
    )
