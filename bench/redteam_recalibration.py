"""Recalibration on reference reals of the held-out people's domain (issue 16), with clips as the units.

The forged test clips are the first 4 s of each recording, too few to resolve a 1% or 5% threshold (23
clips of the 9 test people). Here every real recording of the validation and test people is cut, whole,
into windows of `window_seconds`; each window is a clip: its frames' mean is its video score, and at
frame level its frames share one unit of weight (`flowood_ray.scoring.conformal`).

- before: thresholds from the validation people's windows (the model's own held-out people);
- after: thresholds from reference windows of the test people (what `flowood calibrate` does with a user's
  known reals), drawn three ways, each repeated over random draws:
    window     a random set of windows: reference clips sampled from the archive itself, which is what the
               conformal guarantee assumes;
    recording  whole recordings: a recording's windows all go to one side;
    person     whole people: the measured footage is of people the reference never showed.
  The reference holds half the windows, or the 1/fpr that resolve the rate if that is more.
Both are measured on the same remaining test windows: the share of windows flagged (video level), and the
mean share of a window's frames flagged (frame level). For comparison, the frame rule that counted frames
as units ("frames pooled"): thresholds from the reference frames as if each were a clip of its own.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowood_ray.cluster.preprocess import run_preprocess
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.facecrop import crops_to_array
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import crop_dataset, crop_size, read_videos
from flowood_ray.registry import load_registered
from flowood_ray.scoring.calibration import Calibration, calibrate, verdict
from flowood_ray.scoring.scorers import build_scorer, score_videos

SPLITS = ("window", "recording", "person")
FPRS = (0.01, 0.05)


def window_crops(forged: Path, work: Path, size: int, stride: int, workers: int) -> tuple[Path, dict[str, str]]:
    """Crops of every `stride`-th frame of the validation and test people's whole real recordings, and
    recording path -> person."""
    videos = json.loads((forged / "forge_meta.json").read_text())["videos"]
    chosen = [v for v in videos.values() if v["split"] in ("val", "test") and v["status"] == "ok"]
    listing = work / "held_out_recordings.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows([v["path"], "real", v["split"]] for v in chosen)
    crops = work / "window_crops"
    run_preprocess(build_manifest(listing), crops, SamplingConfig(mode="stride", stride=stride),
                   CropConfig(size=size, face_mesh=False), workers=workers)
    return crops, {v["path"]: v["person"] for v in chosen}


def window_scores(crops: Path, person_of: dict[str, str], name: str, version: str, window_seconds: float,
                  min_frames: int) -> pa.Table:
    """The primary frame score of every window crop, with its window ("recording:index"), recording, person
    and split; windows with fewer than `min_frames` faces are left out. Cached beside the crops."""
    cache = crops / "scores" / f"{name}-v{version}-w{window_seconds:g}-m{min_frames}.parquet"
    if cache.exists():
        return pq.read_table(cache)
    scorer = build_scorer(load_registered(f"models:/{name}/{version}"))
    videos = read_videos(crops).filter(pc.field("faces") > 0)
    meta = {r["video_id"]: r for r in videos.select(["video_id", "path", "split"]).to_pylist()}
    table = crop_dataset(crops).to_table(columns=["video_id", "frame_index", "timestamp_s", "crop"],
                                         filter=pc.field("video_id").isin(list(meta)))
    table = table.sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
    ids = np.array(table.column("video_id").to_pylist())
    scores = score_videos(scorer, crops_to_array(table, crop_size(crops)), ids, batch_size=64)[scorer.primary]
    index = np.floor(table.column("timestamp_s").to_numpy() / window_seconds).astype(int)
    windows = np.array([f"{v}:{i}" for v, i in zip(ids, index)])
    keep = np.isin(windows, [w for w, c in zip(*np.unique(windows, return_counts=True)) if c >= min_frames])
    table = pa.table({
        "window": windows[keep], "recording": ids[keep], "score": scores[keep],
        "person": [person_of[meta[v]["path"]] for v in ids[keep]], "split": [meta[v]["split"] for v in ids[keep]],
    })
    cache.parent.mkdir(exist_ok=True)
    pq.write_table(table, cache)
    return table


def window_means(windows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each window's mean frame score (its video score), in the order of np.unique(windows)."""
    _, inverse = np.unique(windows, return_inverse=True)
    return np.bincount(inverse, weights=scores) / np.bincount(inverse)


