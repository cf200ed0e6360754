"""The `flowood` Typer app and what its command modules share."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Deepfake detection as out-of-distribution detection, on Ray.", no_args_is_help=True)
models_app = typer.Typer(help="The MLflow model registry: train, recalibrate, list versions, move aliases.",
                         no_args_is_help=True)
cluster_app = typer.Typer(help="A local Ray head (token auth) and MLflow server for `ray job submit`.",
                          no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(cluster_app, name="cluster")

TrackingOption = Annotated[str | None, typer.Option(help="MLflow URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")]
StateOption = Annotated[Path, typer.Option(help="where the local cluster keeps its state")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
