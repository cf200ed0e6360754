"""Scorers: plain PyTorch functions from uint8 face crops to named per-crop scores.

Every score is computed per crop in eval mode, so a crop's score never depends on the rest
of its batch. Higher always means more anomalous.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np
import torch

from flowood_ray.media.facecrop import resize_crops
from flowood_ray.models.glow import Glow, preprocess
from flowood_ray.models.vqvae import VQVAE, PixelSNAIL
from flowood_ray.registry import ModelBundle


class Scorer(Protocol):
    image_size: int
    model_id: str

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]: ...


def png_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """Lossless PNG code length per sub-pixel: Serra et al.'s input-complexity estimate L(x)."""
    dims = images[0].size
    return np.array(
        [8.0 * len(cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]) / dims for img in images]
    )


def _as_tensor(crops: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops (N, H, W, 3), got {crops.dtype} {crops.shape}")
    return torch.from_numpy(np.ascontiguousarray(resize_crops(crops, size))).to(device)


class GlowScorer:
    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        self.glow: Glow = bundle.modules["glow"].to(device).eval()  # type: ignore[assignment]
        self.image_size = self.glow.config.image_size
        self.model_id = bundle.model_id
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        images = _as_tensor(crops, self.image_size, self.device)
        bpd = self.glow.bits_per_dim(preprocess(images, self.glow.config.n_bits, "center")).double().cpu().numpy()
        complexity = png_bits_per_dim(images.cpu().numpy())
        return {"glow_bpd": bpd, "glow_complexity": bpd - complexity}


class VQVAEScorer:
    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu") -> None:
        self.vqvae: VQVAE = bundle.modules["vqvae"].to(device).eval()  # type: ignore[assignment]
        self.prior: PixelSNAIL = bundle.modules["prior"].to(device).eval()  # type: ignore[assignment]
        self.image_size = self.vqvae.config.image_size
        self.model_id = bundle.model_id
        self.device = torch.device(device)
        # lambda_s: per-position NLL quantile of real validation codes; None before calibration.
        self.lambda_s: float | None = bundle.extra.get("lambda_s")

    @torch.no_grad()
    def code_nll(self, crops: np.ndarray) -> torch.Tensor:
        images = _as_tensor(crops, self.image_size, self.device)
        codes = self.vqvae.encode(preprocess(images, 8, "center"))
        return self.prior.nll_map(codes)

    def score(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        nll = self.code_nll(crops).double()
        scores = {"vq_code_nll": nll.flatten(1).mean(1).cpu().numpy()}
        if self.lambda_s is not None:
            # Sample score of Marimont & Tarroni: only latents unlikely under the prior count.
            scores["vq_latent_nll"] = torch.where(nll > self.lambda_s, nll, 0.0).flatten(1).sum(1).cpu().numpy()
        return scores


def build_scorer(bundle: ModelBundle, device: str | torch.device = "cpu") -> Scorer:
    scorers = {"glow": GlowScorer, "vqvae": VQVAEScorer}
    if bundle.family not in scorers:
        raise ValueError(f"no scorer for model family {bundle.family!r}")
    return scorers[bundle.family](bundle, device)
