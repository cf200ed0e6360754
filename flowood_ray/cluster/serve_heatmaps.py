"""`?heatmap=1`: Marimont & Tarroni's restoration maps of the VQ-VAE family, colour-mapped over the aligned
crops as PNGs. Restorations are drawn in the parallel mode (one prior pass per crop), which reads the
served modules without changing them, so maps can be made while the same model scores other requests."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import torch

from flowood_ray.cluster.serve_models import ServedModel
from flowood_ray.cluster.serve_schemas import Heatmap
from flowood_ray.cluster.serve_settings import ServeSettings
from flowood_ray.media.facecrop import resize_crops
from flowood_ray.models.glow import preprocess
from flowood_ray.scoring.restoration import restoration_map
from flowood_ray.scoring.scorers import VQVAEScorer


def restoration_heatmaps(model: ServedModel, crops: np.ndarray, settings: ServeSettings) -> list[Heatmap]:
    """Restoration pixel maps of aligned crops, colour-mapped on a fixed scale so requests compare by eye."""
    scorer = model.scorer
    assert isinstance(scorer, VQVAEScorer) and model.lambda_p is not None
    images = preprocess(torch.from_numpy(resize_crops(crops, scorer.image_size)).to(scorer.device), 8, "center")
    # Batch-independent restorations seeded from the crop's bytes: the same face gets the same map.
    result = restoration_map(
        scorer.vqvae, scorer.prior, images, model.lambda_p, settings.heatmap_restorations,
        generator=torch.Generator().manual_seed(settings.heatmap_seed),
    )
    size = crops.shape[1]
    maps = []
    for crop, values in zip(crops, result.pixel_map.double().cpu().numpy()):
        up = cv2.resize(values.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        levels = np.clip(up / settings.heatmap_vmax * 255.0, 0, 255).astype(np.uint8)
        maps.append(Heatmap(
            kind="restoration", png_base64=_png_base64(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)),
            crop_png_base64=_png_base64(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)), vmax=settings.heatmap_vmax,
            max_value=float(values.max()),
        ))
    return maps


def _png_base64(bgr: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(png.tobytes()).decode("ascii")

