"""Online scoring on Ray Serve: latency and throughput beside the bare model, in one run.

  bare      decode + detect + align + score of one face image in this process (no HTTP, no Serve)
  c1/c8/c32 POST /v1/score/image at concurrency 1, 8 and 32 against a local Serve on 127.0.0.1:
            p50/p95/p99 latency and requests/s
  overhead  Serve p50 at concurrency 1 minus the bare p50, measured alternately: one image in this
            process, then one request, so both see the same load (Ray's processes, other jobs); also
            against the bare time measured before the server started
  floor     p50 of GET /healthz, which does no work: what HTTP, the Serve proxy and the replica cost alone
  heatmaps  against a VQ-VAE (the demo's configuration): p50 of plain requests and of `?heatmap=1`
            requests for the same image, one at a time; then heatmap requests one after another while
            plain requests run beside them, and the p50 of those plain requests (a replica that let
            heatmaps block scoring would show the heatmap latency there)
  --load    2,000 requests at concurrency 16; counts errors by kind
  --replicas 2  redeploys with that many replicas and measures concurrency 32 again: requests/s beside
            the one-replica figure (each replica owns one CPU; the client shares the machine)
  --ingress  haproxy (HAProxy on the port, straight to the replicas) or proxy (Ray's Python proxy); auto,
            the default, is what `flowood serve` picks: HAProxy when Serve can find its binary

The image is a real photo (scikit-image's astronaut) as a 320x240 JPEG. A small Glow and a small
VQ-VAE are trained on a synthetic benchmark and registered first (not timed), unless --model and
--tracking-uri name a registry (then --heatmap-model names its VQ-VAE, or the heatmap phase is skipped).
Everything stays on loopback and every phase has a fixed request count (the plain requests beside the
heatmaps stop when those end, or at a cap), so the run ends by itself. The load average is printed at
the start and before the heatmap phase: the machine may be shared.
Usage: python bench/serve.py [--model URI --tracking-uri URI [--heatmap-model URI]] [--requests N]
       [--heatmaps N] [--bare-repeats N] [--load] [--replicas N] [--ingress auto|haproxy|proxy]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
import torch
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import synthetic_crops  # noqa: E402

from flowood_ray.cluster.serve import run_server  # noqa: E402
from flowood_ray.cluster.serve_ingress import choose_ingress, free_port  # noqa: E402
from flowood_ray.cluster.serve_inputs import decode_image  # noqa: E402
from flowood_ray.cluster.serve_settings import TOKEN_ENV  # noqa: E402
from flowood_ray.cluster.train import TrainConfig  # noqa: E402
from flowood_ray.cluster.train_job import train_and_register  # noqa: E402
from flowood_ray.demo import DemoConfig  # noqa: E402
from flowood_ray.media.align import align_face  # noqa: E402
from flowood_ray.media.faces import CropConfig, FaceDetector  # noqa: E402
from flowood_ray.registry import configure, list_models, load_registered  # noqa: E402
from flowood_ray.scoring.scorers import build_scorer  # noqa: E402

GLOW = {"glow": {"image_size": 64, "levels": 3, "steps_per_level": 4, "hidden_channels": 64}}
BENCH_MODELS = {"glow": GLOW, "vqvae": DemoConfig().vqvae}  # family -> model configs, trained if missing
CONCURRENCY = (1, 8, 32)
LOAD_REQUESTS, LOAD_CONCURRENCY = 2000, 16
WARMUP = 20
MULTIPLEX = "serve_multiplexed_model_id"
# Plain requests sent beside the heatmaps stop when the heatmaps are done, or at these caps.
BESIDE_MAX_REQUESTS, BESIDE_MAX_SECONDS = 5000, 600.0


def face_jpeg() -> bytes:
    photo = skimage.data.astronaut()
    frame = cv2.resize(photo[10:310, 90:390], (320, 240), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


class BareModel:
    """decode + detect + align + score of one face image in this process, as a replica does it."""

    def __init__(self, uri: str) -> None:
        # One intra-op thread, as in a replica (Ray sets OMP_NUM_THREADS to its num_cpus = 1): two threads on
        # the busy shared cores made the Glow score 40 times slower than in the replica.
        torch.set_num_threads(1)
        bundle = load_registered(uri)
        self.scorer = build_scorer(bundle)
        self.crop = CropConfig(**bundle.extra.get("crop", {}))
        self.detector = FaceDetector(self.crop)

    def seconds(self, data: bytes) -> tuple[float, float]:
        """(seconds for the whole image, seconds of the score call alone)."""
        start = time.perf_counter()
        rgb = decode_image(data, "image/jpeg", 4096 * 4096)
        faces = sorted(self.detector.detect(rgb), key=lambda f: f.area, reverse=True)
        crops = np.stack([align_face(rgb, f.keypoints, self.crop.size, self.crop.margin)[0] for f in faces])
        scored = time.perf_counter()
        self.scorer.score(crops)
        end = time.perf_counter()
        return end - start, end - scored

    def median_seconds(self, data: bytes, repeats: int) -> tuple[float, float]:
        timings = [self.seconds(data) for _ in range(repeats + WARMUP)][WARMUP:]
        return statistics.median(t for t, _ in timings), statistics.median(s for _, s in timings)


def alternating(bare: BareModel, url: str, data: bytes, headers: dict[str, str],
                requests: int) -> tuple[list[float], list[float], Counter[str], float]:
    """One image in this process, then one request to Serve, `requests` times: the bare and served
    latencies side by side under the same load (Ray's own processes included), outcomes, wall seconds of
    the requests."""
    bare_latencies: list[float] = []
    served: list[float] = []
    outcomes: Counter[str] = Counter()
    with httpx.Client(timeout=120) as client:
        for _ in range(requests):
            bare_latencies.append(bare.seconds(data)[0])
            start = time.perf_counter()
            response = client.post(url, content=data, headers=headers)
            outcomes[str(response.status_code)] += 1
            if response.status_code == 200:
                served.append(time.perf_counter() - start)
    return bare_latencies, served, outcomes, sum(served)


async def hammer(url: str, data: bytes, headers: dict[str, str], requests: int, concurrency: int,
                 method: str = "POST") -> tuple[list[float], Counter[str], float]:
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
                    response = await client.request(method, url, content=data or None, headers=headers)
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


async def plain_beside_heatmaps(plain_url: str, heatmap_url: str, data: bytes, headers: dict[str, str],
                                heatmaps: int) -> tuple[list[float], list[float], Counter[str]]:
    """(heatmap latencies, latencies of the plain requests sent one after another while the heatmap
    requests ran one after another, outcomes of both). Only plain requests that started and ended while
    heatmaps were still running count."""
    heatmap_latencies: list[float] = []
    plain_latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=120) as client:

        async def timed(url: str) -> float | None:
            start = time.perf_counter()
            try:
                response = await client.post(url, content=data, headers=headers)
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                return None
            outcomes[str(response.status_code)] += 1
            return time.perf_counter() - start if response.status_code == 200 else None

        async def heatmap_worker() -> None:
            try:
                for _ in range(heatmaps):
                    if (seconds := await timed(heatmap_url)) is not None:
                        heatmap_latencies.append(seconds)
            finally:
                done.set()

        async def plain_worker() -> None:
            deadline = time.perf_counter() + BESIDE_MAX_SECONDS
            for _ in range(BESIDE_MAX_REQUESTS):
                if done.is_set() or time.perf_counter() > deadline:
                    return
                seconds = await timed(plain_url)
                if seconds is not None and not done.is_set():
                    plain_latencies.append(seconds)

        await asyncio.gather(heatmap_worker(), plain_worker())
    return heatmap_latencies, plain_latencies, outcomes


def heatmap_phase(url: str, data: bytes, headers: dict[str, str], model: str, requests: int, heatmaps: int) -> None:
    """Prints the p50 of plain and `?heatmap=1` requests for `model`, alone and side by side."""
    headers = {**headers, MULTIPLEX: model}
    heatmap_url = f"{url}?heatmap=1"
    asyncio.run(hammer(heatmap_url, data, headers, 2, 1))  # loads the model, warms the restoration path
    check = httpx.post(heatmap_url, content=data, headers=headers, timeout=120)
    if check.status_code != 200 or check.json()["faces"][0]["heatmap"] is None:
        raise SystemExit(f"{model} gave no heatmap: {check.status_code} {check.text[:300]}")
    print(f"heatmaps with {model}, load average {os.getloadavg()[0]:.1f}:")
    plain, plain_outcomes, _ = asyncio.run(hammer(url, data, headers, requests, 1))
    mapped, mapped_outcomes, _ = asyncio.run(hammer(heatmap_url, data, headers, heatmaps, 1))
    beside_maps, beside_plain, beside_outcomes = asyncio.run(
        plain_beside_heatmaps(url, heatmap_url, data, headers, heatmaps)
    )
    errors = sum(c for o in (plain_outcomes, mapped_outcomes, beside_outcomes) for k, c in o.items() if k != "200")
    for name, latencies in (("plain, alone", plain), ("heatmap=1, alone", mapped),
                            ("heatmap=1, beside plain", beside_maps), ("plain, beside heatmaps", beside_plain)):
        p50, p95, _ = percentiles_ms(latencies) if latencies else (float("nan"),) * 3
        print(f"  {name:<24} {len(latencies):5d} requests  p50 {p50:8.1f} ms  p95 {p95:8.1f} ms")
    print(f"  errors: {errors}")


def percentiles_ms(latencies: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000.0, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="registered model URI (default: train a small Glow)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI holding --model")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/serve"))
    parser.add_argument("--heatmap-model", help="registered VQ-VAE URI for the heatmap phase (default: the one "
                        "trained here; with --model and without it, no heatmap phase)")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per concurrency level")
    parser.add_argument("--heatmaps", type=int, default=8, help="heatmap requests per heatmap measurement")
    parser.add_argument("--bare-repeats", type=int, default=100, help="timed in-process repeats")
    parser.add_argument("--replicas", type=int, default=0, help="also measure concurrency 32 with this many replicas")
    parser.add_argument("--ingress", choices=("auto", "haproxy", "proxy"), default="auto")
    parser.add_argument("--load", action="store_true", help=f"also send {LOAD_REQUESTS} requests at "
                        f"concurrency {LOAD_CONCURRENCY} and count errors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if bool(args.model) != bool(args.tracking_uri):
        parser.error("--model and --tracking-uri go together")
    model, tracking, heatmap_model = args.model, args.tracking_uri, args.heatmap_model
    if model is None:
        tracking = f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
        model, heatmap_model = "models:/flowood-glow@candidate", "models:/flowood-vqvae@candidate"
        configure(tracking)
        registered = {row["name"] for row in list_models() if "candidate" in row["aliases"]}
        for family, configs in BENCH_MODELS.items():
            if f"flowood-{family}" not in registered:
                train_and_register(synthetic_crops(args.workdir), TrainConfig(family=family, epochs=1, workers=2),
                                   configs, f"bench-serve-{family}", args.workdir / "ray_results", tracking)
        # The ingress is chosen where Ray starts: the server below starts its own.
        ray.shutdown()
    configure(tracking)
    data = face_jpeg()
    bare_model = BareModel(model)
    bare, score_only = bare_model.median_seconds(data, args.bare_repeats)
    print(f"model {model}; image 320x240 JPEG, {len(data)} bytes; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; ingress {choose_ingress(args.ingress)}")
    print(f"bare in-process: {bare * 1000:7.2f} ms per image (decode+detect+align+score), "
          f"score alone {score_only * 1000:.2f} ms")

    port = free_port()
    token = os.environ.get(TOKEN_ENV)
    headers = {"content-type": "image/jpeg", **({"authorization": f"Bearer {token}"} if token else {})}
    url = f"http://127.0.0.1:{port}/v1/score/image"
    run_server([model, *([heatmap_model] if heatmap_model else [])], host="127.0.0.1", port=port,
               tracking_uri=tracking, ingress=args.ingress, blocking=False)
    try:
        asyncio.run(hammer(url, data, headers, WARMUP, 1))
        columns = ("concurrency", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s")
        print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (11, 8, 6, 8, 8, 8, 7))))
        rates: dict[int, float] = {}
        for concurrency in CONCURRENCY:
            if concurrency == 1:
                bare_beside, latencies, outcomes, wall = alternating(bare_model, url, data, headers, args.requests)
            else:
                latencies, outcomes, wall = asyncio.run(hammer(url, data, headers, args.requests, concurrency))
            p50, p95, p99 = percentiles_ms(latencies)
            errors = args.requests - outcomes["200"]
            rates[concurrency] = outcomes["200"] / wall
            print(f"{concurrency:>11} {args.requests:>8} {errors:>6} {p50:8.1f} {p95:8.1f} {p99:8.1f} "
                  f"{args.requests / wall:7.1f}")
            if concurrency == 1:
                serve_p50, bare_p50 = p50, percentiles_ms(bare_beside)[0]
        print(f"overhead of Serve + HTTP at concurrency 1: {serve_p50 - bare_p50:.1f} ms per request (p50 "
              f"{serve_p50:.1f} ms vs bare {bare_p50:.1f} ms, one bare image before each request); against the "
              f"bare time before the server started ({bare * 1000:.1f} ms): {serve_p50 - bare * 1000:.1f} ms")
        floor = asyncio.run(hammer(url.replace("/v1/score/image", "/healthz"), b"", {}, args.requests, 1, "GET"))[0]
        print(f"floor: GET /healthz (no body, no work) p50 {percentiles_ms(floor)[0]:.1f} ms at concurrency 1")
        if heatmap_model:
            heatmap_phase(url, data, headers, heatmap_model, args.requests, args.heatmaps)
        if args.load:
            latencies, outcomes, wall = asyncio.run(hammer(url, data, headers, LOAD_REQUESTS, LOAD_CONCURRENCY))
            p50, p95, p99 = percentiles_ms(latencies)
            errors = {k: v for k, v in outcomes.items() if k != "200"}
            print(f"load: {LOAD_REQUESTS} requests at concurrency {LOAD_CONCURRENCY} in {wall:.1f} s "
                  f"({LOAD_REQUESTS / wall:.1f} req/s), p50/p95/p99 {p50:.1f}/{p95:.1f}/{p99:.1f} ms, "
                  f"errors: {sum(errors.values())} {errors or ''}")
        if args.replicas:
            run_server([model, *([heatmap_model] if heatmap_model else [])], host="127.0.0.1", port=port,
                       tracking_uri=tracking, num_replicas=args.replicas, blocking=False)
            asyncio.run(hammer(url, data, headers, WARMUP * args.replicas, args.replicas))
            latencies, outcomes, wall = asyncio.run(hammer(url, data, headers, args.requests, 32))
            p50, _, _ = percentiles_ms(latencies)
            print(f"{args.replicas} replicas at concurrency 32: {outcomes['200'] / wall:.1f} req/s (p50 {p50:.1f} ms, "
                  f"errors {args.requests - outcomes['200']}), {outcomes['200'] / wall / rates[32]:.2f}x one replica")
    finally:
        bare_model.detector.close()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
