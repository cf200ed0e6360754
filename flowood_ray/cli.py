"""`flowood`: the command-line entry point."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowood_ray.glow_cli import glow_app
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig

if TYPE_CHECKING:
    import pyarrow as pa

app = typer.Typer(help="Deepfake detection as out-of-distribution detection, on Ray.", no_args_is_help=True)
log = logging.getLogger("flowood")


TrackingOption = Annotated[str | None, typer.Option(help="MLflow URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")]
StateOption = Annotated[Path, typer.Option(help="where the local cluster keeps its state")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output directory (FaceForensics++ layout)")],
    identities: Annotated[int, typer.Option(help="number of procedurally drawn identities")] = 8,
    videos_per_identity: Annotated[int, typer.Option(help="real videos per identity")] = 2,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same archive")] = 0,
    frames: Annotated[int, typer.Option(help="frames per video")] = 48,
    size: Annotated[int, typer.Option(help="frame side in px")] = 256,
    workers: Annotated[int, typer.Option(help="processes")] = 2,
) -> None:
    """Render a synthetic deepfake benchmark: talking heads plus four manipulation families."""
    from flowood_ray.media.synth import generate_benchmark
    from flowood_ray.media.synth_plan import SynthConfig

    try:
        config = SynthConfig(
            identities=identities, videos_per_identity=videos_per_identity, seed=seed, frames=frames, size=size,
            workers=workers,
        )
        summary = generate_benchmark(out, config)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def forge(
    real_archive: Annotated[Path, typer.Argument(help="folder of real videos (searched recursively)")],
    out: Annotated[Path, typer.Argument(help="output directory (FaceForensics++ layout with masks)")],
    methods: Annotated[str, typer.Option(help="comma-separated: Deepfakes,Face2Face,FaceSwap,NeuralTextures")] = "",
    people: Annotated[Path | None, typer.Option(help="CSV path,person: splits by person, donors of another")] = None,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same output")] = 0,
    clip_seconds: Annotated[float, typer.Option(help="seconds of each video to use")] = 4.0,
    crf: Annotated[int, typer.Option(help="x264 CRF of originals and fakes: 0, 23 or 40")] = 23,
    workers: Annotated[int, typer.Option(help="processes")] = 2,
) -> None:
    """Manipulate real footage with the four FF++ families, with per-frame masks; resumable."""
    from pydantic import ValidationError

    from flowood_ray.media.forge import SUMMARY_FILE, ForgeConfig, forge_archive

    try:
        chosen = {"methods": tuple(m.strip() for m in methods.split(","))} if methods else {}
        config = ForgeConfig(seed=seed, clip_seconds=clip_seconds, crf=crf, workers=workers, **chosen)
        summary = forge_archive(real_archive, out, config, people)
    except (ValidationError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(summary, indent=2, default=str))
    typer.echo(f"per-video rows with reasons: {out / SUMMARY_FILE}")


@app.command()
def manifest(
    archive: Annotated[Path, typer.Argument(help="dataset root, folder, CSV or manifest parquet")],
    out: Annotated[Path, typer.Option(help="where to write the manifest parquet")] = Path("manifest.parquet"),
    kind: Annotated[str, typer.Option(
        help="auto, faceforensics, celebdf, dfdc, kaggle_real_fake, cddb, dfgc21, folder, csv or manifest")] = "auto",
) -> None:
    """Index an archive into an Arrow manifest (one row per video or image)."""
    from flowood_ray.media.datasets import manifest_summary
    from flowood_ray.media.manifest import write_manifest

    table = _load_manifest(archive, kind)
    write_manifest(table, out)
    typer.echo(json.dumps(manifest_summary(table), indent=2))
    typer.echo(f"wrote {table.num_rows} rows to {out}")


def _load_manifest(archive: Path, kind: str) -> "pa.Table":
    from flowood_ray.media.datasets import build_manifest

    try:
        return build_manifest(archive, kind=kind)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def preprocess(
    archive: Annotated[Path, typer.Argument(help="dataset root, folder, CSV or manifest parquet")],
    out: Annotated[Path, typer.Option(help="output directory for face-crop shards")],
    kind: Annotated[str, typer.Option(help="archive layout (see `flowood manifest`)")] = "auto",
    sampling: Annotated[str, typer.Option(help="uniform, stride or all")] = "uniform",
    frames: Annotated[int, typer.Option(help="frames per video for uniform sampling")] = 32,
    stride: Annotated[int, typer.Option(help="frame stride for stride sampling")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="cap for stride/all sampling")] = None,
    size: Annotated[int, typer.Option(help="crop side in px")] = 128,
    margin: Annotated[float, typer.Option(help="context around the face")] = 0.3,
    detect_every: Annotated[int, typer.Option(help="detector every k-th sampled frame, tracking between")] = 5,
    model: Annotated[str, typer.Option(help="MediaPipe detector: short or full range")] = "short",
    face_mesh: Annotated[bool, typer.Option(help="store face-mesh landmarks per crop (the blend family needs them)")] = False,
    workers: Annotated[int | None, typer.Option(help="cropping actors (default: all cluster CPUs)")] = None,
    videos_per_shard: Annotated[int, typer.Option(help="videos per output shard")] = 8,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local)")] = None,
) -> None:
    """Decode, detect, align and crop faces on Ray Data; resumable: rerun to finish a killed job."""
    from pydantic import ValidationError

    from flowood_ray.cluster.preprocess import run_preprocess

    table = _load_manifest(archive, kind)
    try:
        sampling_config = SamplingConfig(
            mode=sampling, num_frames=frames, stride=stride if sampling == "stride" else 1, max_frames=max_frames
        )
        crop_config = CropConfig(size=size, margin=margin, detect_every=detect_every, model=model, face_mesh=face_mesh)
        videos = run_preprocess(
            table, out, sampling_config, crop_config, workers=workers, videos_per_shard=videos_per_shard,
            address=address,
        )
    except (ValidationError, ValueError) as exc:
        _fail(str(exc))
    counts = videos.group_by("status").aggregate([("video_id", "count"), ("faces", "sum")]).to_pylist()
    for row in sorted(counts, key=lambda r: r["status"]):
        typer.echo(f"{row['status']:>13}: {row['video_id_count']:6d} videos, {row['faces_sum']:8d} crops")
    typer.echo(f"shards in {out}")


@app.command()
def score(
    archive: Annotated[Path, typer.Argument(help="dataset root, folder, CSV or manifest parquet")],
    model: Annotated[list[str], typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION; repeatable")],
    out: Annotated[Path, typer.Option(help="output directory (frames.parquet, videos.parquet)")],
    kind: Annotated[str, typer.Option(help="archive layout (see `flowood manifest`)")] = "auto",
    split: Annotated[str | None, typer.Option(help="score only this split of the manifest")] = None,
    frames: Annotated[int, typer.Option(help="frames per video (uniform sampling)")] = 32,
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

    table = _load_manifest(archive, kind)
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("split"), split))
        if table.num_rows == 0:
            _fail(f"no videos in split {split!r}")
    try:
        videos = run_score(
            table, out, model, SamplingConfig(num_frames=frames), fpr=fpr, local=local, workers=workers,
            videos_per_shard=videos_per_shard, save_crops=save_crops, tracking_uri=tracking_uri, address=address,
        )
    except (ValidationError, ValueError, MlflowException) as exc:
        _fail(str(exc))
    _print_score_summary(videos)
    typer.echo(f"scores in {out}/frames.parquet and {out}/videos.parquet")


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
        _fail(str(exc))
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
) -> None:
    """Online scoring over HTTP (Ray Serve): POST /v1/score/image, /v1/score/video; GET /v1/models, /healthz.

    Set FLOWOOD_API_TOKEN to require `Authorization: Bearer <token>` on /v1/*."""
    from pydantic import ValidationError

    from flowood_ray.cluster.serve import run_server

    try:
        run_server(model, host=host, port=port, tracking_uri=tracking_uri, address=address, num_replicas=replicas,
                   gpus_per_replica=gpus_per_replica)
    except (ValidationError, ValueError) as exc:
        _fail(str(exc))


models_app = typer.Typer(help="The MLflow model registry: list versions, move aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")
cluster_app = typer.Typer(help="A local Ray head (token auth) and MLflow server for `ray job submit`.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(glow_app, name="glow")



@models_app.command("list")
def models_list(tracking_uri: TrackingOption = None) -> None:
    """Registered FlowOOD models with their versions and aliases."""
    from flowood_ray.registry import configure, list_models

    configure(tracking_uri)
    rows = list_models()
    if not rows:
        typer.echo("no registered flowood models")
    for row in rows:
        typer.echo(f"{row['name']:<20} v{row['version']:<4} {','.join(row['aliases']) or '-':<22} run {row['run_id']}")


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
        _fail(exc.message)
    typer.echo(f"{name}@{alias} -> version {version}")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
