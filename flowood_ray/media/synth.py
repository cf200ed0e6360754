"""The synthetic FaceForensics++-style benchmark, written to disk.

Procedural talking heads (`heads.py`) are meshed with MediaPipe and manipulated with the four FF++
families (`manipulations.py`); reals and fakes go through the same x264 encoder at every quality and
are written in the FF++ layout with a mask video per fake (`ffpp_layout.py`), so the FF++ loader
reads the result unchanged. Every video's randomness derives from (seed, video id), so the output
does not depend on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from flowood_ray.media.ffpp_layout import MASK_CRF, QUALITY_CRF, encode_video, fake_path, mask_path, real_path, write_splits
from flowood_ray.media.heads import render_real
from flowood_ray.media.landmarks import FaceMesher, borrow_nearest
from flowood_ray.media.manipulations import MANIPULATIONS, METHODS
from flowood_ray.media.synth_plan import FakeJob, SynthConfig, Video, plan_benchmark
from flowood_ray.media.workers import run_all, video_pool

logger = logging.getLogger(__name__)

WORK_DIR = ".synth_work"
_SALT_FAKE = 19  # keeps each fake's settings independent of the identity, scene and split streams


def _cache(out: Path, vid: str) -> tuple[Path, Path]:
    return out / WORK_DIR / f"{vid}.frames.npy", out / WORK_DIR / f"{vid}.landmarks.npy"


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _real_task(out: Path, config: SynthConfig, video: Video) -> dict[str, float]:
    start = time.perf_counter()
    cv2.setNumThreads(1)
    frames = render_real(config, video)
    with FaceMesher(video=False) as mesher:
        points, found = mesher.mesh_frames(frames)
    if not found.any():
        raise RuntimeError(f"MediaPipe found no face in any frame of rendered video {video.vid}")
    # The rare frame the mesh misses borrows its neighbour's geometry, so every frame is manipulated.
    points = borrow_nearest(points, found)
    frames_path, points_path = _cache(out, video.vid)
    _save(frames_path, frames)
    _save(points_path, points)
    size = sum(encode_video(frames, real_path(out, q, video.vid), QUALITY_CRF[q], config.fps)
               for q in config.qualities)
    return {"seconds": time.perf_counter() - start, "mesh_rate": float(found.mean()), "bytes": size}


def _fake_task(out: Path, config: SynthConfig, job: FakeJob) -> dict[str, float]:
    start = time.perf_counter()
    cv2.setNumThreads(1)
    (target_frames, target_points), (source_frames, source_points) = (
        tuple(np.load(p) for p in _cache(out, vid)) for vid in (job.target, job.source))
    rng = np.random.default_rng([config.seed, _SALT_FAKE, METHODS.index(job.method), int(job.target),
                                 int(job.source)])
    fake, masks = MANIPULATIONS[job.method](target_frames, target_points, source_frames, source_points, rng)
    size = encode_video(masks, mask_path(out, job.method, job.name), MASK_CRF, config.fps)
    size += sum(encode_video(fake, fake_path(out, job.method, q, job.name), QUALITY_CRF[q], config.fps)
                for q in config.qualities)
    return {"seconds": time.perf_counter() - start, "bytes": size}


def generate_benchmark(out: Path, config: SynthConfig) -> dict:
    """Render the benchmark into `out` in the FaceForensics++ layout; returns counts and timings."""
    out = Path(out)
    start = time.perf_counter()
    plan = plan_benchmark(config)
    fakes = plan.fakes()
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    logger.info("synthetic benchmark: %d real and %d fake videos x %d qualities into %s with %d workers",
                len(plan.videos), len(fakes), len(config.qualities), out, config.workers)
    try:
        with video_pool(config.workers) as pool:
            reals = run_all(pool, {v.vid: pool.submit(_real_task, out, config, v) for v in plan.videos}, "real")
            real_seconds = time.perf_counter() - start
            made = run_all(pool, {f"{job.method}/{job.name}": pool.submit(_fake_task, out, config, job)
                                  for job in fakes}, "fake")
    finally:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)

    write_splits(out, plan.pairs)
    meta = {
        "generator": __name__,
        "config": config.model_dump(mode="json"),
        "videos": {v.vid: {"identity": v.identity, "split": v.split, "mesh_rate": reals[v.vid]["mesh_rate"]}
                   for v in plan.videos},
        "fakes": [{"method": j.method, "name": j.name, "target": j.target, "source": j.source, "split": j.split}
                  for j in fakes],
    }
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    seconds = time.perf_counter() - start
    summary = {
        "reals": len(plan.videos),
        "fakes": len(fakes),
        "files": (len(plan.videos) + len(fakes)) * len(config.qualities),
        "masks": len(fakes),
        "identities": config.identities,
        "split_videos": {s: sum(v.split == s for v in plan.videos) for s in plan.pairs},
        "bytes": int(sum(r["bytes"] for r in reals.values()) + sum(r["bytes"] for r in made.values())),
        "mesh_rate": float(np.mean([r["mesh_rate"] for r in reals.values()])),
        "seconds_reals": round(real_seconds, 2),
        "seconds": round(seconds, 2),
    }
    logger.info("synthetic benchmark done: %s", summary)
    return summary
