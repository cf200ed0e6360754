"""Scorers of the families built on the ImageNet EfficientNet-Lite: the self-blend detector (fine-tuned),
and CFLOW-AD, DifferNet, Deep SVDD and Patch SVDD on its frozen features (seed 003).

CFLOW and Patch SVDD share one shape: a raw per-scale map (fibre log-likelihoods, nearest-fibre
distances), standardised with the mean and std that real TRAINING crops give at each stride, upsampled
and averaged into one map whose maximum, top-k mean and mean are the image scores. Fixed real
statistics keep every crop's map independent of its batch.
"""

from __future__ import annotations

import numpy as np
import torch

from flowood_ray.models.blend_detector import BlendDetector
from flowood_ray.models.cflow import CFlowDecoders, anomaly_map, image_scores
from flowood_ray.models.differnet import DifferNetFlow, gradient_map, multi_transform_nll, pooled_features, unit_float
from flowood_ray.models.efficientnet import EfficientNetLite
from flowood_ray.models.patch_svdd import PatchBank, nearest_distances, patch_anomaly_map, patch_image_scores
from flowood_ray.models.svdd import DeepSVDD
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.scorer_base import Scorer, resized_maps


class BlendScorer(Scorer):
    """The real-only detector fine-tuned against self-blended pseudo-fakes: its fake log-odds."""

    family = "blend"
    primary = "blend_fake"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.detector: BlendDetector = bundle.modules["detector"]  # type: ignore[assignment]
        self.image_size = self.detector.config.image_size

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        return {"blend_fake": self.detector(self.model_input(crops)).double().cpu().numpy()}