class Reference:
    """The calibrations `flowood calibrate` would register from a set of real windows at one rate: video
    (window means), frame (clips as units), and, for comparison, frames pooled as if each were a clip."""

    def __init__(self, windows: np.ndarray, scores: np.ndarray, fpr: float) -> None:
        options: dict[str, Any] = {"fprs": (fpr,), "min_samples": 1}
        self.fpr = fpr
        self.video = calibrate({"s": window_means(windows, scores)}, "video", **options)["s"]
        self.frame = calibrate({"s": scores}, "frame", groups=windows, **options)["s"]
        self.pooled = calibrate({"s": scores}, "frame", **options)["s"]

    def flag_rates(self, windows: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        """Share of the measured windows flagged, and the mean share of their frames flagged (each window
        weighing one); None where the calibration cannot resolve the rate."""
        _, inverse = np.unique(windows, return_inverse=True)
        frames = np.bincount(inverse)

        def share(calibration: Calibration, values: np.ndarray, per_window: bool) -> float | None:
            if not calibration.resolved[self.fpr]:
                return None
            flags = verdict(values, calibration, self.fpr).astype(float)
            return float(np.mean(np.bincount(inverse, weights=flags) / frames if per_window else flags))

        return {"video": share(self.video, window_means(windows, scores), False),
                "frame": share(self.frame, scores, True), "frame_pooled": share(self.pooled, scores, True)}


def draw_reference(groups: np.ndarray, windows: np.ndarray, needed: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of whole groups, in random order, until they hold `needed` windows; a boolean mask."""
    reference = np.zeros(len(groups), dtype=bool)
    for group in rng.permutation(np.unique(groups)):
        if np.unique(windows[reference]).size >= needed:
            break
        reference |= groups == group
    return reference


def recalibration_study(table: pa.Table, repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    """Held-out real flag rates before and after recalibration, by level, split kind and fpr: the mean over
    `repeats` draws of the reference, and the 10th and 90th percentiles."""
    column = lambda t, n: np.asarray(t.column(n).to_pylist())  # noqa: E731
    val, test = (table.filter(pc.field("split") == s) for s in ("val", "test"))
    windows, scores = column(test, "window"), column(test, "score")
    total = np.unique(windows).size
    out: dict[str, Any] = {"val_windows": len(set(column(val, "window"))), "test_windows": total,
                           "test_people": len(set(column(test, "person"))), "val_frames": int(val.num_rows),
                           "test_frames": int(test.num_rows), "rates": {}}
    # Draws that cannot resolve a rate are reported as such; the calibration's own warning would repeat per draw.
    logging.getLogger("flowood_ray.scoring.calibration").setLevel(logging.ERROR)
    rng = np.random.default_rng(seed)
    befores = {fpr: Reference(column(val, "window"), column(val, "score"), fpr) for fpr in FPRS}
    for split in SPLITS:
        groups = {"window": windows, "recording": column(test, "recording"), "person": column(test, "person")}[split]
        for fpr in FPRS:
            before = befores[fpr]
            needed = max(math.ceil(1.0 / fpr - 1e-9), math.ceil(total / 2))  # Calibration.resolved's count
            draws: dict[str, list[float]] = {}
            sizes = []
            for _ in range(repeats):
                reference = draw_reference(groups, windows, needed, rng)
                if reference.all():
                    continue  # nothing left to measure
                after = Reference(windows[reference], scores[reference], fpr)
                sizes.append(after.video.n)
                measured = windows[~reference], scores[~reference]
                rates = {**{f"before_{k}": v for k, v in before.flag_rates(*measured).items()},
                         **{f"after_{k}": v for k, v in after.flag_rates(*measured).items()}}
                for key, value in rates.items():
                    if value is not None:
                        draws.setdefault(key, []).append(value)
            out["rates"][f"{split}@{fpr:g}"] = {
                "reference_windows": float(np.mean(sizes)) if sizes else None, "draws": len(sizes),
                **{key: {"mean": float(np.mean(v)), "p10": float(np.quantile(v, 0.1)), "p90": float(np.quantile(v, 0.9))}
                   for key, v in draws.items()},
            }
    return out


def markdown(studies: dict[str, dict[str, Any]]) -> str:
    """One row per family, split kind and level: before and after at 1% and 5% (mean over draws)."""
    def cell(rates: dict[str, Any], key: str) -> str:
        value = rates.get(key)
        return "unresolved" if value is None else f"{value['mean']:.3f} ({value['p10']:.3f}-{value['p90']:.3f})"

    lines = ["| family | reference drawn by | level | 1%: before | 1%: after | 5%: before | 5%: after |",
             "|" + " --- |" * 7]
    for family, study in studies.items():
        for split in SPLITS:
            for level in ("video", "frame", "frame_pooled"):
                cells = [cell(study["rates"][f"{split}@{fpr:g}"], f"{when}_{level}") for fpr in FPRS
                         for when in ("before", "after")]
                lines.append(f"| {family} | {split} | {level.replace('_', ', ')} | " + " | ".join(cells) + " |")
    first = next(iter(studies.values()), None)
    if first:
        lines.append(f"\n{first['val_windows']} validation windows ({first['val_frames']} frames), {first['test_windows']} "
                     f"test windows ({first['test_frames']} frames) of {first['test_people']} test people.")
    return "\n".join(lines)
