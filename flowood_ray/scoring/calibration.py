"""Calibration of detector scores on real-only validation data.

A registered model carries one `Calibration` per score name and level (ARCHITECTURE.md, Contracts):
the statistics of its scores on held-out REAL footage, the sorted scores themselves, and the
thresholds at fixed false-positive rates. The API takes real scores only, so a threshold can never be
tuned on fakes.

Thresholds are split-conformal: a score is flagged at rate alpha when its conformal p-value
(1 + #{real >= s}) / (n + 1) is at most alpha, which holds the false-positive rate at alpha or below
for any real drawn like the calibration reals. With fewer than 1/alpha - 1 reals no score can reach
that p-value, and the threshold is None: the model then flags nothing at that rate instead of
pretending a sample maximum is a 1% threshold. `resolved` says whether at least 1/alpha reals stand
behind a threshold.

The reals that count are clips. A video score is one per clip; frame scores are calibrated with each
frame weighted by 1/(frames of its clip) (`conformal`), so `n` is the number of clips at both levels
and `samples` the number of scores. A frame threshold therefore needs as many clips as a video one:
frames of one clip share a face, a camera and a codec and do not stand for other people's footage.

Convention: higher score = more anomalous = more likely fake.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, computed_field

from flowood_ray.scoring.conformal import check_real_scores, conformal_p_values, conformal_threshold, unit_weights

logger = logging.getLogger(__name__)

Level = Literal["frame", "video"]

DEFAULT_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)
DEFAULT_FPRS: tuple[float, ...] = (0.01, 0.05)
# Below this a 1%/5% threshold is little more than the sample maximum; refuse rather than mislead.
MIN_SAMPLES = 20


class Calibration(BaseModel):
    """Real-score statistics and thresholds of one score at one level (frame or video)."""

    model_config = ConfigDict(frozen=True)

    score: str
    level: Level
    n: int = Field(ge=1)  # clips behind the thresholds and p-values (the exchangeable units)
    samples: int | None = Field(None, ge=1)  # scores: frames at frame level; None (older calibrations) = n
    mean: float
    std: float = Field(ge=0.0)
    quantiles: dict[float, float]
    # fpr -> threshold; a sample is flagged when its score is strictly greater than the threshold, i.e.
    # when its conformal p-value is at most fpr. None: too few reals for any score to reach that p-value.
    thresholds: dict[float, float | None]
    # The sorted real scores behind the thresholds: conformal p-values need the sample, not its quantiles.
    scores: tuple[float, ...] = ()
    # Each score's weight, 1/(scores of its clip), in the order of `scores`; empty: every score is a clip.
    weights: tuple[float, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved(self) -> dict[float, bool]:
        """fpr -> whether at least 1/fpr real clips stand behind its threshold."""
        return {fpr: self.n >= math.ceil(1.0 / fpr - 1e-9) for fpr in self.thresholds}

    def threshold(self, fpr: float) -> float:
        """The threshold calibrated for `fpr` (+inf when no score can be flagged at that rate); only the
        rates chosen at calibration time exist."""
        for key, value in self.thresholds.items():
            if math.isclose(key, fpr, rel_tol=1e-9, abs_tol=1e-12):
                return math.inf if value is None else value
        raise ValueError(
            f"no threshold at fpr={fpr} for score {self.score!r} ({self.level}); "
            f"calibrated rates: {sorted(self.thresholds)}"
        )

    def p_values(self, scores: np.ndarray | float) -> np.ndarray:
        """Conformal p-values of `scores` against the calibration reals (NaN stays NaN)."""
        if not self.scores:
            raise ValueError(f"score {self.score!r} ({self.level}) was calibrated without keeping its real scores")
        weights = np.asarray(self.weights) if self.weights else None
        return conformal_p_values(scores, np.asarray(self.scores), weights, self.n)


_CALIBRATIONS = TypeAdapter(dict[str, Calibration])


def calibrate(
    scores: Mapping[str, np.ndarray],
    level: Level,
    *,
    groups: ArrayLike | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    fprs: Sequence[float] = DEFAULT_FPRS,
    min_samples: int = MIN_SAMPLES,
) -> dict[str, Calibration]:
    """Calibrate every named score from REAL-ONLY validation scores.

    `groups` names the clip of every score (frame level); without it each score is a clip of its own.
    The threshold at rate `fpr` is the conformal one (`conformal.conformal_threshold`): a fresh real clip
    exchangeable with these has at most `fpr` of its scores flagged, in expectation.
    """
    if level not in ("frame", "video"):
        raise ValueError(f"level must be 'frame' or 'video', got {level!r}")
    for rate in (*quantiles, *fprs):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"quantiles and fprs must lie in (0, 1), got {rate}")
    if not scores:
        raise ValueError("no scores to calibrate")
    calibrations: dict[str, Calibration] = {}
    for name, values in scores.items():
        real = check_real_scores(name, values, min_samples)
        if groups is None:
            weights, n = np.ones_like(real), real.size
        else:
            if len(groups) != real.size:
                raise ValueError(f"score {name!r}: {real.size} scores but {len(groups)} clip ids")
            weights, n = unit_weights(groups)
        order = np.argsort(real, kind="stable")
        real, weights = real[order], weights[order]
        thresholds = {float(f): conformal_threshold(real, f, weights, n) for f in fprs}
        for fpr, threshold in thresholds.items():
            if n < math.ceil(1.0 / fpr - 1e-9):
                logger.warning("score %r (%s): %d real clips do not resolve fpr=%g (%d needed)%s", name, level,
                               n, fpr, math.ceil(1.0 / fpr - 1e-9),
                               "; nothing can be flagged at that rate" if threshold is None else "")
        calibrations[name] = Calibration(
            score=name,
            level=level,
            n=n,
            samples=int(real.size),
            mean=float(real.mean()),
            std=float(real.std(ddof=1)),
            quantiles={float(q): float(np.quantile(real, q)) for q in quantiles},
            thresholds=thresholds,
            scores=tuple(float(v) for v in real),
            weights=() if groups is None else tuple(float(w) for w in weights),
        )
        logger.info("calibrated %r (%s) on %d real scores of %d clips: thresholds %s", name, level, real.size, n,
                    thresholds)
    return calibrations


def verdict(score: np.ndarray | float, calibration: Calibration, fpr: float = 0.01) -> np.ndarray:
    """True where the score is above the threshold calibrated at `fpr` (flagged as fake)."""
    values = np.asarray(score, dtype=np.float64)
    if np.isnan(values).any():
        # A boolean cannot say "unknown"; the caller must decide what an unscored sample means.
        raise ValueError(f"score {calibration.score!r}: NaN scores have no verdict; drop or impute them first")
    return values > calibration.threshold(fpr)


def standardize(score: np.ndarray | float, calibration: Calibration) -> np.ndarray:
    """z-score with the real validation statistics, so scores of different models share a scale."""
    if calibration.std <= 0.0:
        raise ValueError(f"score {calibration.score!r}: real validation scores are constant; cannot standardize")
    return (np.asarray(score, dtype=np.float64) - calibration.mean) / calibration.std


def dump_calibrations(calibrations: Mapping[str, Calibration]) -> str:
    """JSON text of a score-name -> Calibration mapping (stored with a registered model)."""
    return _CALIBRATIONS.dump_json(dict(calibrations), indent=2).decode()


def load_calibrations(text: str | bytes) -> dict[str, Calibration]:
    """Inverse of `dump_calibrations`."""
    return _CALIBRATIONS.validate_json(text)
