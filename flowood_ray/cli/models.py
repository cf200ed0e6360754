"""`flowood models ...`: the registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from flowood_ray.cli.common import TrackingOption, fail, models_app

if TYPE_CHECKING:
    pass

@models_app.command("list")
def models_list(tracking_uri: TrackingOption = None) -> None:
    """Registered FlowOOD models with their versions and aliases."""
    from flowood_ray.registry import configure, list_models

    configure(tracking_uri)
    rows = list_models()
    if not rows:
        typer.echo("no registered flowood models")
    for row in rows:
        line = f"{row['name']:<20} v{row['version']:<4} {','.join(row['aliases']) or '-':<22} run {row['run_id']}"
        for level in ("video", "frame"):
            if level in row:
                rates = ", ".join(
                    f"{float(fpr):g}: " + ("none" if t["threshold"] is None else f"{t['threshold']:.4g}")
                    + ("" if t["resolved"] else " (unresolved)")
                    for fpr, t in sorted(row[level]["thresholds"].items())
                )
                size = f"{row[level]['n']} clips" + (f" ({row[level]['samples']} frames)" if level == "frame" and
                                                      "samples" in row[level] else "")
                line += f"\n    {row['primary']} {level}: {size}, thresholds {rates}"
        typer.echo(line)


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="registered model, e.g. flowood-glow")],
    version: Annotated[str, typer.Argument(help="version number to promote")],
    alias: Annotated[str, typer.Option(help="alias to move")] = "champion",
    tracking_uri: TrackingOption = None,
) -> None:
    """Point an alias (champion by default) at a version."""
    from mlflow.exceptions import MlflowException

    from flowood_ray.registry import configure, promote

    configure(tracking_uri)
    try:
        promote(name, version, alias)
    except MlflowException as exc:
        fail(exc.message)
    typer.echo(f"{name}@{alias} -> version {version}")