class ReferenceMapScorer(Scorer):
    """A family whose map standardises raw per-stride maps with real training crops' statistics, stored
    in bundle.extra[`reference_key`] at calibration as {stride: [mean, std]}."""

    reference_key = ""

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.encoder: EfficientNetLite = bundle.modules["encoder"]  # type: ignore[assignment]
        stored = bundle.extra.get(self.reference_key)
        # stride -> (mean, std); None before calibration.
        self.reference = {int(k): (float(v[0]), float(v[1])) for k, v in stored.items()} if stored else None

    def anomaly_maps(self, crops: np.ndarray) -> torch.Tensor:
        """(N, image_size, image_size) standardised maps at the model's input resolution."""
        raise NotImplementedError

    def image_scores(self, maps: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        return self.score_and_map(crops)[0]

    def pixel_map(self, crops: np.ndarray) -> np.ndarray:
        return self.score_and_map(crops)[1]

    def score_and_map(self, crops: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if self.reference is None:
            raise ValueError(f"{self.model_id} has no reference statistics yet: calibrate it before scoring")
        maps = self.anomaly_maps(crops)
        return {k: v.double().cpu().numpy() for k, v in self.image_scores(maps).items()}, resized_maps(maps, crops)


class CFlowScorer(ReferenceMapScorer):
    """Seed 003's CFLOW-AD: a per-pixel anomaly map from conditional flows on frozen ImageNet features,
    and its maximum, top-k mean and mean as image scores."""

    family = "cflow"
    primary = "cflow_topk"
    map_name = "cflow"
    reference_key = "cflow_reference"  # per-position log-likelihoods of real training crops

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.decoders: CFlowDecoders = bundle.modules["cflow"]  # type: ignore[assignment]
        self.image_size = self.decoders.config.image_size

    @torch.no_grad()
    def log_likelihoods(self, crops: np.ndarray) -> dict[int, torch.Tensor]:
        return self.decoders.log_likelihood_maps(self.encoder.features(self.model_input(crops)))

    def reference_statistics(self, crops: np.ndarray, batch_size: int = 64) -> dict[str, object]:
        parts = [self.log_likelihoods(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
        values = {s: torch.cat([p[s].flatten() for p in parts]).double() for s in parts[0]}
        return {self.reference_key: {str(s): [float(v.mean()), float(v.std())] for s, v in values.items()}}

    def anomaly_maps(self, crops: np.ndarray) -> torch.Tensor:
        assert self.reference is not None
        return anomaly_map(self.log_likelihoods(crops), self.reference, self.image_size)

    def image_scores(self, maps: torch.Tensor) -> dict[str, torch.Tensor]:
        return image_scores(maps, self.decoders.config.top_k_fraction)


class PatchSVDDScorer(ReferenceMapScorer):
    """Seed 003's Patch SVDD score: each fibre's distance to its nearest real training fibre, as a
    standardised map and its maximum, top-k mean and mean."""

    family = "patchsvdd"
    primary = "patchsvdd_topk"
    map_name = "patchsvdd"
    reference_key = "patchsvdd_reference"  # real training crops' fibre distances

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.bank: PatchBank = bundle.modules["patchsvdd"]  # type: ignore[assignment]
        self.image_size = self.bank.config.image_size

    @torch.no_grad()
    def distances(self, crops: np.ndarray) -> dict[int, torch.Tensor]:
        return self.bank.distance_maps(self.encoder.features(self.model_input(crops)))

    @torch.no_grad()
    def reference_statistics(self, crops: np.ndarray, batch_size: int = 64) -> dict[str, object]:
        """Training crops' fibres are in the bank themselves: each is measured against its nearest bank
        fibre that is not an exact copy of it, as a fibre of an unseen real crop would be."""
        values: dict[int, list[torch.Tensor]] = {s: [] for s in self.bank.config.strides}
        for i in range(0, len(crops), batch_size):
            features = self.encoder.features(self.model_input(crops[i : i + batch_size]))
            for s in values:
                fibres = features[s].permute(0, 2, 3, 1).reshape(-1, features[s].shape[1])
                values[s].append(nearest_distances(fibres, self.bank.fibres(s), skip_copies=True))
        reference = {}
        for s, parts in values.items():
            distance = torch.cat(parts).double()
            if not float(distance.std()) > 0:
                raise ValueError(f"stride {s}: the reference crops' fibre distances do not vary; use more crops")
            reference[str(s)] = [float(distance.mean()), float(distance.std())]
        return {self.reference_key: reference}

    def anomaly_maps(self, crops: np.ndarray) -> torch.Tensor:
        assert self.reference is not None
        return patch_anomaly_map(self.distances(crops), self.reference, self.image_size)

    def image_scores(self, maps: torch.Tensor) -> dict[str, torch.Tensor]:
        return patch_image_scores(maps, self.bank.config.top_k_fraction)


class DifferNetScorer(Scorer):
    """Seed 003's DifferNet: the mean NLL of the crop's pooled ImageNet features over a fixed set of
    transformed copies, and the gradient of that NLL with respect to the pixels as its map."""

    family = "differnet"
    primary = "differnet_nll"
    map_name = "differnet"
    map_batch = 16  # crops per backward pass: the gradient map keeps every transform's activations

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.encoder: EfficientNetLite = bundle.modules["encoder"]  # type: ignore[assignment]
        self.flow: DifferNetFlow = bundle.modules["differnet"]  # type: ignore[assignment]
        self.image_size = self.flow.config.image_size

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        x = unit_float(self.model_input(crops))
        return {"differnet_nll": multi_transform_nll(self.encoder, self.flow, x).double().cpu().numpy()}

    def pixel_map(self, crops: np.ndarray) -> np.ndarray:
        return self.score_and_map(crops)[1]

    def score_and_map(self, crops: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        parts = [gradient_map(self.encoder, self.flow, unit_float(self.model_input(crops[i : i + self.map_batch])))
                 for i in range(0, len(crops), self.map_batch)]
        scores = torch.cat([p[0] for p in parts]).double().cpu().numpy()
        return {"differnet_nll": scores}, resized_maps(torch.cat([p[1] for p in parts]), crops)


class DeepSVDDScorer(Scorer):
    """Seed 003's Deep SVDD baseline: squared distance of the crop's representation to the real centre."""

    family = "svdd"
    primary = "svdd_distance"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.encoder: EfficientNetLite = bundle.modules["encoder"]  # type: ignore[assignment]
        self.svdd: DeepSVDD = bundle.modules["svdd"]  # type: ignore[assignment]
        self.image_size = self.svdd.config.image_size

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        pooled = pooled_features(self.encoder, self.model_input(crops))
        return {"svdd_distance": self.svdd(pooled).double().cpu().numpy()}
