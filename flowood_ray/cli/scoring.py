"""`flowood score`, `evaluate`, `serve`, `demo`: registered models applied to archives and requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer

from flowood_ray.cli.common import TrackingOption, app, fail
from flowood_ray.cli.data import load_manifest
from flowood_ray.cluster.serve_ingress import Ingress
from flowood_ray.media.sampling import SamplingConfig

if TYPE_CHECKING:
    import pyarrow as pa


@app.command()
def score(
    archive: Annotated[Path, typer.Argument(help="dataset root, folder, CSV or manifest parquet")],
    model: Annotated[list[str], typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION; repeatable")],
    out: Annotated[Path, typer.Option(help="output directory (frames.parquet, videos.parquet)")],
    kind: Annotated[str, typer.Option(help="archive layout (see `flowood manifest`)")] = "auto",
    split: Annotated[str | None, typer.Option(help="score only this split of the manifest")] = None,
    frames: Annotated[int | None, typer.Option(
        help="frames per video, uniformly sampled (default: a clip model's training sampling, else 32)")] = None,
    segments: Annotated[int | None, typer.Option(
        help="sample the frames as this many runs of consecutive frames, each from a keyframe (MP4, MOV, MKV, "
        "WebM): decoding then costs about the same for a video of any length, where evenly spaced frames each "
        "cost up to a GOP")] = None,
    fpr: Annotated[float, typer.Option(help="verdict threshold as a real-data false-positive rate (0.01 or 0.05)")] = 0.01,
    local: Annotated[bool, typer.Option(help="score in this process, without Ray (small jobs)")] = False,
    workers: Annotated[int | None, typer.Option(help="scoring actors (default: all cluster CPUs)")] = None,
    videos_per_shard: Annotated[int, typer.Option(help="videos per output shard")] = 8,
    save_crops: Annotated[bool, typer.Option(help="keep the scored crops (for reports)")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local)")] = None,
) -> None:
    """Score an archive with registered models: one row per frame and per video, with verdicts; resumable."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    from flowood_ray.cluster.score import run_score

    table = load_manifest(archive, kind)
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("split"), split))
        if table.num_rows == 0:
            fail(f"no videos in split {split!r}")
    try:
        sampling = None
        if segments is not None:
            sampling = SamplingConfig(mode="segments", num_frames=frames or 32, segments=segments)
        elif frames is not None:
            sampling = SamplingConfig(num_frames=frames)
        videos = run_score(
            table, out, model, sampling, fpr=fpr, local=local, workers=workers,
            videos_per_shard=videos_per_shard, save_crops=save_crops, tracking_uri=tracking_uri, address=address,
        )
    except (ValidationError, ValueError, MlflowException) as exc:
        fail(str(exc))
    _print_score_summary(videos)
    from flowood_ray.cluster.score import SUMMARY_FILE

    for model_id, check in json.loads((out / SUMMARY_FILE).read_text())["drift"].items():
        if check.get("warning"):
            typer.secho(f"warning: {model_id}: {check['warning']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"scores in {out}/frames.parquet and {out}/videos.parquet; summary and drift check in {out / SUMMARY_FILE}")


def _print_score_summary(videos: "pa.Table") -> None:
    rows = videos.select(["status", "verdict", "method"]).to_pylist()
    counts: dict[tuple[str, str, str], int] = {}
    for row in rows:
        key = (row["status"], row["verdict"] or "-", row["method"] or "-")
        counts[key] = counts.get(key, 0) + 1
    typer.echo(f"{'status':>13} {'verdict':>8} {'method':>16} {'videos':>7}")
    for (status, verdict, method), n in sorted(counts.items()):
        typer.echo(f"{status:>13} {verdict:>8} {method:>16} {n:7d}")


@app.command("evaluate")
def evaluate_command(
    scores_dir: Annotated[Path, typer.Argument(help="output directory of `flowood score`")],
    labels: Annotated[Path | None, typer.Option(help="labels: manifest parquet, CSV or archive (default: as scored)")] = None,
    out: Annotated[Path | None, typer.Option(help="where metrics.json and report.html go (default: SCORES_DIR)")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for confidence intervals")] = 200,
    tracking_uri: TrackingOption = None,
) -> None:
    """AUROC, AUPR-in/out, FPR@95TPR and EER per score and manipulation method, with an HTML report."""
    from flowood_ray.evaluate import evaluate, format_table

    try:
        rows = evaluate(scores_dir, labels, out, bootstrap, tracking_uri)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(format_table(rows, "video"))
    typer.echo(format_table(rows, "frame"))
    typer.echo(f"report: {(out or scores_dir) / 'report.html'}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="everything the demo makes goes here")] = Path("demo_out"),
    identities: Annotated[int, typer.Option(help="synthetic identities")] = 8,
    epochs: Annotated[int | None, typer.Option(help="training epochs per phase (default: the demo's)")] = None,
) -> None:
    """Synthesise an archive, preprocess, train, register, score the test split and write a report."""
    from flowood_ray.demo import DEMO_FAMILIES, DemoConfig, run_demo
    from flowood_ray.evaluate import format_table

    config = DemoConfig(identities=identities)
    if epochs is not None:
        config = config.model_copy(update={f"{family}_epochs": epochs for family in DEMO_FAMILIES})
    result = run_demo(workdir, config)
    typer.echo(format_table(result["rows"], "video"))
    typer.echo(format_table(result["rows"], "frame"))
    typer.echo(f"timings (s): {json.dumps(result['timings_s'])}")
    typer.echo(f"report: {result['report']}")


@app.command()
def serve(
    model: Annotated[list[str], typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION; the first is the default")],
    host: Annotated[str, typer.Option(help="bind address; loopback unless you mean otherwise")] = "127.0.0.1",
    port: int = 8000,
    replicas: Annotated[int, typer.Option(help="Serve replicas")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs per replica; > 0 runs the models on CUDA")] = 0.0,
    tracking_uri: TrackingOption = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local)")] = None,
    ingress: Annotated[str, typer.Option(
        help="front door of a local Ray: haproxy (HAProxy straight to the replicas), proxy (Ray's Python proxy), "
        "or auto (haproxy when Serve finds its binary, which Ray's serve extra ships on Linux); a running cluster keeps "
        "its own")] = "auto",
) -> None:
    """Online scoring over HTTP (Ray Serve): POST /v1/score/image, /v1/score/video; GET /v1/models, /healthz.

    Set FLOWOOD_API_TOKEN to require `Authorization: Bearer <token>` on /v1/*."""
    from pydantic import ValidationError

    from flowood_ray.cluster.serve import run_server

    try:
        if ingress not in get_args(Ingress):
            raise ValueError(f"--ingress must be one of {', '.join(get_args(Ingress))}, not {ingress!r}")
        run_server(model, host=host, port=port, tracking_uri=tracking_uri, address=address, num_replicas=replicas,
                   gpus_per_replica=gpus_per_replica, ingress=ingress)
    except (ValidationError, ValueError) as exc:
        fail(str(exc))
