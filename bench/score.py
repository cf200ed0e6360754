"""Archive scoring throughput, side by side in one run:

  plain  the same shard code in a single-process loop (`flowood score --local`)
  ray1   `flowood score` on a local Ray with 1 CPU
  ray2   the same with 2 CPUs

Prints videos/s and crops/s, the Ray overhead (plain / ray1) and the scaling (ray2 / ray1) of one family:
`glow` (a small 64 px Glow, the default), `cflow` or `blend` (the ImageNet EfficientNet-Lite0 families at
128 px). The model is trained for one epoch and registered first (not timed); its quality does not change
the cost of scoring. Usage: python bench/score.py [--family glow|cflow|blend] [--identities N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import synthetic_archive, synthetic_crops  # noqa: E402

from flowood_ray.cluster.score import run_score  # noqa: E402
from flowood_ray.cluster.train import TrainConfig  # noqa: E402
from flowood_ray.cluster.train_job import train_and_register  # noqa: E402
from flowood_ray.media.datasets import build_manifest  # noqa: E402
from flowood_ray.media.sampling import SamplingConfig  # noqa: E402
from flowood_ray.registry import configure, resolve_version  # noqa: E402

ALL_CPUS = os.sched_getaffinity(0)
# family -> (crop size, model configs); the ImageNet families at the red-team recipe's resolution.
FAMILIES = {
    "glow": (64, {"glow": {"image_size": 64, "levels": 3, "steps_per_level": 4, "hidden_channels": 64}}),
    "cflow": (128, {"cflow": {"image_size": 128}}),
    "blend": (128, {"detector": {"image_size": 128}}),
}


def timed(manifest, out: Path, uri: str, model_uri: str, local: bool, cpus: int) -> tuple[int, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    if local:
        # Like a 1-CPU Ray actor: one core, one torch and OpenCV thread; otherwise the "plain"
        # loop would quietly use both cores through intra-op threads.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        videos = run_score(manifest, out, [model_uri], SamplingConfig(num_frames=32),
                           local=local, workers=cpus, videos_per_shard=4, tracking_uri=uri)
        elapsed = time.perf_counter() - start
    finally:
        if local:
            os.sched_setaffinity(0, ALL_CPUS)
            torch.set_num_threads(len(ALL_CPUS))
        else:
            ray.shutdown()
    return videos.num_rows, int(sum(videos.column("frames_scored").to_pylist())), elapsed


def registered(model_uri: str, tracking_uri: str) -> bool:
    from mlflow.exceptions import MlflowException

    configure(tracking_uri)
    try:
        resolve_version(model_uri)
    except MlflowException:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/score"))
    # 30 identities make 300 videos: an archive big enough that actor start-up (about 20 s of
    # imports, MediaPipe and model download) is amortised as it is on real archives.
    parser.add_argument("--identities", type=int, default=30)
    parser.add_argument("--family", choices=list(FAMILIES), default="glow")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uri = f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
    size, configs = FAMILIES[args.family]
    model_uri = f"models:/flowood-{args.family}@candidate"
    crops = synthetic_crops(args.workdir, size=size, identities=args.identities, face_mesh=args.family == "blend")
    if not registered(model_uri, uri):
        train_and_register(crops, TrainConfig(family=args.family, epochs=1, workers=2), configs, f"bench-score-{args.family}",
                           args.workdir / "ray_results", uri)
        ray.shutdown()
    manifest = build_manifest(synthetic_archive(args.workdir, identities=args.identities))
    results = {
        name: timed(manifest, args.workdir / f"{args.family}-{name}", uri, model_uri, local=name == "plain", cpus=cpus)
        for name, cpus in (("plain", 1), ("ray1", 1), ("ray2", 2))
    }
    rate = {}
    print(f"family {args.family} ({size} px crops)")
    for name, (videos, frames, seconds) in results.items():
        rate[name] = videos / seconds
        print(f"{name:<6} {videos:5d} videos {frames:6d} crops {seconds:7.1f} s "
              f"{videos / seconds:7.2f} videos/s {frames / seconds:8.1f} crops/s")
    print(f"Ray overhead  plain/ray1 = {rate['plain'] / rate['ray1']:.2f}  (target <= 1.25)")
    print(f"Ray scaling   ray2/ray1  = {rate['ray2'] / rate['ray1']:.2f}  (target >= 1.6)")


if __name__ == "__main__":
    main()
