"""Preprocessing throughput, measured side by side in one run.

  (a)  decode only, one process (PyAV, its own threading)
  (b)  decode + detect + track + align + crop, one process, no Ray
  (c1) the Ray Data pipeline on a local Ray with 1 CPU
  (c2) the same with 2 CPUs

All frames are sampled and the detector runs every 5th frame, as in the issue's target.
Usage: python bench/preprocess.py [--archive DIR] [--workdir bench_out/preprocess]
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

from common import synthetic_archive  # noqa: E402

from flowood_ray.cluster.preprocess import run_preprocess
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.decode import DecodeOutcome, iter_frames, probe
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.facecrop import VideoCropper
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="an existing archive (default: a synthetic one)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/preprocess"))
    parser.add_argument("--frames", type=int, default=192, help="frames per synthetic video; long enough that "
                        "actor start-up (MediaPipe, imports) is amortised as it is on a real archive")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    archive = args.archive or synthetic_archive(args.workdir, identities=6, frames=args.frames)
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


if __name__ == "__main__":
    main()
