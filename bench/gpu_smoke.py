"""GPU smoke test: every family trained for one epoch on CUDA (NCCL DDP when two GPUs are visible, one
worker otherwise), an archive scored with GPU score actors, and one Serve request on a GPU replica.

Run where a CUDA build of torch and a GPU exist: `bash bench/gpu_smoke.sh` (see there). It makes its own
tiny synthetic archive, so it needs no data; it prints one line per step and exits non-zero on the first
failure.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import pyarrow.compute as pc
import ray
import torch
from ray import serve

from flowood_ray.cluster.preprocess import run_preprocess
from flowood_ray.cluster.score import run_score
from flowood_ray.cluster.serve import run_server
from flowood_ray.cluster.train import TrainConfig
from flowood_ray.cluster.train_job import train_and_register
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.synth import generate_benchmark
from flowood_ray.media.synth_plan import SynthConfig
from flowood_ray.models.catalog import FAMILIES

# One small configuration per family at 32 px.
SMOKE_MODELS = {
    "glow": {"glow": {"image_size": 32, "levels": 2, "steps_per_level": 2, "hidden_channels": 16}},
    "vqvae": {"vqvae": {"image_size": 32, "hidden_channels": 32, "res_channels": 16, "n_res_blocks": 1,
                        "codebook_size": 32, "code_dim": 16},
              "prior": {"channels": 32, "n_blocks": 1, "n_res_blocks": 1, "key_channels": 16, "n_heads": 2}},
    "clip": {"encoder": {"image_size": 32, "clip_frames": 4, "encoder": {"widths": [8, 16], "embed_dim": 8}},
             "flow": {"n_layers": 4, "hidden": 32}},
    "patch": {"patch": {"image_size": 32, "patch": 4, "stride": 4, "n_layers": 2, "hidden": 16}},
    "classifier": {"classifier": {"image_size": 32}},
    "blend": {"detector": {"image_size": 32}},
    "cflow": {"cflow": {"image_size": 32, "strides": [8, 16], "coupling_layers": 2, "condition_dim": 8}},
}


def step(name: str, started: float, detail: str = "") -> None:
    print(f"PASS {name:<28} {time.perf_counter() - started:7.1f} s  {detail}", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: this smoke test needs a GPU and a CUDA build of torch")
        return 2
    logging.basicConfig(level=logging.WARNING)
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} x {torch.cuda.get_device_name(0)}")
    work = Path(tempfile.mkdtemp(prefix="flowood-gpu-smoke-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    started = time.perf_counter()
    generate_benchmark(work / "archive", SynthConfig(identities=6, videos_per_identity=2, frames=16, size=192,
                                                     qualities=("c23",), workers=4))
    manifest = build_manifest(work / "archive")
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    run_preprocess(manifest, work / "crops", SamplingConfig(num_frames=8), CropConfig(size=32, face_mesh=True))
    step("synthesise and crop", started, str(work))
    workers = 2 if gpus >= 2 else 1
    uris = []
    for name in FAMILIES:
        started = time.perf_counter()
        summary = train_and_register(
            work / "crops", TrainConfig(family=name, epochs=1, batch_size=16, workers=workers, use_gpu=True),
            SMOKE_MODELS.get(name, {}), f"gpu-smoke-{name}", work / "ray_results", uri,
        )
        uris.append(f"models:/{summary['name']}/{summary['version']}")
        step(f"train {name} ({workers} x GPU)", started, f"version {summary['version']}")
    started = time.perf_counter()
    test = manifest.filter(pc.equal(manifest.column("split"), "test"))
    videos = run_score(test, work / "scores", uris, SamplingConfig(num_frames=8), tracking_uri=uri)
    statuses = videos.column("status").to_pylist()
    if statuses.count("ok") != len(statuses):
        print(f"FAIL scoring: statuses {statuses}")
        return 1
    step("score on GPU actors", started, f"{len(statuses)} videos, {len(uris)} models")
    started = time.perf_counter()
    run_server(uris[:1], port=8123, tracking_uri=uri, gpus_per_replica=1, blocking=False)
    try:
        capture = cv2.VideoCapture(str(test.column("path")[0].as_py()))
        _, frame = capture.read()
        capture.release()
        body = cv2.imencode(".jpg", frame)[1].tobytes()
        reply = httpx.post("http://127.0.0.1:8123/v1/score/image", content=body,
                           headers={"Content-Type": "image/jpeg"}, timeout=120)
        if reply.status_code != 200:
            print(f"FAIL serve: {reply.status_code} {reply.text[:500]}")
            return 1
        step("serve on a GPU replica", started, json.dumps(reply.json()["faces"][0]["scores"])[:120])
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
