"""Scorers: plain PyTorch functions from uint8 face crops to named per-crop scores.

Image scorers compute every score per crop in eval mode, so a crop's score never depends on the
rest of its batch. The clip scorer scores windows of one video's consecutive crops and gives each
crop the mean of its windows, so it takes one video at a time (`score_videos` groups them).
Higher always means more anomalous. `aggregate` turns a video's frame scores into video scores;
calibration and archive scoring both go through it, so thresholds and scores are always computed
the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from flowood_ray.media.clips import cut_clips, frame_means
from flowood_ray.media.facecrop import ModelInput, model_input
from flowood_ray.models.blend_detector import BlendDetector
from flowood_ray.models.cflow import CFlowDecoders, anomaly_map, image_scores
from flowood_ray.models.differnet import DifferNetFlow, gradient_map, multi_transform_nll, pooled_features, unit_float
from flowood_ray.models.efficientnet import EfficientNetLite
from flowood_ray.models.classifier import AbnormalityModule, FakeClassifier, auxiliary, fake_or_abnormal, odin_score
from flowood_ray.models.clip_embedder import ClipAutoencoder
from flowood_ray.models.glow import Glow, preprocess
from flowood_ray.models.patch_density import PatchDensity
from flowood_ray.models.patch_svdd import PatchBank, nearest_distances, patch_anomaly_map, patch_image_scores
from flowood_ray.models.realnvp import RealNVP
from flowood_ray.models.svdd import DeepSVDD
from flowood_ray.models.vqvae import VQVAE, PixelSNAIL
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.aggregate import aggregate_frames


# Per-position NLL quantiles of real training codes (Marimont & Tarroni's lambda_s and lambda_p).
LAMBDA_S_QUANTILE = 0.95
LAMBDA_P_QUANTILE = 0.90


def png_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """Lossless PNG code length per sub-pixel: Serra et al.'s input-complexity estimate L(x)."""
    dims = images[0].size
    return np.array(
        [8.0 * len(cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]) / dims for img in images]
    )


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


