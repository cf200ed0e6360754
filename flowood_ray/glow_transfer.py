"""Expression transfer between two identities with a registered Glow (seed 001), an alpha sweep scored
with the document's two measures, and the transfers as a FaceForensics++ archive for `flowood score`.

Identity = one video's crops. Each source frame's departure from the source's mean latent is put on
the target's mean latent (models/glow_latent.py has both variants). The sweep scores every output with

* likeness distance: cosine distance between the output's embedding and the embedding of the target's
  decoded mean face; the embedding is ImageNet EfficientNet-Lite0's last stride-32 feature map
  (320 channels, before the 1x1 head), globally average-pooled, on the face enlarged to 224 px;
* expression error: mean absolute difference of the three landmark measures (media/expression.py)
  between the output and its source frame, both meshed at the same resolution.

At alpha = 0 every output is the target's mean face (likeness distance 0, the source's expression
lost); larger alphas carry more expression and drift from the target: the trade-off the slides pick
alpha from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowood_ray.glow_tasks import GlowSession, read_crops, save_figure
from flowood_ray.media.datasets import load_faceforensics
from flowood_ray.media.expression import (
    expression_error,
    expression_measures,
    mesh_images,
)
from flowood_ray.media.facecrop import resize_crops
from flowood_ray.media.ffpp_layout import (
    QUALITY_CRF,
    encode_video,
    fake_path,
    real_path,
    write_splits,
)
from flowood_ray.media.landmarks import FaceMesher
from flowood_ray.media.manifest import write_manifest
from flowood_ray.models import glow_latent as gl
from flowood_ray.models.efficientnet import (
    EfficientNetLite,
    EfficientNetLiteConfig,
    freeze,
)

Variant = Literal["linear", "variance"]
METHOD = "GlowTransfer"
QUALITY = "raw"
ARCHIVE_SIDE = 256  # MediaPipe's detector misses faces much smaller than this in a frame
ARCHIVE_FPS = 25.0
EMBEDDING_STRIDE = 32
EMBEDDING_BATCH = 16


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: tuple[Variant, ...] = Field(("linear", "variance"), min_length=1)
    alphas: tuple[float, ...] = Field((0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5), min_length=1)
    half: bool = Field(False, description="use the halved expression vector (z_OS - z_MS) / 2")
    eps: float = Field(1e-2, gt=0.0, description="added to both standard deviations of the variance variant")
    archive_variant: Variant | None = Field(None, description="variant written to the archive (default: the first)")
    archive_alpha: float = 1.0

    @field_validator("variants")
    @classmethod
    def _distinct(cls, variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants repeat: {variants}")
        return variants


@dataclass(frozen=True)
class Identity:
    latents: gl.Latents
    mean: gl.Latents
    std: gl.Latents


def identity_statistics(latents: gl.Latents) -> Identity:
    return Identity(latents, gl.mean_latent(latents), gl.std_latent(latents))


def transfer(variant: Variant, source: Identity, target: Identity, alpha: float, half: bool, eps: float) -> gl.Latents:
    """Every source frame's expression on the target (one output per source frame)."""
    if variant == "linear":
        return gl.transfer_linear(source.latents, source.mean, target.mean, alpha, half)
    if variant == "variance":
        return gl.transfer_variance(source.latents, source.mean, source.std, target.mean, target.std, alpha, half, eps)
    raise ValueError(f"unknown transfer variant {variant!r}")


def likeness_encoder(device: torch.device) -> EfficientNetLite:
    return freeze(EfficientNetLite(EfficientNetLiteConfig(variant="lite0", strides=(EMBEDDING_STRIDE,)))).to(device)


@torch.no_grad()
def face_embedding(encoder: EfficientNetLite, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, s, s, 3) faces -> (N, C) pooled stride-32 features at the encoder's native resolution."""
    device = next(encoder.parameters()).device
    parts = []
    for i in range(0, len(images), EMBEDDING_BATCH):
        x = torch.from_numpy(images[i : i + EMBEDDING_BATCH]).to(device).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(encoder.native_resolution,) * 2, mode="bilinear", align_corners=False)
        parts.append(encoder.features(x)[EMBEDDING_STRIDE].mean(dim=(2, 3)))
    return torch.cat(parts)


