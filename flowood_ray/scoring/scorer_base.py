"""The scorer interface: a registered model bundle turned into per-crop scores, optional per-pixel maps,
and per-video aggregates. Every family's scorer (scorers.py, feature_scorers.py) derives from it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from flowood_ray.media.facecrop import ModelInput, model_input
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.aggregate import aggregate_frames


class Scorer:
    """Base: a model bundle turned into per-crop scores and per-video aggregates."""

    family = ""
    primary = ""  # the score behind verdicts; chosen per family, never per dataset
    scores_clips = False  # True when `score` reads its crops as one video's frames in temporal order
    # (typicality score, the NLL score it tests, the bundle.extra key of that score's real-data mean):
    # |NLL - E_real[NLL]| flags inputs that are too likely as well as too unlikely (Nalisnick et al.).
    typicality: tuple[str, str, str] | None = None
    # Name of the per-pixel anomaly map the family produces (None: image scores only); see `pixel_map`.
    map_name: str | None = None

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        self.bundle = bundle
        self.model_id = bundle.model_id
        self.device = torch.device(device)
        for module in bundle.modules.values():
            module.to(self.device).eval()
        self.input = ModelInput(**bundle.extra.get("input", {}))
        # None until calibration has measured the real-data mean.
        self.entropy: float | None = bundle.extra.get(self.typicality[2]) if self.typicality else None

    image_size: int

    def model_input(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 crops (N, H, W, 3) -> uint8 model inputs on the device, exactly as in training."""
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"expected uint8 crops (N, H, W, 3), got {crops.dtype} {crops.shape}")
        return torch.from_numpy(np.array(model_input(crops, self.image_size, self.input))).to(self.device)

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def pixel_map(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W) float32 anomaly maps at the crops' own resolution, higher = more anomalous; each
        crop's map does not depend on the rest of the batch. Only families with a `map_name`."""
        raise ValueError(f"the {self.family} family produces no pixel map")

    def score_video(self, crops: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """Frame scores of one video's crops (temporal order), at most `batch_size` crops per forward for
        image scorers; a clip scorer takes the whole video at once, bounded by the sampling cap."""
        if self.scores_clips:
            return self.score(crops)
        parts = [self.score(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def reference_statistics(self, crops: np.ndarray, batch_size: int = 256) -> dict[str, object]:
        """Statistics of REAL TRAINING crops that some scores are defined against (stored in bundle.extra):
        the typicality test's entropy estimate here. They never come from the validation crops that then
        set the thresholds, or the stated false-positive rates would be optimistic."""
        if not self.typicality:
            return {}
        _, base, key = self.typicality
        return {key: float(self.score_video(crops, batch_size)[base].mean())}

    def score_and_map(self, crops: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Scores and pixel maps of the same crops (families whose map comes from the same pass override it)."""
        return self.score(crops), self.pixel_map(crops)

    def with_typicality(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.typicality and self.entropy is not None:
            name, base, _ = self.typicality
            scores[name] = np.abs(scores[base] - self.entropy)
        return scores

    def aggregate(self, video_ids: np.ndarray, scores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(sorted unique video ids, video score per name): the mean of frame scores by default. NaN frame
        scores (a model that failed on them) are left out; a video with no other frame gets NaN."""
        out: dict[str, np.ndarray] = {}
        video_ids = np.asarray(video_ids)
        ids = np.unique(video_ids)
        typical = self.typicality[0] if self.typicality else None
        for name, values in scores.items():
            if name != typical:
                values = np.asarray(values, dtype=np.float64)
                scored = ~np.isnan(values)
                kept_ids, kept = aggregate_frames(video_ids[scored], values[scored], "mean")
                out[name] = np.full(len(ids), np.nan)
                out[name][np.searchsorted(ids, kept_ids)] = kept
        if self.typicality and typical in scores and self.entropy is not None:
            # Typicality is a test on the clip's mean NLL, not the mean of per-frame distances.
            out[typical] = np.abs(out[self.typicality[1]] - self.entropy)
        return ids, out


def resized_maps(maps: torch.Tensor, crops: np.ndarray) -> np.ndarray:
    """(N, h, w) maps -> float32 numpy at the crops' own resolution (bilinear)."""
    resized = torch.nn.functional.interpolate(maps[:, None], size=crops.shape[1:3], mode="bilinear",
                                              align_corners=False)
    return resized[:, 0].cpu().numpy()
