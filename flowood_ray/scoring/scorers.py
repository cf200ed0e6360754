"""Scorers: plain PyTorch functions from uint8 face crops to named per-crop scores.

Every score is computed per crop in eval mode, so a crop's score never depends on the rest
of its batch. Higher always means more anomalous. `aggregate` turns a video's frame scores
into video scores; calibration and archive scoring both go through it, so thresholds and
scores are always computed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from flowood_ray.media.facecrop import ModelInput, model_input
from flowood_ray.models.glow import Glow, preprocess
from flowood_ray.models.vqvae import VQVAE, PixelSNAIL
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.aggregate import aggregate_frames


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

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        self.bundle = bundle
        self.model_id = bundle.model_id
        self.device = torch.device(device)
        for module in bundle.modules.values():
            module.to(self.device).eval()
        self.input = ModelInput(**bundle.extra.get("input", {}))

    image_size: int

    def model_input(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 crops (N, H, W, 3) -> uint8 model inputs on the device, exactly as in training."""
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"expected uint8 crops (N, H, W, 3), got {crops.dtype} {crops.shape}")
        return torch.from_numpy(np.array(model_input(crops, self.image_size, self.input))).to(self.device)

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def aggregate(self, video_ids: np.ndarray, scores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(sorted unique video ids, video score per name): the mean of frame scores by default."""
        out: dict[str, np.ndarray] = {}
        ids = np.unique(video_ids)
        for name, values in scores.items():
            ids, out[name] = aggregate_frames(video_ids, values, "mean")
        return ids, out


class GlowScorer(Scorer):
    """Raw bits/dim and three corrections of the likelihood pathology of pixel flows (seed 000):
    input complexity (Serra et al.), a likelihood ratio against a background model trained on
    pixel-mutated reals (Ren et al.), and typicality against the real-data entropy (Nalisnick et al.)."""

    family = "glow"
    primary = "glow_typicality"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.glow: Glow = bundle.modules["glow"]  # type: ignore[assignment]
        self.background: Glow = bundle.modules["background"]  # type: ignore[assignment]
        self.image_size = self.glow.config.image_size
        self.entropy_bpd: float | None = bundle.extra.get("entropy_bpd")

    @torch.no_grad()
    def bits_per_dim(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = self.model_input(crops)
        x = preprocess(images, self.glow.config.n_bits, "center")
        bpd = self.glow.bits_per_dim(x).double().cpu().numpy()
        background = self.background.bits_per_dim(x).double().cpu().numpy()
        return bpd, background, png_bits_per_dim(images.cpu().numpy())

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        bpd, background, complexity = self.bits_per_dim(crops)
        scores = {"glow_bpd": bpd, "glow_complexity": bpd - complexity, "glow_lr": bpd - background}
        if self.entropy_bpd is not None:
            scores["glow_typicality"] = np.abs(bpd - self.entropy_bpd)
        return scores

    def aggregate(self, video_ids: np.ndarray, scores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids, out = super().aggregate(video_ids, {k: v for k, v in scores.items() if k != "glow_typicality"})
        if "glow_typicality" in scores and self.entropy_bpd is not None:
            # Typicality is a test on the clip's mean NLL, not the mean of per-frame distances.
            _, mean_bpd = aggregate_frames(video_ids, scores["glow_bpd"], "mean")
            out["glow_typicality"] = np.abs(mean_bpd - self.entropy_bpd)
        return ids, out


class VQVAEScorer(Scorer):
    """Document 002's sample score (latent NLL above lambda_s) plus the mean code NLL and the
    plain reconstruction error."""

    family = "vqvae"
    primary = "vq_latent_nll"

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        super().__init__(bundle, device)
        self.vqvae: VQVAE = bundle.modules["vqvae"]  # type: ignore[assignment]
        self.prior: PixelSNAIL = bundle.modules["prior"]  # type: ignore[assignment]
        self.image_size = self.vqvae.config.image_size
        # lambda_s: per-position NLL quantile of real validation codes; None before calibration.
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


SCORERS: dict[str, type[Scorer]] = {"glow": GlowScorer, "vqvae": VQVAEScorer}


def build_scorer(bundle: ModelBundle, device: str | torch.device = "cpu") -> Scorer:
    if bundle.family not in SCORERS:
        raise ValueError(f"no scorer for model family {bundle.family!r}")
    return SCORERS[bundle.family](bundle, device)