def cosine_distance(embeddings: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """(N,) 1 - cos(embedding_i, reference); 0 for the same direction, up to 2 for opposite ones."""
    return (1.0 - F.cosine_similarity(embeddings, reference.expand_as(embeddings), dim=1)).double().cpu().numpy()


def _score(images: np.ndarray, encoder: EfficientNetLite, reference: torch.Tensor, mesher: FaceMesher,
           source_expression: np.ndarray) -> dict[str, float | None]:
    errors = expression_error(expression_measures(mesh_images(images, mesher)), source_expression)
    meshed = np.isfinite(errors)
    return {
        "likeness_distance": float(cosine_distance(face_embedding(encoder, images), reference).mean()),
        "expression_error": float(errors[meshed].mean()) if meshed.any() else None,
        "meshed_fraction": float(meshed.mean()),
    }


def run_transfer(session: GlowSession, crops_dir: Path, source_id: str, target_id: str, config: TransferConfig,
                 out: Path) -> dict[str, Any]:
    """The sweep (rows per variant and alpha), grids, transfer.json and the archive under out/archive."""
    if source_id == target_id:
        raise ValueError("source and target are the same video")
    source_inputs = session.model_inputs(read_crops(crops_dir, [source_id]).images)
    target_inputs = session.model_inputs(read_crops(crops_dir, [target_id]).images)
    source = identity_statistics(session.encode(source_inputs))
    target = identity_statistics(session.encode(target_inputs))
    encoder = likeness_encoder(session.scorer.device)
    target_face = session.images(target.mean)
    reference = face_embedding(encoder, target_face)
    rows = []
    with FaceMesher() as mesher:
        source_expression = expression_measures(mesh_images(source_inputs, mesher))
        for variant in config.variants:
            grid = [source_inputs]
            for alpha in config.alphas:
                images = session.images(transfer(variant, source, target, alpha, config.half, config.eps))
                rows.append({"variant": variant, "alpha": alpha, "half": config.half,
                             **_score(images, encoder, reference, mesher, source_expression)})
                grid.append(images)
            save_figure(out, f"transfer_{variant}.png", grid,
                        f"{variant} transfer of {source_id} (top row) onto {target_id}; one row per alpha "
                        f"({', '.join(f'{a:g}' for a in config.alphas)}){', halved expression' if config.half else ''}")
    save_figure(out, "transfer_mean_faces.png", [np.concatenate([session.images(source.mean), target_face])],
                f"mean faces of the source {source_id} (left) and the target {target_id} (right)")
    variant = config.archive_variant or config.variants[0]
    fakes = session.images(transfer(variant, source, target, config.archive_alpha, config.half, config.eps))
    archive = write_archive(out / "archive", target_id, source_id, fakes, session.images(target.latents))
    result = {
        "model": session.model_id, "source": source_id, "target": target_id, "eps": config.eps, "rows": rows,
        # The distance scale: how far each identity's own crops lie from the target's mean face.
        "reference": {
            "source_crops_to_target_mean_face": float(cosine_distance(face_embedding(encoder, source_inputs), reference).mean()),
            "target_crops_to_target_mean_face": float(cosine_distance(face_embedding(encoder, target_inputs), reference).mean()),
        },
        "archive": {"variant": variant, "alpha": config.archive_alpha, **archive},
    }
    (out / "transfer.json").write_text(json.dumps(result, indent=2))
    return result


def write_archive(root: Path, target_id: str, source_id: str, fakes: np.ndarray, reals: np.ndarray,
                  fps: float = ARCHIVE_FPS) -> dict[str, str]:
    """FF++ layout: the transfers as manipulated_sequences/GlowTransfer/raw/videos/<target>_<source>.mp4,
    the target's reconstructions as its original, both enlarged to 256 px and lossless (CRF 0); the pair
    joins splits/test.json, and root/../archive.parquet is the manifest `flowood score` can read."""
    for vid in (target_id, source_id):
        if not vid or "_" in vid or "/" in vid:
            raise ValueError(f"video id {vid!r} cannot name an FF++ file (<target>_<source>.mp4)")
    fake = fake_path(root, METHOD, QUALITY, f"{target_id}_{source_id}")
    real = real_path(root, QUALITY, target_id)
    encode_video(resize_crops(fakes, ARCHIVE_SIDE), fake, QUALITY_CRF[QUALITY], fps)
    encode_video(resize_crops(reals, ARCHIVE_SIDE), real, QUALITY_CRF[QUALITY], fps)
    split_file = root / "splits" / "test.json"
    pairs: list[tuple[str, str]] = [tuple(p) for p in json.loads(split_file.read_text())] if split_file.exists() else []
    if (target_id, source_id) not in pairs:
        pairs.append((target_id, source_id))
    write_splits(root, {"test": pairs})
    manifest = root.parent / "archive.parquet"
    write_manifest(load_faceforensics(root, QUALITY), manifest)
    return {"fake": str(fake), "real": str(real), "manifest": str(manifest)}


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a fixed-width text table."""
    lines = [f"{'variant':>9} {'alpha':>6} {'likeness_dist':>13} {'expr_error':>10} {'meshed':>6}"]
    for row in rows:
        error = "-" if row["expression_error"] is None else f"{row['expression_error']:.4f}"
        lines.append(f"{row['variant']:>9} {row['alpha']:6.2f} {row['likeness_distance']:13.4f} {error:>10} "
                     f"{row['meshed_fraction']:6.2f}")
    return "\n".join(lines)
