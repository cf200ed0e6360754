"""Calibration of detector scores on real-only validation data.

A registered model carries one `Calibration` per score name and level (ARCHITECTURE.md, Contracts):
the statistics of its scores on held-out REAL footage and the thresholds at fixed false-positive
rates. The API takes real scores only, so a threshold can never be tuned on fakes.

Convention: higher score = more anomalous = more likely fake.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

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
    n: int = Field(ge=1)
    mean: float
    std: float = Field(ge=0.0)
    quantiles: dict[float, float]
    # fpr -> threshold; a sample is flagged when its score is strictly greater than the threshold.
    thresholds: dict[float, float]

    def threshold(self, fpr: float) -> float:
        """The threshold calibrated for `fpr`; only the rates chosen at calibration time exist."""
        for key, value in self.thresholds.items():
            if math.isclose(key, fpr, rel_tol=1e-9, abs_tol=1e-12):
                return value
        raise ValueError(
            f"no threshold at fpr={fpr} for score {self.score!r} ({self.level}); "
            f"calibrated rates: {sorted(self.thresholds)}"
        )


_CALIBRATIONS = TypeAdapter(dict[str, Calibration])


def _check_real_scores(name: str, values: np.ndarray, min_samples: int) -> np.ndarray:
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


def calibrate(
    scores: Mapping[str, np.ndarray],
    level: Level,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    fprs: Sequence[float] = DEFAULT_FPRS,
    min_samples: int = MIN_SAMPLES,
) -> dict[str, Calibration]:
    """Calibrate every named score from REAL-ONLY validation scores.

    The threshold at rate `fpr` is the (1 - fpr) quantile with numpy's "higher" method: an
    observed score at or above the exact quantile, so at most `fpr` of the validation reals are
    strictly above it (ties only lower that fraction).
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
        real = _check_real_scores(name, values, min_samples)
        for fpr in fprs:
            if real.size * fpr < 1.0:
                # Not an error: the threshold is then the largest real score, which is still
                # conservative on this sample but noisy on fresh data.
                logger.warning(
                    "score %r (%s): %d samples are too few to resolve fpr=%g; the threshold is the sample maximum",
                    name,
                    level,
                    real.size,
                    fpr,
                )
        calibrations[name] = Calibration(
            score=name,
            level=level,
            n=int(real.size),
            mean=float(real.mean()),
            std=float(real.std(ddof=1)),
            quantiles={float(q): float(np.quantile(real, q)) for q in quantiles},
            thresholds={float(f): float(np.quantile(real, 1.0 - f, method="higher")) for f in fprs},
        )
        logger.info(
            "calibrated %r (%s) on %d real samples: thresholds %s",
            name,
            level,
            real.size,
            calibrations[name].thresholds,
        )
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
