"""`flowood synth`, `forge`, `manifest`, `preprocess`: archives in, manifests and face crops out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowood_ray.cli.common import app, fail
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig

if TYPE_CHECKING:
    import pyarrow as pa


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
        fail(str(exc))
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
        fail(str(exc))
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

    table = load_manifest(archive, kind)
    write_manifest(table, out)
    typer.echo(json.dumps(manifest_summary(table), indent=2))
    typer.echo(f"wrote {table.num_rows} rows to {out}")


def load_manifest(archive: Path, kind: str) -> "pa.Table":
    from flowood_ray.media.datasets import build_manifest

    try:
        return build_manifest(archive, kind=kind)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


@app.command()
def preprocess(
    archive: Annotated[Path, typer.Argument(help="dataset root, folder, CSV or manifest parquet")],
    out: Annotated[Path, typer.Option(help="output directory for face-crop shards")],
    kind: Annotated[str, typer.Option(help="archive layout (see `flowood manifest`)")] = "auto",
    sampling: Annotated[str, typer.Option(help="uniform, segments, stride or all")] = "uniform",
    frames: Annotated[int, typer.Option(help="frames per video for uniform and segments sampling")] = 32,
    segments: Annotated[int, typer.Option(help="runs of consecutive frames, each from a keyframe, for segments "
                                          "sampling")] = 4,
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

    table = load_manifest(archive, kind)
    try:
        # Each mode's own option only: SamplingConfig refuses one its mode does not use.
        own = {"stride": {"stride": stride}, "segments": {"segments": segments}}.get(sampling, {})
        sampling_config = SamplingConfig(mode=sampling, num_frames=frames, max_frames=max_frames, **own)
        crop_config = CropConfig(size=size, margin=margin, detect_every=detect_every, model=model, face_mesh=face_mesh)
        videos = run_preprocess(
            table, out, sampling_config, crop_config, workers=workers, videos_per_shard=videos_per_shard,
            address=address,
        )
    except (ValidationError, ValueError) as exc:
        fail(str(exc))
    counts = videos.group_by("status").aggregate([("video_id", "count"), ("faces", "sum")]).to_pylist()
    for row in sorted(counts, key=lambda r: r["status"]):
        typer.echo(f"{row['status']:>13}: {row['video_id_count']:6d} videos, {row['faces_sum']:8d} crops")
    typer.echo(f"shards in {out}")
