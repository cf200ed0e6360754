"""`flowood cluster up/down`: a local Ray head and MLflow server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowood_ray.cli.common import StateOption, cluster_app

if TYPE_CHECKING:
    pass

@cluster_app.command("up")
def cluster_up(
    state_dir: StateOption = Path(".flowood-cluster"),
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the head offers (default: all)")] = None,
    dashboard_port: int = 8265,
    mlflow_port: int = 5000,
) -> None:
    """Start a Ray head node with token auth and an MLflow server (SQLite + local artifacts) on loopback."""
    from flowood_ray.cluster.local import LocalCluster, up

    cluster = LocalCluster(state_dir, num_cpus=num_cpus, dashboard_port=dashboard_port, mlflow_port=mlflow_port)
    up(cluster)
    typer.echo(f"source {state_dir / 'env'}   # then: ray job submit --working-dir . -- python jobs/train.py ...")


@cluster_app.command("down")
def cluster_down(state_dir: StateOption = Path(".flowood-cluster")) -> None:
    """Stop the local Ray head and MLflow server (their data stays)."""
    from flowood_ray.cluster.local import down

    down(state_dir)
