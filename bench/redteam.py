"""Red-team benchmark on real footage: every family trained on the real clips of some people, judged on
forged and real clips of other people.

1. `flowood forge` the real clips (default ../shared/realfaces with its people.csv): the four FF++
   families with masks, splits by person; or, with --archive, an archive made already (a forge output,
   or the synthetic benchmark of `flowood synth`, whose drawn identities are its people);
2. crop every split (face meshes kept for the blend family);
3. train and register each family on the train people (real clips only; the supervised classifier
   also sees the train people's forgeries), calibrated on the val people's real clips;
4. score the test people's real and forged clips: video AUROC per family, score and method, the share
   of each method's fakes flagged at the calibrated 1% FPR threshold, and the share of held-out real
   clips flagged at 1% and 5% (what a user would see as false alarms);
5. recalibrate on reference reals of the test domain (`redteam_recalibration`): the validation and test
   people's whole recordings cut into windows, each a clip; thresholds from the validation people's windows
   (before) and from reference windows of the test people (after), measured on the other test windows.
   Needs a forged archive (its forge_meta.json says whose recordings are where); skipped with --archive
   of a synthetic benchmark.

6. with --leave-one-out, the supervised classifier once more per method, trained without that method's
   fakes: the AUROC it keeps on the method it never saw, with and without its abnormality module, and
   noisy-OR'd with the blend detector's score.

Steps are cached in the work directory (trained models, test and window scores, pixel metrics), so a
rerun skips what is done. Prints Markdown tables and writes redteam.json. Usage: python bench/redteam.py
[--realfaces DIR | --archive DIR] [--work DIR] [--families ...] [--recipe FAMILY=EPOCHS[xSIZE] ...]
[--leave-one-out] [--window-seconds S] [--window-stride K]
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
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowood_ray.cluster.preprocess import run_preprocess  # noqa: E402
from flowood_ray.cluster.train import TrainConfig  # noqa: E402
from flowood_ray.cluster.train_job import train_and_register  # noqa: E402
from flowood_ray.demo import DemoConfig  # noqa: E402
from flowood_ray.media.datasets import build_manifest  # noqa: E402
from flowood_ray.media.faces import CropConfig  # noqa: E402
from flowood_ray.media.forge import ForgeConfig, forge_archive  # noqa: E402
from flowood_ray.media.sampling import SamplingConfig  # noqa: E402
from flowood_ray.evaluate import MASK_MANIPULATED_FROM  # noqa: E402
from flowood_ray.media.facecrop import crops_to_array, masks_to_array  # noqa: E402
from flowood_ray.media.shards import crop_dataset, crop_size, read_crop_images, read_videos  # noqa: E402
from flowood_ray.scoring.localization import localization_table  # noqa: E402
from flowood_ray.registry import configure, load_registered  # noqa: E402
from flowood_ray.scoring.calibration import Calibration  # noqa: E402
from flowood_ray.scoring.metrics import evaluate_table  # noqa: E402
from flowood_ray.scoring.scorers import build_scorer, score_videos  # noqa: E402
from redteam_glow import held_out_pairs, make_transfers, score_transfers  # noqa: E402
from redteam_recalibration import recalibration_study, window_crops, window_scores  # noqa: E402
from redteam_recalibration import markdown as recalibration_markdown  # noqa: E402

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


def recipe(family: str, overrides: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    """(epochs, model configs, cache tag) of a family: RECIPES, with --recipe FAMILY=EPOCHS[xSIZE] applied
    (SIZE is the input side of the family's network; the tag keeps a changed recipe's model apart)."""
    epochs, configs = RECIPES[family]
    if family not in overrides:
        return epochs, configs, ""
    epochs_text, _, size = overrides[family].partition("x")
    main = next(iter(configs))
    configs = {**configs, main: {**configs[main], **({"image_size": int(size)} if size else {})}}
    return int(epochs_text), configs, f"-e{epochs_text}" + (f"-s{size}" if size else "")


def train_step(crops: Path, work: Path, family: str, epochs: int, configs: dict[str, Any], workers: int,
               seed: int, tag: str = "", fake_methods: list[str] | None = None) -> dict[str, Any]:
    """Train and register once; the summary is cached so that a rerun reuses the registered version."""
    cache = work / "trained" / f"{family}{tag}-seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    started = time.perf_counter()
    summary = train_and_register(
        crops, TrainConfig(family=family, epochs=epochs, batch_size=32, workers=workers, seed=seed,
                           fake_methods=fake_methods), configs,
        f"redteam-{family}{tag}-seed{seed}", work / "ray_results", f"sqlite:///{work / 'mlflow.db'}",
    )
    summary = {k: v for k, v in summary.items() if k != "calibration"} | {"train_seconds": time.perf_counter() - started}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(summary, indent=1))
    return summary


def score_test_split(crops: Path, name: str, version: str) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Video and frame scores of the test people's clips (label, method and every score of the model),
    and the model's calibration. The scores are cached beside the crops, so a rerun only reads them."""
    bundle = load_registered(f"models:/{name}/{version}")
    cache = [crops.parent / "test_scores" / f"{name}-v{version}-{level}.parquet" for level in ("video", "frame")]
    if all(path.exists() for path in cache):
        return pq.read_table(cache[0]), pq.read_table(cache[1]), bundle.calibration
    scorer = build_scorer(bundle)
    videos = read_videos(crops).filter((pc.field("split") == "test") & (pc.field("faces") > 0))
    images, ids = read_crop_images(crops, videos.column("video_id").to_pylist())
    frame_scores = score_videos(scorer, images, ids, batch_size=64)
    video_ids, per_video = scorer.aggregate(ids, frame_scores)
    meta = {r["video_id"]: r for r in videos.select(["video_id", "label", "method"]).to_pylist()}

    def labelled(keys: np.ndarray, scores: dict[str, np.ndarray]) -> pa.Table:
        return pa.table({"video_id": keys, "label": [meta[v]["label"] for v in keys],
                         "method": [meta[v]["method"] for v in keys], **scores})

    tables = labelled(video_ids, per_video), labelled(ids, frame_scores)
    cache[0].parent.mkdir(exist_ok=True)
    for table, path in zip(tables, cache):
        pq.write_table(table, path)
    return *tables, bundle.calibration


