"""Red-team benchmark on real footage: every family trained on the real clips of some people, judged on
forged and real clips of other people.

1. `flowood forge` the real clips (default ../shared/realfaces with its people.csv): the four FF++
   families with masks, splits by person;
2. crop every split (face meshes kept for the blend family);
3. train and register each family on the train people (real clips only; the supervised classifier
   also sees the train people's forgeries), calibrated on the val people's real clips;
4. score the test people's real and forged clips: video AUROC per family, score and method, the share
   of each method's fakes flagged at the calibrated 1% FPR threshold, and the share of held-out real
   clips flagged at 1% and 5% (what a user would see as false alarms).

Steps are cached in the work directory, so a rerun skips what is done. Prints Markdown tables and
writes redteam.json. Usage: python bench/redteam.py [--realfaces DIR] [--work DIR] [--families ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowood_ray.cluster.preprocess import run_preprocess  # noqa: E402
from flowood_ray.cluster.train import TrainConfig  # noqa: E402
from flowood_ray.cluster.train_job import train_and_register  # noqa: E402
from flowood_ray.demo import DemoConfig  # noqa: E402
from flowood_ray.media.datasets import build_manifest  # noqa: E402
from flowood_ray.media.faces import CropConfig  # noqa: E402
from flowood_ray.media.forge import ForgeConfig, forge_archive  # noqa: E402
from flowood_ray.media.sampling import SamplingConfig  # noqa: E402
from flowood_ray.media.shards import read_crop_images, read_videos  # noqa: E402
from flowood_ray.registry import load_registered  # noqa: E402
from flowood_ray.scoring.metrics import evaluate_table  # noqa: E402
from flowood_ray.scoring.scorers import build_scorer, score_videos  # noqa: E402

log = logging.getLogger("redteam")
_DEMO = DemoConfig()
# family -> (epochs, model configs): the ImageNet-backed families at 128 px, the demo's small whole-face
# models at 64 px. Learning rates are each family's default.
RECIPES: dict[str, tuple[int, dict[str, Any]]] = {
    "blend": (8, {"detector": {"image_size": 128}}),
    "classifier": (8, {"classifier": {"image_size": 128}}),
    "cflow": (6, {"cflow": {"image_size": 128}}),
    "differnet": (6, {"differnet": {"image_size": 128}}),
    "svdd": (6, {"svdd": {"image_size": 128}}),
    "patchsvdd": (1, {"patchsvdd": {"image_size": 128}}),
    "glow": (8, _DEMO.glow), "vqvae": (8, _DEMO.vqvae), "clip": (8, _DEMO.clip), "patch": (8, _DEMO.patch),
}


def forge_step(realfaces: Path, work: Path, clip_seconds: float, workers: int) -> Path:
    out = work / "forged"
    people = realfaces / "people.csv"
    forge_archive(realfaces, out, ForgeConfig(clip_seconds=clip_seconds, workers=workers),
                  people if people.exists() else None)
    return out


def crop_step(forged: Path, work: Path, crop_size: int, frames: int, workers: int) -> Path:
    crops = work / "crops"
    run_preprocess(build_manifest(forged), crops, SamplingConfig(num_frames=frames),
                   CropConfig(size=crop_size, face_mesh=True), workers=workers)
    return crops


def train_step(crops: Path, work: Path, family: str, epochs: int, configs: dict[str, Any], workers: int,
               seed: int) -> dict[str, Any]:
    """Train and register once; the summary is cached so that a rerun reuses the registered version."""
    cache = work / "trained" / f"{family}-seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    started = time.perf_counter()
    summary = train_and_register(
        crops, TrainConfig(family=family, epochs=epochs, batch_size=32, workers=workers, seed=seed), configs,
        f"redteam-{family}-seed{seed}", work / "ray_results", f"sqlite:///{work / 'mlflow.db'}",
    )
    summary = {k: v for k, v in summary.items() if k != "calibration"} | {"train_seconds": time.perf_counter() - started}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(summary, indent=1))
    return summary


def score_test_split(crops: Path, name: str, version: str) -> tuple[pa.Table, dict[str, Any]]:
    """Video scores of the test people's clips (label, method and every score of the model), and the
    model's calibration."""
    bundle = load_registered(f"models:/{name}/{version}")
    scorer = build_scorer(bundle)
    videos = read_videos(crops).filter((pc.field("split") == "test") & (pc.field("faces") > 0))
    images, ids = read_crop_images(crops, videos.column("video_id").to_pylist())
    frame_scores = score_videos(scorer, images, ids, batch_size=64)
    video_ids, per_video = scorer.aggregate(ids, frame_scores)
    meta = {r["video_id"]: r for r in videos.select(["video_id", "label", "method"]).to_pylist()}
    table = pa.table({"video_id": video_ids, "label": [meta[v]["label"] for v in video_ids],
                      "method": [meta[v]["method"] for v in video_ids], **per_video})
    return table, bundle.calibration


