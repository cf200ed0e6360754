"""`flowood glow ...`: latent arithmetic with a registered Glow over a crops directory (seed 001).

Every command writes its grid into --out and refreshes the self-contained gallery --out/index.html.
Heavy modules (torch, MLflow, MediaPipe) are imported inside the commands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from flowood_ray.glow_tasks import GlowSession

glow_app = typer.Typer(help="Glow latent arithmetic: reconstructions, mean faces, attribute edits, expression "
                            "transfer, samples.", no_args_is_help=True)

CropsArg = Annotated[Path, typer.Argument(help="crops directory made by `flowood preprocess`")]
ModelOption = Annotated[str, typer.Option(help="registered Glow, models:/NAME@ALIAS or models:/NAME/VERSION")]
TrackingOption = Annotated[str | None, typer.Option(help="MLflow URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")]
OutOption = Annotated[Path, typer.Option(help="output directory (grids, index.html)")]
VideoOption = Annotated[list[str] | None, typer.Option("--video-id", help="use this video's crops; repeatable")]
MaxCropsOption = Annotated[int | None, typer.Option(help="use at most this many crops", min=1)]
DEFAULT_MODEL = "models:/flowood-glow@champion"
DEFAULT_OUT = Path("glow_out")


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Bad input (ids, files, model URIs) ends the command with its message and exit code 2."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    try:
        yield
    except (ValueError, ValidationError, FileNotFoundError, MlflowException) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _session(model: str, tracking_uri: str | None) -> GlowSession:
    from flowood_ray.glow_tasks import open_session

    return open_session(model, tracking_uri)


@glow_app.command()
def reconstruct(
    crops: CropsArg, model: ModelOption = DEFAULT_MODEL, tracking_uri: TrackingOption = None,
    video_id: VideoOption = None, max_crops: MaxCropsOption = 16, out: OutOption = DEFAULT_OUT,
) -> None:
    """Encode and decode crops: the reconstruction error (model space and grey levels) should be ~0."""
    from flowood_ray import glow_tasks

    with _reported_errors():
        report = glow_tasks.reconstruct(_session(model, tracking_uri), glow_tasks.read_crops(crops, video_id, max_crops), out)
    typer.echo(json.dumps(report, indent=2))


@glow_app.command("mean-face")
def mean_face(
    crops: CropsArg, model: ModelOption = DEFAULT_MODEL, tracking_uri: TrackingOption = None,
    video_id: Annotated[list[str] | None, typer.Option("--video-id", help="one identity's videos; repeatable")] = None,
    identity: Annotated[Path | None, typer.Option(help="CSV identity,video_id: one mean face per identity")] = None,
    out: OutOption = DEFAULT_OUT,
) -> None:
    """The mean latent of an identity's crops, decoded (a neutral face)."""
    from flowood_ray import glow_tasks

    with _reported_errors():
        if (identity is None) == (not video_id):
            raise ValueError("give either --video-id (one identity) or --identity CSV")
        identities = glow_tasks.read_identities(identity) if identity else {"+".join(video_id or []): video_id or []}
        glow_tasks.mean_faces(_session(model, tracking_uri), crops, identities, out)
    typer.echo(f"mean faces of {len(identities)} identities in {out / 'mean_faces.png'}")


@glow_app.command()
def attribute(
    crops: CropsArg, model: ModelOption = DEFAULT_MODEL, tracking_uri: TrackingOption = None,
    labels: Annotated[Path | None, typer.Option(help="CSV video_id,frame_index,label (1 has the attribute)")] = None,
    rule: Annotated[str | None, typer.Option(help="label crops by their mesh: mouth-open or eyes-closed")] = None,
    video_id: VideoOption = None, out: OutOption = DEFAULT_OUT,
) -> None:
    """Attribute vector mean(z_pos) - mean(z_neg), from labels or from a face-mesh rule (top vs bottom third)."""
    from flowood_ray import glow_tasks

    with _reported_errors():
        if (labels is None) == (rule is None):
            raise ValueError("give exactly one of --labels CSV or --rule")
        crop_set = glow_tasks.read_crops(crops, video_id)
        if labels is not None:
            label_array, origin = glow_tasks.labels_from_csv(labels, crop_set), f"labels {labels.name}"
        else:
            label_array, origin = glow_tasks.labels_from_rule(crop_set, str(rule)), f"rule {rule}"
        path = glow_tasks.attribute(_session(model, tracking_uri), crop_set, label_array, out, origin)
    typer.echo(f"{int((label_array == 1).sum())} positive, {int((label_array == 0).sum())} negative crops; "
               f"vector in {path}")


