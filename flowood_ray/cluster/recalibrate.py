"""`flowood calibrate`: new thresholds for a registered model from known-real videos of the user's domain.

A model calibrated on its own validation reals flags far more than its stated rate on footage from
another camera, codec or population. Recalibrating scores the user's reference reals with the model as
it is (same weights, same reference statistics), sets every threshold from those scores only, and
registers the result as a new version under an alias the user names, so the original stays as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowood_ray.cluster.score import read_scores, run_score
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.registry import ModelBundle, code_version, configure, load_registered, register_bundle, resolve_version
from flowood_ray.scoring.calibration import DEFAULT_FPRS, calibrate
from flowood_ray.scoring.conformal import require_calibration_size
from flowood_ray.scoring.scorers import build_scorer

log = logging.getLogger(__name__)


def recalibrate(
    model_uri: str,
    reals: pa.Table,
    work: Path,
    alias: str,
    fprs: Sequence[float] = DEFAULT_FPRS,
    sampling: SamplingConfig | None = None,
    tracking_uri: str | None = None,
    local: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Score the manifest `reals` (known-real videos) with the model, register a recalibrated version under
    `alias`; returns its name, version and the thresholds. Refuses fakes and too few videos."""
    import mlflow
    from mlflow import MlflowClient

    if alias in ("candidate",):
        raise ValueError("'candidate' is set by training; name the recalibration's alias yourself")
    fakes = pc.sum(pc.equal(reals.column("label"), 1)).as_py() or 0
    if fakes:
        raise ValueError(f"the reference archive holds {fakes} videos labelled fake; calibration takes known reals only")
    uri = configure(tracking_uri)
    name, version = resolve_version(model_uri)
    pinned = f"models:/{name}/{version}"
    bundle = load_registered(pinned)
    scorer = build_scorer(bundle)
    run_score(reals, work, [pinned], sampling, local=local, workers=workers, tracking_uri=uri)
    videos, frames = read_scores(work)
    scored = videos.filter(pc.field("frames_scored") > 0)
    for fpr in fprs:
        require_calibration_size(scored.num_rows, fpr, "scored real videos")
    names = [n for n in bundle.calibration["frame"] if n in scored.column_names]
    frame_ids = set(scored.column("video_id").to_pylist())
    frames = frames.filter(pc.is_in(frames.column("video_id"), pa.array(sorted(frame_ids))))
    column = lambda table, n: table.column(n).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    video = calibrate({n: column(scored, n) for n in names}, "video", fprs=fprs, min_samples=1)
    frame = calibrate({n: column(frames, n) for n in names}, "frame", groups=frames.column("video_id").to_numpy(
        zero_copy_only=False), fprs=fprs, min_samples=1)
    recalibrated = ModelBundle(
        family=bundle.family, configs=bundle.configs, modules=bundle.modules, code_version=code_version(),
        extra=bundle.extra | {"recalibrated_from": {"name": name, "version": version, "videos": scored.num_rows,
                                                      "frames": frames.num_rows}},
        calibration={
            "frame": {k: v.model_dump(mode="json") for k, v in frame.items()},
            "video": {k: v.model_dump(mode="json") for k, v in video.items()},
            "video_aggregation": bundle.calibration.get("video_aggregation", "mean"), "primary": scorer.primary,
        },
    )
    experiment = mlflow.set_experiment(f"flowood-{bundle.family}")
    run = MlflowClient().create_run(experiment.experiment_id, run_name=f"recalibrate-{name}-v{version}-{alias}",
                                    tags={"flowood.recalibrated_from": pinned})
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params({"reference_videos": scored.num_rows, "reference_frames": frames.num_rows,
                           "source_version": version, "alias": alias})
    new_version = register_bundle(recalibrated, run.info.run_id, name, alias)
    MlflowClient().set_terminated(run.info.run_id, "FINISHED")
    primary = video[scorer.primary]
    log.info("%s version %s recalibrated on %d real videos as version %s (@%s)", name, version, scored.num_rows,
             new_version, alias)
    return {"name": name, "from_version": version, "version": new_version, "alias": alias,
            "videos": scored.num_rows, "frames": frames.num_rows, "primary": scorer.primary,
            "thresholds": primary.thresholds, "resolved": primary.resolved}
