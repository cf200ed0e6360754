"""`flowood train FAMILY`: fit a family with Ray Train DDP, calibrate it on real crops, register it.

The same command runs locally or as the entry point of `ray job submit` (jobs/ only wrap it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flowood_ray.cli.common import TrackingOption, app, fail


@app.command()
def train(
    family: Annotated[str, typer.Argument(help="glow, vqvae, clip, patch, classifier, blend, cflow, ...")],
    data: Annotated[Path, typer.Option(help="face-crop shards from `flowood preprocess`")],
    epochs: Annotated[int, typer.Option(help="epochs per training phase")] = 10,
    batch_size: Annotated[int, typer.Option(help="per worker")] = 64,
    lr: Annotated[float | None, typer.Option(help="Adam's learning rate (default: the family's own)")] = None,
    workers: Annotated[int, typer.Option(help="DDP workers")] = 2,
    gpu: Annotated[bool, typer.Option(help="one GPU per worker (NCCL)")] = False,
    seed: int = 0,
    face_fraction: Annotated[float, typer.Option(help="central part of each crop the model sees")] = 1.0,
    highpass: Annotated[bool, typer.Option(help="model the high-frequency residual of the crops")] = False,
    fake_methods: Annotated[list[str] | None, typer.Option(
        help="supervised families only: learn from these methods' fakes (repeatable; default all); leave one "
        "out to measure how the detector meets an unseen method")] = None,
    model_config: Annotated[str, typer.Option(help='JSON, e.g. {"glow": {"levels": 3}}')] = "{}",
    run_name: Annotated[str | None, typer.Option(help="reuse a name to resume a killed run (default FAMILY-DATA)")] = None,
    storage: Annotated[Path, typer.Option(help="checkpoints (shared storage on a cluster)")] = Path("ray_results"),
    tracking_uri: TrackingOption = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS, else a local Ray)")] = None,
) -> None:
    """Train a detector family with DDP on Ray Train, calibrate it on real validation crops, register it."""
    from pydantic import ValidationError

    from flowood_ray.cluster.train import TrainConfig
    from flowood_ray.cluster.train_job import train_and_register
    from flowood_ray.media.facecrop import ModelInput

    try:
        configs = json.loads(model_config)
        config = TrainConfig(
            family=family, epochs=epochs, batch_size=batch_size, lr=lr, workers=workers, use_gpu=gpu, seed=seed,
            input=ModelInput(face_fraction=face_fraction, highpass=highpass), fake_methods=fake_methods or None,
        )
        summary = train_and_register(data, config, configs, run_name or f"{family}-{data.resolve().name}", storage,
                                     tracking_uri, address)
    except (ValidationError, ValueError, json.JSONDecodeError) as exc:
        fail(str(exc))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "calibration"}, indent=2))


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    reals: Annotated[Path, typer.Option(help="known-real videos of your archive's domain (folder, CSV or manifest)")],
    alias: Annotated[str, typer.Option(help="alias of the recalibrated version, e.g. archive-2026")],
    work: Annotated[Path, typer.Option(help="where the reference scores are kept")] = Path("calibrate_out"),
    frames: Annotated[int | None, typer.Option(
        help="frames per video, uniformly sampled (default: a clip model's training sampling, else 32)")] = None,
    local: Annotated[bool, typer.Option(help="score in this process, without Ray")] = False,
    workers: Annotated[int | None, typer.Option(help="scoring actors (default: all cluster CPUs)")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Recalibrate a registered model on known-real videos and register the result under a new alias."""
    from mlflow.exceptions import MlflowException

    from flowood_ray.cli.data import load_manifest
    from flowood_ray.cluster.recalibrate import recalibrate
    from flowood_ray.media.sampling import SamplingConfig

    table = load_manifest(reals, "auto")
    try:
        sampling = None if frames is None else SamplingConfig(num_frames=frames)
        summary = recalibrate(model, table, work, alias, sampling=sampling,
                              tracking_uri=tracking_uri, local=local, workers=workers)
    except (ValueError, MlflowException) as exc:
        fail(str(exc))
    typer.echo(json.dumps(summary, indent=2, default=str))