class GlowScorer(Scorer):
    """Raw bits/dim and three corrections of the likelihood pathology of pixel flows (seed 000):
    input complexity (Serra et al.), a likelihood ratio against a background model trained on
    pixel-mutated reals (Ren et al.), and typicality against the real-data entropy (Nalisnick et al.)."""

    family = "glow"
    primary = "glow_typicality"
    typicality = ("glow_typicality", "glow_bpd", "entropy_bpd")

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.glow: Glow = bundle.modules["glow"]  # type: ignore[assignment]
        self.background: Glow = bundle.modules["background"]  # type: ignore[assignment]
        self.image_size = self.glow.config.image_size

    @torch.no_grad()
    def bits_per_dim(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = self.model_input(crops)
        x = preprocess(images, self.glow.config.n_bits, "center")
        bpd = self.glow.bits_per_dim(x).double().cpu().numpy()
        background = self.background.bits_per_dim(x).double().cpu().numpy()
        return bpd, background, png_bits_per_dim(images.cpu().numpy())

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        bpd, background, complexity = self.bits_per_dim(crops)
        return self.with_typicality({"glow_bpd": bpd, "glow_complexity": bpd - complexity, "glow_lr": bpd - background})


class PatchScorer(Scorer):
    """NLL of the inner face's high-pass texture patches in nats per patch dimension, and its typicality:
    re-synthesised faces are often smoother than real ones, hence *more* likely, which only a two-sided
    test catches."""

    family = "patch"
    primary = "patch_typicality"
    typicality = ("patch_typicality", "patch_nll", "entropy_patch_nll")

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.density: PatchDensity = bundle.modules["patch"]  # type: ignore[assignment]
        self.image_size = self.density.config.image_size

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        nll = -self.density(self.model_input(crops)) / self.density.dim
        inner = self.density.inner_mask().to(nll.device)
        return self.with_typicality({
            "patch_nll": nll[:, inner].mean(1).double().cpu().numpy(),
            "patch_nll_all": nll.flatten(1).mean(1).double().cpu().numpy(),
        })


class VQVAEScorer(Scorer):
    """Document 002's sample score (latent NLL above lambda_s) plus the mean code NLL and the
    plain reconstruction error."""

    family = "vqvae"
    primary = "vq_latent_nll"
    map_name = "vq_restoration"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.vqvae: VQVAE = bundle.modules["vqvae"]  # type: ignore[assignment]
        self.prior: PixelSNAIL = bundle.modules["prior"]  # type: ignore[assignment]
        self.image_size = self.vqvae.config.image_size
        # lambda_s: per-position NLL quantile of real training codes; None before calibration.
        self.lambda_s: float | None = bundle.extra.get("lambda_s")

    @torch.no_grad()
    def encode(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x in model space, codes (N, h, w), per-position NLL (N, h, w))."""
        x = preprocess(self.model_input(crops), 8, "center")
        codes = self.vqvae.encode(x)
        return x, codes, self.prior.nll_map(codes)

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        x, codes, nll = self.encode(crops)
        nll = nll.double()
        recon = self.vqvae.decode_codes(codes)
        scores = {
            "vq_code_nll": nll.flatten(1).mean(1).cpu().numpy(),
            "vq_recon": (recon - x).abs().flatten(1).mean(1).double().cpu().numpy(),
        }
        if self.lambda_s is not None:
            # Only latents that are unlikely under the prior count towards the sample score.
            scores["vq_latent_nll"] = torch.where(nll > self.lambda_s, nll, 0.0).flatten(1).sum(1).cpu().numpy()
        return scores

    def reference_statistics(self, crops: np.ndarray, batch_size: int = 256) -> dict[str, object]:
        """Marimont & Tarroni's lambda_s and lambda_p: quantiles of the per-position code NLL of real crops."""
        nll = torch.cat([self.encode(crops[i : i + batch_size])[2] for i in range(0, len(crops), batch_size)])
        flat = nll.flatten().double().numpy()
        return {"lambda_s": float(np.quantile(flat, LAMBDA_S_QUANTILE)),
                "lambda_p": float(np.quantile(flat, LAMBDA_P_QUANTILE))}

    def pixel_map(self, crops: np.ndarray, restorations: int = 3, seed: int = 0) -> np.ndarray:
        """Document 002's restoration map, parallel mode (one prior pass per crop; see
        scoring/restoration.py), resized to the crops."""
        from flowood_ray.scoring.restoration import restoration_map

        if "lambda_p" not in self.bundle.extra:
            raise ValueError(f"{self.model_id} has no lambda_p: calibrate it before asking for restoration maps")
        x, _, _ = self.encode(crops)
        result = restoration_map(self.vqvae, self.prior, x, lambda_p=float(self.bundle.extra["lambda_p"]),
                                 n_restorations=restorations, generator=torch.Generator().manual_seed(seed))
        maps = torch.nn.functional.interpolate(result.pixel_map[:, None].float(), size=crops.shape[1:3],
                                               mode="bilinear")
        return maps[:, 0].cpu().numpy()


class ClipFlowScorer(Scorer):
    """Seed 000's video-level route: NLL of clip embeddings under a RealNVP fitted to real clips, in nats
    per embedding dimension, and the clip autoencoder's reconstruction error beside it."""

    family = "clip"
    primary = "clip_nll"
    scores_clips = True

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.autoencoder: ClipAutoencoder = bundle.modules["encoder"]  # type: ignore[assignment]
        self.flow: RealNVP = bundle.modules["flow"]  # type: ignore[assignment]
        self.image_size = self.autoencoder.config.image_size
        self.clip_frames = self.autoencoder.config.clip_frames

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """`crops` are one video's crops in temporal order; each gets the mean score of its clips."""
        frames = self.model_input(crops).cpu().numpy()
        clips, starts = cut_clips(frames, self.clip_frames)
        x = self.autoencoder.prepare(torch.from_numpy(clips).to(self.device))
        embedding = self.autoencoder.encoder(x)
        per_clip = {
            "clip_nll": (-self.flow.log_prob(embedding) / embedding.shape[1]).double(),
            "clip_recon": (self.autoencoder.decode(embedding) - x).pow(2).flatten(1).mean(1).double(),
        }
        return {k: frame_means(v.cpu().numpy(), starts, self.clip_frames, len(crops)) for k, v in per_clip.items()}


class ClassifierScorer(Scorer):
    """Seed 004: the supervised classifier's fake log-odds, three out-of-distribution readings of it
    (MSP, energy, ODIN), its reconstruction error, the abnormality module trained on synthetic
    outliers, and the two detectors together: a face is flagged if it looks like a known
    manipulation or like none of the faces the classifier was trained on."""

    family = "classifier"
    primary = "cls_fake_or_abnormal"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.classifier: FakeClassifier = bundle.modules["classifier"]  # type: ignore[assignment]
        self.abnormality: AbnormalityModule = bundle.modules["abnormality"]  # type: ignore[assignment]
        self.image_size = self.classifier.config.image_size

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        x = preprocess(self.model_input(crops), 8, "center")
        with torch.no_grad():
            output = self.classifier(x)
            abnormal = self.abnormality(auxiliary(output, x, self.abnormality.config.residual_grid))
        fake = output.logits[:, 1] - output.logits[:, 0]
        scores = {
            "cls_fake": fake,
            "cls_msp": 1 - output.logits.softmax(dim=1).max(dim=1).values,
            "cls_energy": -torch.logsumexp(output.logits, dim=1),
            "cls_odin": odin_score(self.classifier, x),
            "cls_recon": (output.recon - x).abs().flatten(1).mean(1),
            "cls_abnormality": abnormal,
            "cls_fake_or_abnormal": fake_or_abnormal(fake, abnormal),
        }
        return {k: v.detach().double().cpu().numpy() for k, v in scores.items()}


class CFlowScorer(Scorer):
    """Seed 003's CFLOW-AD: a per-pixel anomaly map from conditional flows on frozen ImageNet features,
    and its maximum, top-k mean and mean as image scores."""

    family = "cflow"
    primary = "cflow_topk"
    map_name = "cflow"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.encoder: EfficientNetLite = bundle.modules["encoder"]  # type: ignore[assignment]
        self.decoders: CFlowDecoders = bundle.modules["cflow"]  # type: ignore[assignment]
        self.image_size = self.decoders.config.image_size
        stored = bundle.extra.get("cflow_reference")
        # stride -> (mean, std) of real training crops' per-position log-likelihood; None before calibration.
        self.reference = {int(k): (float(v[0]), float(v[1])) for k, v in stored.items()} if stored else None

    @torch.no_grad()
    def log_likelihoods(self, crops: np.ndarray) -> dict[int, torch.Tensor]:
        return self.decoders.log_likelihood_maps(self.encoder.features(self.model_input(crops)))

    def reference_statistics(self, crops: np.ndarray, batch_size: int = 64) -> dict[str, object]:
        parts = [self.log_likelihoods(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
        values = {s: torch.cat([p[s].flatten() for p in parts]).double() for s in parts[0]}
        return {"cflow_reference": {str(s): [float(v.mean()), float(v.std())] for s, v in values.items()}}

    def _maps(self, crops: np.ndarray) -> torch.Tensor:
        if self.reference is None:
            raise ValueError(f"{self.model_id} has no reference statistics yet: calibrate it before scoring")
        return anomaly_map(self.log_likelihoods(crops), self.reference, self.image_size)

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        return self.score_and_map(crops)[0]

    def pixel_map(self, crops: np.ndarray) -> np.ndarray:
        return self.score_and_map(crops)[1]

    def score_and_map(self, crops: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        maps = self._maps(crops)
        scores = {k: v.double().cpu().numpy() for k, v in image_scores(maps, self.decoders.config.top_k_fraction).items()}
        resized = torch.nn.functional.interpolate(maps[:, None], size=crops.shape[1:3], mode="bilinear",
                                                  align_corners=False)
        return scores, resized[:, 0].cpu().numpy()


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


def _resized(maps: torch.Tensor, crops: np.ndarray) -> np.ndarray:
    """(N, h, w) maps -> float32 numpy at the crops' own resolution (bilinear)."""
    resized = torch.nn.functional.interpolate(maps[:, None], size=crops.shape[1:3], mode="bilinear",
                                              align_corners=False)
    return resized[:, 0].cpu().numpy()


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
        return {"differnet_nll": scores}, _resized(torch.cat([p[1] for p in parts]), crops)


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


class PatchSVDDScorer(Scorer):
    """Seed 003's Patch SVDD score: each fibre's distance to its nearest real training fibre, as a
    standardised map and its maximum, top-k mean and mean."""

    family = "patchsvdd"
    primary = "patchsvdd_topk"
    map_name = "patchsvdd"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.encoder: EfficientNetLite = bundle.modules["encoder"]  # type: ignore[assignment]
        self.bank: PatchBank = bundle.modules["patchsvdd"]  # type: ignore[assignment]
        self.image_size = self.bank.config.image_size
        stored = bundle.extra.get("patchsvdd_reference")
        # stride -> (mean, std) of real training crops' fibre distances; None before calibration.
        self.reference = {int(k): (float(v[0]), float(v[1])) for k, v in stored.items()} if stored else None

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
        return {"patchsvdd_reference": reference}

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        return self.score_and_map(crops)[0]

    def pixel_map(self, crops: np.ndarray) -> np.ndarray:
        return self.score_and_map(crops)[1]

    def score_and_map(self, crops: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if self.reference is None:
            raise ValueError(f"{self.model_id} has no reference statistics yet: calibrate it before scoring")
        maps = patch_anomaly_map(self.distances(crops), self.reference, self.image_size)
        scores = patch_image_scores(maps, self.bank.config.top_k_fraction)
        return {k: v.double().cpu().numpy() for k, v in scores.items()}, _resized(maps, crops)


SCORERS: dict[str, type[Scorer]] = {
    "glow": GlowScorer, "vqvae": VQVAEScorer, "clip": ClipFlowScorer, "patch": PatchScorer,
    "classifier": ClassifierScorer, "blend": BlendScorer, "cflow": CFlowScorer,
    "differnet": DifferNetScorer, "svdd": DeepSVDDScorer, "patchsvdd": PatchSVDDScorer,
}


def build_scorer(bundle: ModelBundle, device: str | torch.device = "cpu") -> Scorer:
    if bundle.family not in SCORERS:
        raise ValueError(f"no scorer for model family {bundle.family!r}")
    return SCORERS[bundle.family](bundle, device)


def score_videos(scorer: Scorer, crops: np.ndarray, video_ids: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Frame scores of many videos' crops; the rows of each video must be contiguous and in temporal order."""
    if len(crops) != len(video_ids):
        raise ValueError(f"{len(crops)} crops but {len(video_ids)} video ids")
    bounds = np.flatnonzero(np.r_[True, video_ids[1:] != video_ids[:-1], True])
    if len(np.unique(video_ids)) != len(bounds) - 1:
        raise ValueError("the crops of each video must be contiguous")
    parts = [scorer.score_video(crops[a:b], batch_size) for a, b in zip(bounds[:-1], bounds[1:])]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
