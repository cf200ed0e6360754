"""Scorers: plain PyTorch functions from uint8 face crops to named per-crop scores. This module holds the
whole-face families and the registry of every family's scorer; the ImageNet-encoder families are in
feature_scorers.py and the interface in scorer_base.py.

Image scorers compute every score per crop in eval mode, so a crop's score never depends on the
rest of its batch. The clip scorer scores windows of one video's consecutive crops and gives each
crop the mean of its windows, so it takes one video at a time (`score_videos` groups them).
Higher always means more anomalous. `aggregate` turns a video's frame scores into video scores;
calibration and archive scoring both go through it, so thresholds and scores are always computed
the same way.
"""

from __future__ import annotations


import cv2
import numpy as np
import torch

from flowood_ray.media.clips import cut_clips, frame_means
from flowood_ray.models.classifier import AbnormalityModule, FakeClassifier, auxiliary, fake_or_abnormal, odin_score
from flowood_ray.models.clip_embedder import ClipAutoencoder
from flowood_ray.models.glow import Glow, preprocess
from flowood_ray.models.patch_density import PatchDensity
from flowood_ray.models.realnvp import RealNVP
from flowood_ray.models.vqvae import VQVAE, PixelSNAIL
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.feature_scorers import (BlendScorer, CFlowScorer, DeepSVDDScorer, DifferNetScorer,
                                                 PatchSVDDScorer)
from flowood_ray.scoring.scorer_base import Scorer


# Per-position NLL quantiles of real training codes (Marimont & Tarroni's lambda_s and lambda_p).
LAMBDA_S_QUANTILE = 0.95
LAMBDA_P_QUANTILE = 0.90


def png_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """Lossless PNG code length per sub-pixel: Serra et al.'s input-complexity estimate L(x)."""
    dims = images[0].size
    return np.array(
        [8.0 * len(cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]) / dims for img in images]
    )


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
