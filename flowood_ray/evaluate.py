"""`flowood evaluate`: metrics, JSON and an HTML report from a scoring output directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowood_ray.cluster.score import CONFIG_FILE, read_scores
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.facecrop import crops_to_array
from flowood_ray.registry import configure, load_registered
from flowood_ray.scoring.calibration import Calibration
from flowood_ray.scoring.metrics import evaluate_table
from flowood_ray.scoring.report import write_metrics_json, write_report
from flowood_ray.scoring.scorers import VQVAEScorer, build_scorer

log = logging.getLogger(__name__)

NON_SCORE_COLUMNS = {"video_id", "frame_index", "timestamp_s", "keypoints", "crop"}
# Restorations cost one prior pass per code position on CPU: a handful of faces keeps reports quick.
HEATMAP_FACES = 4


def _labels_from(path: Path) -> pa.Table:
    """video_id -> label, method from a manifest parquet, a CSV, or any archive layout."""
    return build_manifest(path).select(["video_id", "label", "method"])


def _with_labels(videos: pa.Table, labels: pa.Table | None) -> pa.Table:
    if labels is None:
        return videos
    videos = videos.drop_columns(["label", "method"])
    joined = videos.join(labels, "video_id", join_type="left outer")
    unknown = pc.sum(pc.is_null(joined.column("label"))).as_py() or 0
    if unknown:
        log.warning("%d scored videos have no label in the given labels and are left out of the metrics", unknown)
    return joined


def score_columns(frames: pa.Table) -> list[str]:
    return [name for name in frames.column_names if name not in NON_SCORE_COLUMNS]


def _heatmaps(frames: pa.Table, config: dict[str, Any], crop_size: int, ranking: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Pixel maps of the most anomalous crops, from the run's VQ-VAE when it has one."""
    if "crop" not in frames.column_names:
        log.info("no crops saved with the scores (use --save-crops): the report has no heatmaps")
        return []
    vq_models = [m for m in config["models"] if "vqvae" in m["name"]]
    if not vq_models:
        return []
    bundle = load_registered(f"models:/{vq_models[0]['name']}/{vq_models[0]['version']}")
    scorer = build_scorer(bundle)
    assert isinstance(scorer, VQVAEScorer)
    order = np.argsort(-np.nan_to_num(frames.column(ranking).to_numpy(), nan=-np.inf))[:HEATMAP_FACES]
    top = frames.take(pa.array(order))
    crops = crops_to_array(top, crop_size)
    maps = scorer.pixel_map(crops)
    titles = [f"{r['video_id'][:8]} f{r['frame_index']} {ranking}={r[ranking]:.2f}" for r in top.to_pylist()]
    return list(zip(titles, crops, maps))


def evaluate(
    scores_dir: Path,
    labels: Path | None = None,
    out: Path | None = None,
    n_boot: int = 200,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Write metrics.json and report.html into `out` (default: the scores directory); returns the metric rows."""
    scores_dir = Path(scores_dir)
    out = Path(out or scores_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos, frames = read_scores(scores_dir)
    config = json.loads((scores_dir / CONFIG_FILE).read_text())
    videos = _with_labels(videos, _labels_from(labels) if labels else None)
    names = score_columns(frames)
    frames = frames.drop_columns(["keypoints"]).join(
        videos.select(["video_id", "label", "method"]), "video_id", join_type="left outer"
    )
    scored = videos.filter(pc.field("frames_scored") > 0)
    rows = evaluate_table(scored, "video", names, n_boot=n_boot) + evaluate_table(frames, "frame", names, n_boot=n_boot)
    write_metrics_json(out / "metrics.json", rows)

    configure(tracking_uri)
    calibrations: list[Calibration] = []
    for model in config["models"]:
        bundle = load_registered(f"models:/{model['name']}/{model['version']}")
        for level in ("frame", "video"):
            calibrations += [Calibration(**c) for c in bundle.calibration[level].values()]
    primary = scored.column("verdict_score")[0].as_py() if scored.num_rows else names[0]
    heatmaps = _heatmaps(frames, config, int(config["crop"]["size"]), primary)
    write_report(
        out / "report.html", rows, {"video": scored, "frame": frames}, heatmaps,
        title=f"FlowOOD-Ray report: {scores_dir.name}", score_names=names, calibrations=calibrations,
    )
    log.info("wrote %s and %s", out / "metrics.json", out / "report.html")
    return rows


def format_table(rows: list[dict[str, Any]], level: str = "video") -> str:
    """AUROC per score (rows) and subset (columns) at one level, as plain text."""
    chosen = [r for r in rows if r["level"] == level]
    subsets = list(dict.fromkeys(r["subset"] for r in chosen))
    scores = list(dict.fromkeys(r["score"] for r in chosen))
    value = {(r["score"], r["subset"]): r["auroc"] for r in chosen}
    width = max(len(s) for s in subsets + ["score"]) + 2
    lines = [f"{level}-level AUROC".ljust(18) + "".join(s.rjust(width) for s in subsets)]
    for score in scores:
        cells = "".join(f"{value.get((score, s), float('nan')):.3f}".rjust(width) for s in subsets)
        lines.append(score.ljust(18) + cells)
    return "\n".join(lines)
