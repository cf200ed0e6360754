"""`flowood cluster up/down`: a local Ray head and MLflow server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowood_ray.cli.common import StateOption, cluster_app, fail


@cluster_app.command("up")
def cluster_up(
    state_dir: StateOption = Path(".flowood-cluster"),
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the head offers (default: all)")] = None,
    ray_port: Annotated[int, typer.Option(help="the head's GCS port")] = 6380,
    dashboard_port: int = 8265,
    agent_port: Annotated[int, typer.Option(help="the head's dashboard agent, which runs submitted jobs")] = 52366,
    mlflow_port: int = 5000,
) -> None:
    """Start a Ray head node with token auth and an MLflow server (SQLite + local artifacts) on loopback."""
    from flowood_ray.cluster.local import LocalCluster, up

    cluster = LocalCluster(state_dir, ray_port=ray_port, num_cpus=num_cpus, dashboard_port=dashboard_port,
                           agent_port=agent_port, mlflow_port=mlflow_port)
    try:
        up(cluster)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"source {state_dir / 'env'}   # then: ray job submit --working-dir . -- python jobs/train.py ...")


@cluster_app.command("down")
def cluster_down(state_dir: StateOption = Path(".flowood-cluster")) -> None:
    """Stop the Ray head and MLflow server that `cluster up` started here (their data stays); other Ray
    clusters on this machine are left alone."""
    from flowood_ray.cluster.local import down

    try:
        down(state_dir)
    except ValueError as exc:
        fail(str(exc))
