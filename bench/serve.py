"""Online scoring on Ray Serve: latency and throughput beside the bare model, in one run.

  bare      decode + detect + align + score of one face image in this process (no HTTP, no Serve)
  c1/c8/c32 POST /v1/score/image at concurrency 1, 8 and 32 against a local Serve on 127.0.0.1:
            p50/p95/p99 latency and requests/s
  overhead  Serve p50 at concurrency 1 minus the bare time per image
  --load    2,000 requests at concurrency 16; counts errors by kind

The image is a real photo (scikit-image's astronaut) as a 320x240 JPEG. A small Glow is trained on a
synthetic benchmark and registered first (not timed), unless --model and --tracking-uri name one.
Everything stays on loopback and every phase has a fixed request count, so the run ends by itself.
Usage: python bench/serve.py [--model URI --tracking-uri URI] [--requests N] [--load]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np
import ray
import skimage.data
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import synthetic_crops  # noqa: E402

from flowood_ray.cluster.serve import run_server  # noqa: E402
from flowood_ray.cluster.serve_inputs import decode_image  # noqa: E402
from flowood_ray.cluster.serve_settings import TOKEN_ENV  # noqa: E402
from flowood_ray.cluster.train import TrainConfig  # noqa: E402
from flowood_ray.cluster.train_job import train_and_register  # noqa: E402
from flowood_ray.media.align import align_face  # noqa: E402
from flowood_ray.media.faces import CropConfig, FaceDetector  # noqa: E402
from flowood_ray.registry import configure, load_registered  # noqa: E402
from flowood_ray.scoring.scorers import build_scorer  # noqa: E402

GLOW = {"glow": {"image_size": 64, "levels": 3, "steps_per_level": 4, "hidden_channels": 64}}
CONCURRENCY = (1, 8, 32)
LOAD_REQUESTS, LOAD_CONCURRENCY = 2000, 16
WARMUP = 20


def face_jpeg() -> bytes:
    photo = skimage.data.astronaut()
    frame = cv2.resize(photo[10:310, 90:390], (320, 240), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def bare_seconds(uri: str, data: bytes, repeats: int) -> tuple[float, float]:
    """Median seconds per image of decode + detect + align + score, and of the score call alone."""
    bundle = load_registered(uri)
    scorer = build_scorer(bundle)
    crop = CropConfig(**bundle.extra.get("crop", {}))
    detector = FaceDetector(crop)
    total, scoring = [], []
    try:
        for _ in range(repeats + WARMUP):
            start = time.perf_counter()
            rgb = decode_image(data, "image/jpeg", 4096 * 4096)
            faces = sorted(detector.detect(rgb), key=lambda f: f.area, reverse=True)
            crops = np.stack([align_face(rgb, f.keypoints, crop.size, crop.margin)[0] for f in faces])
            scored = time.perf_counter()
            scorer.score(crops)
            end = time.perf_counter()
            total.append(end - start)
            scoring.append(end - scored)
    finally:
        detector.close()
    return statistics.median(total[WARMUP:]), statistics.median(scoring[WARMUP:])


async def hammer(url: str, data: bytes, headers: dict[str, str], requests: int, concurrency: int
                 ) -> tuple[list[float], Counter[str], float]:
    """Latencies of successful requests, outcomes by status or exception, wall seconds."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            for _ in remaining:
                start = time.perf_counter()
                try:
                    response = await client.post(url, content=data, headers=headers)
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                    continue
                outcomes[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    return latencies, outcomes, wall


def percentiles_ms(latencies: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000.0, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="registered model URI (default: train a small Glow)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI holding --model")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/serve"))
    parser.add_argument("--requests", type=int, default=300, help="measured requests per concurrency level")
    parser.add_argument("--load", action="store_true", help=f"also send {LOAD_REQUESTS} requests at "
                        f"concurrency {LOAD_CONCURRENCY} and count errors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if bool(args.model) != bool(args.tracking_uri):
        parser.error("--model and --tracking-uri go together")
    model, tracking = args.model, args.tracking_uri
    if model is None:
        tracking = f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
        model = "models:/flowood-glow@candidate"
        if not (args.workdir / "mlflow.db").exists():
            train_and_register(synthetic_crops(args.workdir), TrainConfig(family="glow", epochs=1, workers=2), GLOW,
                               "bench-serve", args.workdir / "ray_results", tracking)
    configure(tracking)
    data = face_jpeg()
    bare, score_only = bare_seconds(model, data, repeats=100)
    print(f"model {model}; image 320x240 JPEG, {len(data)} bytes; {os.cpu_count()} CPUs")
    print(f"bare in-process: {bare * 1000:7.2f} ms per image (decode+detect+align+score), "
          f"score alone {score_only * 1000:.2f} ms")

    port = free_port()
    token = os.environ.get(TOKEN_ENV)
    headers = {"content-type": "image/jpeg", **({"authorization": f"Bearer {token}"} if token else {})}
    url = f"http://127.0.0.1:{port}/v1/score/image"
    run_server([model], host="127.0.0.1", port=port, tracking_uri=tracking, blocking=False)
    try:
        asyncio.run(hammer(url, data, headers, WARMUP, 1))
        columns = ("concurrency", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s")
        print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (11, 8, 6, 8, 8, 8, 7))))
        serve_p50 = float("nan")
        for concurrency in CONCURRENCY:
            latencies, outcomes, wall = asyncio.run(hammer(url, data, headers, args.requests, concurrency))
            p50, p95, p99 = percentiles_ms(latencies)
            errors = args.requests - outcomes["200"]
            print(f"{concurrency:>11} {args.requests:>8} {errors:>6} {p50:8.1f} {p95:8.1f} {p99:8.1f} "
                  f"{args.requests / wall:7.1f}")
            if concurrency == 1:
                serve_p50 = p50
        print(f"overhead of Serve + HTTP at concurrency 1: {serve_p50 - bare * 1000:.1f} ms per request "
              f"(p50 {serve_p50:.1f} ms vs bare {bare * 1000:.1f} ms)")
        if args.load:
            latencies, outcomes, wall = asyncio.run(hammer(url, data, headers, LOAD_REQUESTS, LOAD_CONCURRENCY))
            p50, p95, p99 = percentiles_ms(latencies)
            errors = {k: v for k, v in outcomes.items() if k != "200"}
            print(f"load: {LOAD_REQUESTS} requests at concurrency {LOAD_CONCURRENCY} in {wall:.1f} s "
                  f"({LOAD_REQUESTS / wall:.1f} req/s), p50/p95/p99 {p50:.1f}/{p95:.1f}/{p99:.1f} ms, "
                  f"errors: {sum(errors.values())} {errors or ''}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
