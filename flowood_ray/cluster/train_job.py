"""A whole training job as the driver sees it: MLflow run -> DDP fit -> real-only calibration -> registry."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flowood_ray.cluster.train import TrainConfig, fit, system_info
from flowood_ray.media.facecrop import model_input
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import CONFIG_FILE, read_crop_images, read_videos, real_split_ids
from flowood_ray.models.baselines import DiagonalGaussian
from flowood_ray.models.catalog import family, parse_configs
from flowood_ray.models.glow import preprocess
from flowood_ray.registry import ModelBundle, code_version, configure, register_bundle
from flowood_ray.scoring.calibration import calibrate
from flowood_ray.scoring.scorers import build_scorer, score_videos

log = logging.getLogger(__name__)

SCORE_BATCH = 256
# Reference statistics (typicality entropy, lambda quantiles, CFLOW's per-scale statistics) come from
# at most this many real training crops, evenly spread over them.
REFERENCE_CROPS = 512


def calibrate_bundle(
    bundle: ModelBundle, train_images: np.ndarray, val_images: np.ndarray, val_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Fill in the bundle's reference statistics from real TRAINING crops, then its thresholds from real
    VALIDATION crops (two disjoint sets, so the stated false-positive rates are not optimistic); returns
    the validation frame scores."""
    bundle.extra.update(build_scorer(bundle).reference_statistics(train_images))
    scorer = build_scorer(bundle)
    scores = score_videos(scorer, val_images, val_ids, SCORE_BATCH)
    frame = calibrate(scores, "frame", groups=val_ids)
    _, per_video = scorer.aggregate(val_ids, scores)
    # Validation splits hold few videos; video thresholds are then near the sample maximum (logged).
    video = calibrate(per_video, "video", min_samples=3)
    bundle.calibration = {
        "frame": {k: v.model_dump(mode="json") for k, v in frame.items()},
        "video": {k: v.model_dump(mode="json") for k, v in video.items()},
        "video_aggregation": "mean",
        "primary": scorer.primary,
    }
    return scores


def glow_vs_gaussian_bpd(glow: torch.nn.Module, train: np.ndarray, val: np.ndarray) -> tuple[float, float]:
    """Validation bits/dim of Glow and of a per-pixel Gaussian fitted to the train crops, on the same
    uniformly dequantised validation pixels: the Gaussian is the floor a flow has to beat."""
    n_bits = glow.config.n_bits
    generator = torch.Generator().manual_seed(0)
    x_train = preprocess(torch.from_numpy(train), n_bits, "uniform", generator).flatten(1).double()
    x_val = preprocess(torch.from_numpy(val), n_bits, "uniform", generator)
    dims = x_val[0].numel()
    gaussian = DiagonalGaussian.fit(x_train)
    gauss_bpd = (-gaussian.log_prob(x_val.flatten(1).double()) + dims * math.log(2**n_bits)) / (dims * math.log(2))
    with torch.no_grad():
        glow_bpd = torch.cat([glow.bits_per_dim(x_val[i : i + SCORE_BATCH]) for i in range(0, len(x_val), SCORE_BATCH)])
    return float(glow_bpd.mean()), float(gauss_bpd.mean())


def _find_or_create_run(experiment: str, run_name: str) -> str:
    """The unfinished MLflow run of an earlier attempt with this name, so a rerun resumes into it."""
    import mlflow

    exp = mlflow.set_experiment(experiment)
    previous = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`flowood.run_name` = '{run_name}' and attributes.status != 'FINISHED'",
        output_format="list",
    )
    if previous:
        log.info("resuming MLflow run %s", previous[0].info.run_id)
        return previous[0].info.run_id
    run = mlflow.MlflowClient().create_run(exp.experiment_id, run_name=run_name, tags={"flowood.run_name": run_name})
    return run.info.run_id


def train_and_register(
    crops_dir: Path,
    train: TrainConfig,
    model_configs: dict[str, dict[str, Any]],
    run_name: str,
    storage_path: Path,
    tracking_uri: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    import mlflow
    from mlflow.entities import Param

    uri = configure(tracking_uri)
    parsed = parse_configs(train.family, model_configs)
    configs = {k: v.model_dump(mode="json") for k, v in parsed.items()}
    run_id = _find_or_create_run(f"flowood-{train.family}", run_name)
    client = mlflow.MlflowClient()
    # Through the client, not `mlflow.start_run`: leaving that context would mark the run FINISHED, and a
    # killed attempt's run would no longer be found (and resumed into) by the rerun.
    params = {f"train.{k}": v for k, v in train.model_dump().items()}
    params |= {f"system.{k}": v for k, v in system_info().items()}
    params |= {"code_version": code_version(), "crops_dir": str(Path(crops_dir).resolve())}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_dict(run_id, configs, "model_configs.json")
    modules, _ = fit(crops_dir, train, configs, run_name, storage_path, uri, run_id, address)

    videos = read_videos(crops_dir)
    size = family(train.family).image_size(parsed)
    val_images, val_ids = read_crop_images(crops_dir, real_split_ids(videos, "val"))
    train_images, _ = read_crop_images(crops_dir, real_split_ids(videos, "train"))
    reference = train_images[np.linspace(0, len(train_images) - 1, min(REFERENCE_CROPS, len(train_images))).astype(int)]
    # Scoring must crop faces exactly as the training crops were made (margin, alignment).
    preprocessed = json.loads((Path(crops_dir) / CONFIG_FILE).read_text())
    crop_config = preprocessed["crop"]
    crop_config["face_mesh"] = False  # the mesh only serves training-time self-blends; scoring skips it
    extra: dict[str, Any] = {"crop": crop_config, "input": train.input.model_dump()}
    if family(train.family).clip_frames is not None:
        # A training clip is a window of consecutive sampled crops, so the sampling sets its frame spacing;
        # scoring and serving sample such a model's videos the same way (score.clip_sampling).
        extra["sampling"] = SamplingConfig(**preprocessed["sampling"]).model_dump(mode="json")
    bundle = ModelBundle(
        family=train.family, configs=configs, modules=modules, code_version=code_version(), extra=extra,
    )
    scores = calibrate_bundle(bundle, reference, val_images, val_ids)
    summary: dict[str, Any] = {"run_id": run_id, "val_frames": len(val_images)}
    if train.family == "glow":
        glow_bpd, gauss_bpd = glow_vs_gaussian_bpd(
            modules["glow"], model_input(train_images, size, train.input), model_input(val_images, size, train.input)
        )
        summary.update(val_bpd_glow=glow_bpd, val_bpd_diagonal_gaussian=gauss_bpd)
        client.log_metric(run_id, "final_val_bpd_glow", glow_bpd)
        client.log_metric(run_id, "final_val_bpd_diagonal_gaussian", gauss_bpd)
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.table({"video_id": val_ids, **{k: v for k, v in scores.items()}})
        pq.write_table(table, Path(tmp) / "calibration_scores.parquet")
        client.log_artifact(run_id, str(Path(tmp) / "calibration_scores.parquet"))
    summary["version"] = register_bundle(bundle, run_id)
    summary["name"] = f"flowood-{train.family}"
    summary["calibration"] = bundle.calibration
    client.set_terminated(run_id, "FINISHED")
    log.info("%s", json.dumps({k: v for k, v in summary.items() if k != "calibration"}))
    return summary
