"""Preprocessing throughput, measured side by side in one run.

  (a)  decode only, one process (PyAV, its own threading)
  (b)  decode + detect + track + align + crop, one process, no Ray
  (c1) the Ray Data pipeline on a local Ray with 1 CPU
  (c2) the same with 2 CPUs

All frames are sampled and the detector runs every 5th frame, as in the issue's target.

--resolution 720 first re-encodes the videos (the first --videos of --archive, e.g. ../shared/realfaces, or
the synthetic ones) to 720-line H.264 at their own frame rate, as archive footage is.

--lengths 10 60 then measures the cost per video of 32 frames, on videos of those lengths made from the same
clips, with x264's default GOP (250 frames) and with a 2 s GOP. At the scoring default of 32 evenly spaced
frames: sequential decoding, decoding with keyframe seeking (what the pipeline does), and the whole crop step
(seeking decode + detect + align + crop). With `--segments 4` (4 runs of 8 frames from keyframes): the
decode and the crop step.
Usage: python bench/preprocess.py [--archive DIR] [--resolution 720] [--lengths 10 60 [--lengths-only]] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import sys

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import reencode, synthetic_archive  # noqa: E402

from flowood_ray.cluster.preprocess import run_preprocess
from flowood_ray.media import decode
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.decode import DecodeOutcome, iter_frames, probe
from flowood_ray.media.manifest import VIDEO_EXTENSIONS
from flowood_ray.media.sampling import sample_indices
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.facecrop import VideoCropper, frames_to_sample
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import prepare_output, write_shard

SAMPLING = SamplingConfig(mode="all")
CROP = CropConfig(size=128, detect_every=5)


def decode_only(rows: list[dict], threads: int) -> tuple[int, float]:
    start = time.perf_counter()
    frames = 0
    for row in rows:
        info = probe(Path(row["path"]))
        frames += sum(1 for _ in iter_frames(Path(row["path"]), info, None, DecodeOutcome(), threads))
    return frames, time.perf_counter() - start


def crop_in_process(rows: list[dict], out: Path) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    prepare_output(out, {"bench": "in-process"})
    start = time.perf_counter()
    cropper = VideoCropper(SAMPLING, CROP)
    results = [r for i in range(0, len(rows), 8) for r in write_shard(out, rows[i : i + 8], cropper)]
    cropper.close()
    return sum(r["frames_decoded"] for r in results), time.perf_counter() - start


def ray_pipeline(manifest, out: Path, cpus: int) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        videos = run_preprocess(manifest, out, SAMPLING, CROP, workers=cpus, videos_per_shard=4)
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    return int(sum(videos.column("frames_decoded").to_pylist())), elapsed


def source_videos(archive: Path, count: int) -> list[Path]:
    videos = sorted(p for p in archive.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))
    if not videos:
        raise SystemExit(f"{archive} holds no video files")
    return videos[:count]


def at_resolution(sources: list[Path], out: Path, lines: int) -> Path:
    for i, source in enumerate(sources):
        reencode(source, out / f"{i:03d}_{source.stem}.mp4", lines)
    return out


def cost_per_video(sources: list[Path], workdir: Path, lines: int, seconds: float, keyint: int | None
                   ) -> dict[str, float]:
    """Seconds per video at 32 frames: evenly spaced (the scoring default), decoded sequentially and with
    keyframe seeking (what the pipeline does), then the crop step; and in 4 runs from keyframes
    (`--segments 4`), decoded and cropped."""
    tag = f"{lines}p-{seconds:g}s-gop{keyint or 'default'}"
    videos = [reencode(s, workdir / "lengths" / tag / f"{i:03d}.mp4", lines, seconds, keyint)
              for i, s in enumerate(sources)]
    uniform, runs = SamplingConfig(num_frames=32), SamplingConfig(mode="segments", num_frames=32, segments=4)
    croppers = {name: VideoCropper(sampling, CROP) for name, sampling in (("uniform", uniform), ("segments", runs))}
    totals = dict.fromkeys(("sequential decode", "seeking decode", "crop step", "segments decode",
                            "segments crop step"), 0.0)
    for video in videos:
        info = probe(video)
        wanted = sample_indices(info.frame_count, uniform)
        in_runs = frames_to_sample(video, info, runs)
        for name, run in (
            ("sequential decode", lambda: list(decode._decode_sequential(video, info, wanted, DecodeOutcome(), 0))),
            ("seeking decode", lambda: list(iter_frames(video, info, wanted, DecodeOutcome()))),
            ("crop step", lambda: croppers["uniform"].process({"video_id": video.stem, "path": str(video)},
                                                              lambda table: None)),
            ("segments decode", lambda: list(iter_frames(video, info, in_runs, DecodeOutcome()))),
            ("segments crop step", lambda: croppers["segments"].process({"video_id": video.stem, "path": str(video)},
                                                                        lambda table: None)),
        ):
            start = time.perf_counter()
            run()
            totals[name] += time.perf_counter() - start
    for cropper in croppers.values():
        cropper.close()
    return {k: v / len(videos) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="an existing archive (default: a synthetic one)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/preprocess"))
    parser.add_argument("--frames", type=int, default=192, help="frames per synthetic video; long enough that "
                        "actor start-up (MediaPipe, imports) is amortised as it is on a real archive")
    parser.add_argument("--resolution", type=int, help="re-encode the videos to this many lines first")
    parser.add_argument("--videos", type=int, default=12, help="videos of --archive used with --resolution")
    parser.add_argument("--lengths", type=float, nargs="+", help="seconds: cost per video at 32 sampled frames")
    parser.add_argument("--lengths-only", action="store_true", help="with --lengths: skip the a/b/c throughput runs")
    args = parser.parse_args()
    if args.lengths_only and not args.lengths:
        parser.error("--lengths-only needs --lengths")
    logging.basicConfig(level=logging.WARNING)
    archive = args.archive or synthetic_archive(args.workdir, identities=6, frames=args.frames)
    if args.lengths_only:  # the clips themselves are the sources, each re-encoded once per length
        lengths_report(source_videos(archive, 3), args.workdir, args.resolution or 720, args.lengths)
        return
    if args.resolution:
        sources = source_videos(archive, args.videos)
        archive = at_resolution(sources, args.workdir / f"archive{args.resolution}p", args.resolution)
    manifest = build_manifest(archive)
    rows = manifest.to_pylist()
    print(f"archive: {archive} ({len(rows)} videos)")

    results = {
        "a  decode only, 1 process": decode_only(rows, threads=0),
        "a1 decode only, 1 thread": decode_only(rows, threads=1),
        "b  decode+detect+align+crop, 1 process": crop_in_process(rows, args.workdir / "crops_b"),
        "c1 Ray Data pipeline, 1 CPU": ray_pipeline(manifest, args.workdir / "crops_c1", 1),
        "c2 Ray Data pipeline, 2 CPUs": ray_pipeline(manifest, args.workdir / "crops_c2", 2),
    }
    fps = {name.split()[0]: frames / seconds for name, (frames, seconds) in results.items()}
    for name, (frames, seconds) in results.items():
        print(f"{name:<42} {frames:7d} frames {seconds:8.2f} s {frames / seconds:9.1f} frames/s")
    print(f"b/a   = {fps['b'] / fps['a']:.3f}   (cost of detection, tracking and alignment)")
    print(f"c2/a  = {fps['c2'] / fps['a']:.3f}   (target >= 0.5)")
    print(f"c2/c1 = {fps['c2'] / fps['c1']:.3f}   (scaling from 1 to 2 CPUs)")
    if args.lengths:
        lengths_report(source_videos(archive, 3), args.workdir, args.resolution or 720, args.lengths)


def lengths_report(sources: list[Path], workdir: Path, lines: int, lengths: list[float]) -> None:
    fps = probe(sources[0]).fps
    print(f"\ncost per video at 32 frames, {lines}p, mean of {len(sources)} videos (s):")
    for keyint, name in ((None, "x264 default GOP (250 frames)"), (round(2 * fps), "2 s GOP")):
        costs = {seconds: cost_per_video(sources, workdir, lines, seconds, keyint) for seconds in lengths}
        print(f"  {name}:")
        for seconds, cost in costs.items():
            print(f"    {seconds:5g} s videos: " + "  ".join(f"{k} {v:6.3f}" for k, v in cost.items()))
        longest, shortest = costs[max(lengths)], costs[min(lengths)]
        print("    ratio longest/shortest: " + "  ".join(f"{k} {longest[k] / shortest[k]:.2f}" for k in longest)
              + "   (target for a crop step <= 1.5)")


if __name__ == "__main__":
    main()