def pixel_metrics(crops: Path, name: str, version: str, frames_per_clip: int = 4) -> dict[str, Any]:
    """Pixel AUROC and AUPRO of a map family's maps against the forged masks, on `frames_per_clip` evenly
    spaced frames of every test clip (the 1st, 9th, 17th, 25th of 32), each method's fakes with every real
    frame as negatives. Cached beside the crops."""
    cache = crops.parent / "test_scores" / f"{name}-v{version}-pixels{frames_per_clip}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    scorer = build_scorer(load_registered(f"models:/{name}/{version}"))
    videos = read_videos(crops).filter((pc.field("split") == "test") & (pc.field("faces") > 0))
    method = dict(zip(videos.column("video_id").to_pylist(), videos.column("method").to_pylist()))
    table = crop_dataset(crops).to_table(columns=["video_id", "frame_index", "crop", "mask"],
                                         filter=pc.field("video_id").isin(list(method)))
    table = table.sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
    ids = np.array(table.column("video_id").to_pylist())
    rows = [np.flatnonzero(ids == v) for v in method]
    chosen = table.take(np.concatenate([r[:: max(1, len(r) // frames_per_clip)][:frames_per_clip] for r in rows]))
    size = crop_size(crops)
    images = crops_to_array(chosen, size)
    maps = np.concatenate([scorer.pixel_map(images[i : i + 32]) for i in range(0, len(images), 32)])
    labels = np.array([method[v] for v in chosen.column("video_id").to_pylist()], dtype=object)
    table = localization_table(masks_to_array(chosen, size) >= MASK_MANIPULATED_FROM, maps, labels)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(table, default=float))
    return table


def flag_rates(videos: pa.Table, frames: pa.Table, calibration: dict[str, Any]) -> dict[str, Any]:
    """Share of each method's test videos (and frames) above the primary score's calibrated 1% threshold,
    and of the held-out reals at 1% and 5%. A threshold too few reals stand behind flags nothing."""
    primary = calibration["primary"]
    rates: dict[str, Any] = {}
    for level, table in (("video", videos), ("frame", frames)):
        cal = Calibration.model_validate(calibration[level][primary])
        scores = table.column(primary).to_numpy()
        methods = np.array(table.column("method").to_pylist())
        for fpr in (0.01, 0.05):
            rates[f"{level}:real@{fpr:g}"] = float((scores[methods == "real"] > cal.threshold(fpr)).mean())
        for method in sorted(set(methods) - {"real"}):
            rates[f"{level}:{method}"] = float((scores[methods == method] > cal.threshold(0.01)).mean())
        rates[f"{level}:n"], rates[f"{level}:resolved"] = cal.n, cal.resolved[0.01]
    return rates


def markdown(rows: list[dict[str, Any]], rates: dict[str, dict[str, float]]) -> str:
    methods = sorted({r["subset"] for r in rows} - {"all"})
    lines = ["| family | score | all | " + " | ".join(methods) + " |", "|" + " --- |" * (3 + len(methods))]
    for r in rows:
        if r["subset"] == "all" and r["level"] == "video":
            cells = [f"{next(x['auroc'] for x in rows if x['score'] == r['score'] and x['subset'] == s and x['family'] == r['family']):.2f}"
                     for s in ["all", *methods]]
            lines.append(f"| {r['family']} | {r['score']} | " + " | ".join(cells) + " |")
    for level in ("video", "frame"):
        lines += ["", f"Share flagged at the calibrated 1% FPR {level} threshold (primary score), and held-out "
                  f"real {level}s flagged at 1% / 5% (calibrated on the val people's real {level}s):", "",
                  "| family | " + " | ".join(methods) + " | real@1% | real@5% | calibration n | resolved |",
                  "|" + " --- |" * (5 + len(methods))]
        for family, rate in rates.items():
            lines.append(f"| {family} | " + " | ".join(f"{rate.get(f'{level}:{m}', float('nan')):.2f}" for m in methods)
                         + f" | {rate[f'{level}:real@0.01']:.2f} | {rate[f'{level}:real@0.05']:.2f} | "
                         f"{rate[f'{level}:n']} | {'yes' if rate[f'{level}:resolved'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realfaces", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "realfaces")
    parser.add_argument("--archive", type=Path, help="judge on an existing archive split by person instead of "
                        "forging --realfaces: `flowood forge` output or a synthetic benchmark (`flowood synth`)")
    parser.add_argument("--work", type=Path, default=Path("bench_out/redteam"))
    parser.add_argument("--families", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled per clip")
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--recipe", nargs="*", default=[], metavar="FAMILY=EPOCHS[xSIZE]",
                        help="change a family's recipe, e.g. classifier=3x64 (3 epochs at 64 px)")
    parser.add_argument("--window-seconds", type=float, default=1.0, help="length of the recalibration study's clips")
    parser.add_argument("--window-stride", type=int, default=3, help="every how many frames the study samples")
    parser.add_argument("--leave-one-out", action="store_true", help="with the classifier in --families: train it "
                        "once more per method without that method's fakes, and judge it on the method it never saw")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    configure(f"sqlite:///{work / 'mlflow.db'}")
    forged = args.archive.resolve() if args.archive else forge_step(args.realfaces.resolve(), work, args.clip_seconds,
                                                                    args.workers)
    crops = crop_step(forged, work, args.crop_size, args.frames, args.workers)
    rows: list[dict[str, Any]] = []
    rates: dict[str, dict[str, float]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    recalibration: dict[str, dict[str, Any]] = {}
    pixels: dict[str, dict[str, Any]] = {}
    windows = (window_crops(forged, work, args.crop_size, args.window_stride, args.workers)
               if (forged / "forge_meta.json").exists() else None)
    overrides = dict(item.split("=", 1) for item in args.recipe)
    video_scores: dict[str, pa.Table] = {}
    for family in args.families:
        epochs, configs, tag = recipe(family, overrides)
        summary = summaries[family] = train_step(crops, work, family, epochs, configs, args.workers, args.seed, tag)
        videos, frames, calibration = score_test_split(crops, summary["name"], summary["version"])
        video_scores[family] = videos
        scores = [c for c in videos.column_names if c not in ("video_id", "label", "method")]
        rows += [r | {"family": family} for r in evaluate_table(videos, "video", scores, n_boot=200)]
        rows += [r | {"family": family} for r in evaluate_table(frames, "frame", scores, n_boot=100)]
        rates[family] = flag_rates(videos, frames, calibration)
        if windows is not None:
            table = window_scores(*windows, summary["name"], summary["version"], args.window_seconds, min_frames=3)
            recalibration[family] = recalibration_study(table)
        if build_scorer(load_registered(f"models:/{summary['name']}/{summary['version']}")).map_name:
            pixels[family] = pixel_metrics(crops, summary["name"], summary["version"])
        log.info("%s: %s", family, json.dumps(rates[family]))
    unseen: list[dict[str, Any]] = []
    if args.leave_one_out:
        if "classifier" not in video_scores:
            parser.error("--leave-one-out needs the classifier in --families")
        epochs, configs, tag = recipe("classifier", overrides)
        unseen = leave_one_out(crops, work, epochs, configs, tag, args, video_scores)
    glow: dict[str, dict[str, float]] = {}
    if "glow" in summaries:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        glow_uri = f"models:/{summaries['glow']['name']}/{summaries['glow']['version']}"
        transfers = make_transfers(crops, glow_uri, uri, held_out_pairs(crops, forged))
        glow = {family: score_transfers(transfers, s["name"], s["version"]) for family, s in summaries.items()}
    (work / "redteam.json").write_text(json.dumps({"auroc": rows, "flag_rates": rates, "recalibration": recalibration,
                                                  "pixel_metrics": pixels, "glow_transfers": glow,
                                                  "leave_one_out": unseen},
                                                  indent=1, default=str))
    print(markdown(rows, rates))
    if recalibration:
        print("\nHeld-out real windows flagged before (thresholds from the validation people's windows) and after "
              "recalibration on reference windows of the test people; mean (10th-90th percentile) over draws:\n")
        print(recalibration_markdown(recalibration))
    if pixels:
        print("\nPixel AUROC / AUPRO (to 30% FPR) of the maps against the forged masks, 4 frames a clip:\n")
        subsets = sorted({k for p in pixels.values() for k in p})
        print("| family | " + " | ".join(subsets) + " |\n|" + " --- |" * (1 + len(subsets)))
        for family, p in pixels.items():
            print(f"| {family} | " + " | ".join(f"{p[k]['pixel_auroc']:.2f} / {p[k]['aupro']:.2f}" for k in subsets) + " |")
    if glow:
        print("\nGlow expression transfers of the test people (alpha 1): share flagged at the calibrated 1% "
              "video / frame thresholds, and video AUROC against the targets' own Glow reconstructions:\n")
        print("| family | linear flagged (video / frame) | variance flagged (video / frame) | reconstructions "
              "flagged (video / frame) | AUROC linear | AUROC variance |\n|" + " --- |" * 6)
        for family, g in glow.items():
            print(f"| {family} | {g['linear_video_flagged']:.2f} / {g['linear_frame_flagged']:.2f} | "
                  f"{g['variance_video_flagged']:.2f} / {g['variance_frame_flagged']:.2f} | "
                  f"{g['reconstruction_video_flagged']:.2f} / {g['reconstruction_frame_flagged']:.2f} | "
                  f"{g['linear_auroc_vs_reconstruction']:.2f} | {g['variance_auroc_vs_reconstruction']:.2f} |")

    if unseen:
        print("\nLeave one method out: video AUROC on the method the classifier never saw (its fakes against "
              "the test reals), beside the classifier that saw every method, and the noisy-OR with the blend "
              "detector's score:\n")
        columns = list(unseen[0]["auroc"])
        print("| unseen method | " + " | ".join(columns) + " |\n|" + " --- |" * (1 + len(columns)))
        for row in unseen:
            print(f"| {row['method']} | " + " | ".join(f"{row['auroc'][c]:.2f}" for c in columns) + " |")


def noisy_or(*logits: np.ndarray) -> np.ndarray:
    """-log P(no detector fires) of detectors read as independent, from their fake log-odds: a monotone form
    of 1 - prod(1 - p_i), as the classifier's own fake-or-abnormal score."""
    return sum(np.logaddexp(0.0, x) for x in logits)


def leave_one_out(crops: Path, work: Path, epochs: int, configs: dict[str, Any], tag: str, args: argparse.Namespace,
                  video_scores: dict[str, pa.Table]) -> list[dict[str, Any]]:
    """Per method: the classifier trained without that method's fakes, judged on that method's test fakes
    against the test reals, with and without its abnormality module, and noisy-OR'd with the blend detector;
    beside the same scores of the classifier that saw every method."""
    methods = sorted(set(video_scores["classifier"].column("method").to_pylist()) - {"real"})
    blend = video_scores.get("blend")
    rows = []
    for method in methods:
        summary = train_step(crops, work, "classifier", epochs, configs, args.workers, args.seed,
                             f"{tag}-minus-{method}", [m for m in methods if m != method])
        held_out, _, _ = score_test_split(crops, summary["name"], summary["version"])
        auroc: dict[str, float] = {}
        for name, table in (("saw it", video_scores["classifier"]), ("unseen", held_out)):
            subset = table.filter(pc.field("method").isin(["real", method]))
            labels = subset.column("label").to_numpy()
            scores = {s: subset.column(s).to_numpy() for s in ("cls_fake", "cls_abnormality", "cls_fake_or_abnormal")}
            if blend is not None:
                blend_of = dict(zip(blend.column("video_id").to_pylist(), blend.column("blend_fake").to_numpy()))
                blend_scores = np.array([blend_of[v] for v in subset.column("video_id").to_pylist()])
                scores["noisy-OR(cls_fake, blend_fake)"] = noisy_or(scores["cls_fake"], blend_scores)
            for score, values in scores.items():
                auroc[f"{score}, {name}"] = float(roc_auc_score(labels, values))
        rows.append({"method": method, "auroc": auroc, "classifier": summary["name"], "version": summary["version"]})
        log.info("leave out %s: %s", method, json.dumps(auroc))
    return rows


if __name__ == "__main__":
    main()