def flag_rates(table: pa.Table, calibration: dict[str, Any]) -> dict[str, float]:
    """Share of each method's test videos above the primary score's video threshold at 1% (and of the
    reals at 1% and 5%)."""
    primary = calibration["primary"]
    cal = calibration["video"][primary]
    scores = table.column(primary).to_numpy()
    methods = np.array(table.column("method").to_pylist())
    rates = {f"real@{f}": float((scores[methods == "real"] > cal["thresholds"][f]).mean()) for f in ("0.01", "0.05")}
    for method in sorted(set(methods) - {"real"}):
        rates[method] = float((scores[methods == method] > cal["thresholds"]["0.01"]).mean())
    rates["n_calibration_videos"] = cal["n"]
    return rates


def markdown(rows: list[dict[str, Any]], rates: dict[str, dict[str, float]]) -> str:
    methods = sorted({r["subset"] for r in rows} - {"all"})
    lines = ["| family | score | all | " + " | ".join(methods) + " |", "|" + " --- |" * (3 + len(methods))]
    for r in rows:
        if r["subset"] == "all":
            cells = [f"{next(x['auroc'] for x in rows if x['score'] == r['score'] and x['subset'] == s):.2f}"
                     for s in ["all", *methods]]
            lines.append(f"| {r['family']} | {r['score']} | " + " | ".join(cells) + " |")
    lines += ["", "Detection rate at the calibrated 1% FPR video threshold (primary score), and held-out real "
              "videos flagged at 1% / 5%:", "",
              "| family | " + " | ".join(methods) + " | real@1% | real@5% | calibration videos |",
              "|" + " --- |" * (4 + len(methods))]
    for family, rate in rates.items():
        lines.append(f"| {family} | " + " | ".join(f"{rate.get(m, float('nan')):.2f}" for m in methods)
                     + f" | {rate['real@0.01']:.2f} | {rate['real@0.05']:.2f} | {rate['n_calibration_videos']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realfaces", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "realfaces")
    parser.add_argument("--work", type=Path, default=Path("bench_out/redteam"))
    parser.add_argument("--families", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled per clip")
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    forged = forge_step(args.realfaces.resolve(), work, args.clip_seconds, args.workers)
    crops = crop_step(forged, work, args.crop_size, args.frames, args.workers)
    rows: list[dict[str, Any]] = []
    rates: dict[str, dict[str, float]] = {}
    for family in args.families:
        epochs, configs = RECIPES[family]
        summary = train_step(crops, work, family, epochs, configs, args.workers, args.seed)
        table, calibration = score_test_split(crops, summary["name"], summary["version"])
        scores = [c for c in table.column_names if c not in ("video_id", "label", "method")]
        rows += [r | {"family": family} for r in evaluate_table(table, "video", scores, n_boot=200)]
        rates[family] = flag_rates(table, calibration)
        log.info("%s: %s", family, json.dumps(rates[family]))
    (work / "redteam.json").write_text(json.dumps({"auroc": rows, "flag_rates": rates}, indent=1, default=str))
    print(markdown(rows, rates))


if __name__ == "__main__":
    main()