@glow_app.command()
def edit(
    crops: CropsArg, vector: Annotated[Path, typer.Option(help="attribute vector .pt from `flowood glow attribute`")],
    alpha: Annotated[str, typer.Option(help="comma-separated strengths, e.g. -1,0,1")] = "-1,0,1",
    model: ModelOption = DEFAULT_MODEL, tracking_uri: TrackingOption = None,
    video_id: VideoOption = None, max_crops: MaxCropsOption = 8, out: OutOption = DEFAULT_OUT,
) -> None:
    """z + alpha v for chosen crops, decoded; alpha = 0 reproduces the inputs."""
    from flowood_ray import glow_tasks

    with _reported_errors():
        alphas = glow_tasks.parse_floats(alpha)
        session = _session(model, tracking_uri)
        crop_set = glow_tasks.read_crops(crops, video_id, max_crops)
        edited = glow_tasks.edit(session, crop_set, vector, alphas, out)
        inputs = session.model_inputs(crop_set.images)
    for a, images in edited.items():
        change = abs(images.astype(int) - inputs.astype(int))
        typer.echo(f"alpha {a:+g}: mean |change| {change.mean():.3f} grey levels, max {change.max()}")
    typer.echo(f"edits in {out / 'edits.png'}")


@glow_app.command()
def transfer(
    crops: CropsArg,
    source: Annotated[str, typer.Option(help="video id whose expressions are transferred")],
    target: Annotated[str, typer.Option(help="video id of the identity that receives them")],
    variant: Annotated[list[str] | None, typer.Option(help="linear or variance; repeatable (default: both)")] = None,
    half: Annotated[bool, typer.Option(help="use the halved expression vector (z_OS - z_MS) / 2")] = False,
    alphas: Annotated[str, typer.Option(help="comma-separated alpha sweep")] = "0,0.25,0.5,0.75,1,1.25,1.5",
    eps: Annotated[float, typer.Option(help="added to both standard deviations (variance variant)")] = 1e-2,
    archive_alpha: Annotated[float, typer.Option(help="alpha of the transfers written to the archive")] = 1.0,
    archive_variant: Annotated[str | None, typer.Option(help="variant written to the archive (default: the first)")] = None,
    model: ModelOption = DEFAULT_MODEL, tracking_uri: TrackingOption = None, out: OutOption = DEFAULT_OUT,
) -> None:
    """Transfer every source frame's expression onto the target; score an alpha sweep; write an FF++ archive."""
    from flowood_ray import glow_tasks
    from flowood_ray.glow_transfer import TransferConfig, run_transfer, summary_table

    with _reported_errors():
        config = TransferConfig(variants=tuple(variant or ("linear", "variance")), alphas=tuple(glow_tasks.parse_floats(alphas)),
                                half=half, eps=eps, archive_alpha=archive_alpha, archive_variant=archive_variant)
        result = run_transfer(_session(model, tracking_uri), crops, source, target, config, out)
    typer.echo(summary_table(result["rows"]))
    typer.echo(f"table in {out / 'transfer.json'}; archive {out / 'archive'} "
               f"(score it with: flowood score {result['archive']['manifest']} --model ...)")


@glow_app.command()
def samples(
    temperatures: Annotated[str, typer.Option(help="comma-separated sampling temperatures")] = "0.5,0.7,1.0",
    n: Annotated[int, typer.Option(help="samples per temperature", min=1)] = 8,
    seed: int = 0, model: ModelOption = DEFAULT_MODEL, tracking_uri: TrackingOption = None,
    out: OutOption = DEFAULT_OUT,
) -> None:
    """A grid of samples, one row per temperature."""
    from flowood_ray import glow_tasks

    with _reported_errors():
        glow_tasks.samples(_session(model, tracking_uri), glow_tasks.parse_floats(temperatures), n, seed, out)
    typer.echo(f"samples in {out / 'samples.png'}")
