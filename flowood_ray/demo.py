"""`flowood demo`: the whole product on one machine with embedded defaults.

synthesise an archive -> crop faces (with face meshes) on Ray Data -> train every family with DDP on
Ray Train: Glow, the VQ-VAE, the clip flow, the patch-texture flow, the supervised classifier, the
real-only blend detector, and CFLOW and DifferNet on the ImageNet encoder -> register and promote in
MLflow (SQLite in the work directory) -> score the test split -> report. Each family is trained small here; the
README gives the full-size recipes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class DemoConfig(BaseModel):
    identities: int = 8
    videos_per_identity: int = 2
    frames_per_video: int = 48
    frame_size: int = 256
    crop_size: int = 64
    sampled_frames: int = 24
    workers: int = 2
    glow_epochs: int = 8
    vqvae_epochs: int = 8
    clip_epochs: int = 8
    patch_epochs: int = 8
    # The classifier's epochs (EfficientNet fine-tuning on reals and fakes, then the abnormality
    # module) are the demo's largest cost; 4 of them leave room for DifferNet within 20 minutes.
    classifier_epochs: int = 4
    blend_epochs: int = 6
    cflow_epochs: int = 6
    differnet_epochs: int = 4
    batch_size: int = 32
    seed: int = 0
    glow: dict[str, Any] = Field(
        default_factory=lambda: {"glow": {"image_size": 64, "levels": 3, "steps_per_level": 4, "hidden_channels": 64}}
    )
    vqvae: dict[str, Any] = Field(
        default_factory=lambda: {
            "vqvae": {"image_size": 64, "hidden_channels": 64, "res_channels": 32, "n_res_blocks": 1,
                      "codebook_size": 128, "code_dim": 32, "downsample_levels": 2},
            "prior": {"channels": 64, "n_blocks": 2, "n_res_blocks": 1, "key_channels": 32, "n_heads": 2},
        }
    )
    # A few dozen training clips: a narrow embedding and a bottlenecked flow keep it from memorising them.
    clip: dict[str, Any] = Field(
        default_factory=lambda: {
            "encoder": {"image_size": 64, "clip_frames": 8, "encoder": {"widths": [16, 32, 64], "embed_dim": 32}},
            "flow": {"n_layers": 6, "hidden": 64, "bottleneck": 16},
        }
    )
    # One LU-linear + coupling layer over 8x8 high-pass patches: little more than a full-covariance
    # Gaussian of real texture, which generalised to unseen people better than deeper flows did.
    patch: dict[str, Any] = Field(
        default_factory=lambda: {
            "patch": {"image_size": 64, "patch": 8, "stride": 4, "n_layers": 1, "hidden": 32, "bottleneck": 4}
        }
    )
    classifier: dict[str, Any] = Field(
        default_factory=lambda: {"classifier": {"image_size": 64}, "abnormality": {"hidden": 64}}
    )
    blend: dict[str, Any] = Field(default_factory=lambda: {"detector": {"image_size": 64}})
    cflow: dict[str, Any] = Field(
        default_factory=lambda: {"cflow": {"image_size": 64, "strides": [8, 16], "coupling_layers": 4}}
    )
    differnet: dict[str, Any] = Field(
        default_factory=lambda: {"differnet": {"image_size": 64, "coupling_layers": 4, "hidden": 256}}
    )


# Trained, registered and scored in this order; each has `<name>_epochs` and `<name>` (model configs) above.
DEMO_FAMILIES = ("glow", "vqvae", "clip", "patch", "classifier", "blend", "cflow", "differnet")


def run_demo(workdir: Path, config: DemoConfig) -> dict[str, Any]:
    from flowood_ray.cluster.preprocess import run_preprocess
    from flowood_ray.cluster.score import run_score
    from flowood_ray.cluster.train import TrainConfig
    from flowood_ray.cluster.train_job import train_and_register
    from flowood_ray.evaluate import evaluate
    from flowood_ray.media.datasets import build_manifest
    from flowood_ray.media.faces import CropConfig
    from flowood_ray.media.sampling import SamplingConfig
    from flowood_ray.media.synth import generate_benchmark
    from flowood_ray.media.synth_plan import SynthConfig
    from flowood_ray.registry import promote

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(step: str) -> None:
        timings[step] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log.info("demo step %s done in %.1f s", step, timings[step])

    archive = workdir / "archive"
    if not (archive / "synth_meta.json").exists():
        generate_benchmark(archive, SynthConfig(
            identities=config.identities, videos_per_identity=config.videos_per_identity, seed=config.seed,
            frames=config.frames_per_video, size=config.frame_size, workers=config.workers,
        ))
    lap("synthesise")
    manifest = build_manifest(archive)
    sampling = SamplingConfig(num_frames=config.sampled_frames)
    crops = workdir / "crops"
    run_preprocess(manifest.filter(pc.not_equal(manifest.column("split"), "test")), crops, sampling,
                   CropConfig(size=config.crop_size, face_mesh=True), workers=config.workers)
    lap("preprocess")
    versions = {}
    for family in DEMO_FAMILIES:
        summary = train_and_register(
            crops, TrainConfig(family=family, epochs=getattr(config, f"{family}_epochs"), batch_size=config.batch_size,
                               workers=config.workers, seed=config.seed),
            getattr(config, family), f"demo-{family}", workdir / "ray_results", tracking_uri,
        )
        promote(summary["name"], summary["version"])
        versions[family] = {k: v for k, v in summary.items() if k != "calibration"}
        lap(f"train_{family}")
    scores = workdir / "scores"
    run_score(
        manifest.filter(pc.equal(manifest.column("split"), "test")), scores,
        [f"models:/flowood-{family}@champion" for family in DEMO_FAMILIES], sampling,
        workers=config.workers, save_crops=True, tracking_uri=tracking_uri,
    )
    lap("score")
    rows = evaluate(scores, tracking_uri=tracking_uri)
    lap("evaluate")
    summary = {"workdir": str(workdir), "models": versions, "timings_s": timings,
               "report": str(scores / "report.html"), "metrics": str(scores / "metrics.json")}
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return {**summary, "rows": rows}
