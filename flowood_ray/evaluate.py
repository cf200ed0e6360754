"""`flowood evaluate`: metrics, JSON and an HTML report from a scoring output directory, offline.

Detection metrics, verdict counts and thresholds come from the scores directory alone: `flowood score`
records the calibrations it scored with beside the scores. The model registry is read only for the
models whose family produces pixel maps, and only when crops were saved; when it cannot be read the
report says so and has no maps.

Pixel maps are the one cost that grows with the model rather than the data (a VQ-VAE restoration map
takes about 22 s a crop on CPU today), so pixel metrics use a fixed sample: up to
MAP_CROPS_PER_METHOD crops per method, reals counted as one method, each the middle scored frame of a
different video. Two per method bound the run at 2 x (methods + 1) maps per map model (10 for the
demo, whatever the archive's size) and still give every method's AUPRO regions from two videos; the
faces the report shows are drawn from the same maps, so they cost nothing more. Raise
`map_crops_per_method` when maps are cheap.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flowood_ray.cluster.score import CONFIG_FILE, SUMMARY_FILE, read_calibrations, read_scores
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.facecrop import crops_to_array, masks_to_array
from flowood_ray.scoring.calibration import Calibration
from flowood_ray.scoring.localization import REAL_METHOD, localization_table
from flowood_ray.scoring.metrics import evaluate_table
from flowood_ray.scoring.report import FaceMap, ModelLine, RunSummary, write_metrics_json, write_report
from flowood_ray.scoring.scorers import SCORERS, build_scorer

log = logging.getLogger(__name__)

NON_SCORE_COLUMNS = {"video_id", "frame_index", "timestamp_s", "keypoints", "crop", "mask"}
MAP_CROPS_PER_METHOD = 2
# Aligned masks are 0 (untouched) .. 255 (replaced), blended at the seams: a pixel more than half
# replaced counts as manipulated.
MASK_MANIPULATED_FROM = 128
UNLABELLED = "unlabelled"


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
    names = [name for name in frames.column_names if name not in NON_SCORE_COLUMNS]
    # `<primary>_p`, the primary's conformal p-value, falls as the score rises: it is the verdict's
    # reading of that score, not another detector, and its AUROC would only mirror the score's.
    return [name for name in names if not (name.endswith("_p") and name[:-2] in names)]


def _group_of(label: int | None, method: str | None) -> str:
    if label is None:
        return UNLABELLED
    return REAL_METHOD if label == 0 else (method or "unknown")


def map_sample(frames: pa.Table, per_method: int) -> pa.Table:
    """The saved crops whose pixel maps are computed: up to `per_method` per method (reals are one
    method), each the middle scored frame of a different video, videos taken in video_id order (a hash,
    so no ordering bias); fakes only when they carry a mask, unlabelled crops never."""
    if per_method < 1:
        raise ValueError(f"per_method must be >= 1, got {per_method}")
    frames_of: dict[tuple[str, str], list[tuple[int, int]]] = {}
    columns = frames.select(["video_id", "frame_index", "label", "method", "mask"]).to_pylist()
    for row_index, row in enumerate(columns):
        group = _group_of(row["label"], row["method"])
        if group == UNLABELLED or (group != REAL_METHOD and row["mask"] is None):
            continue
        frames_of.setdefault((group, row["video_id"]), []).append((row["frame_index"], row_index))
    chosen: list[int] = []
    taken: dict[str, int] = {}
    for group, video_id in sorted(frames_of):
        if taken.get(group, 0) < per_method:
            ordered = sorted(frames_of[(group, video_id)])
            chosen.append(ordered[len(ordered) // 2][1])
            taken[group] = taken.get(group, 0) + 1
    return frames.take(pa.array(chosen, pa.int64()))


def _registry_problem(tracking_uri: str | None) -> str | None:
    """Why the registry cannot be read, when that is known without touching it: a SQLite store whose
    file is gone would otherwise be created empty by MLflow."""
    from flowood_ray.registry import configure

    uri = configure(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return f"no MLflow database at {uri[len('sqlite:///'):]}"
    return None


def _localization(
    sample: pa.Table, records: list[dict[str, Any]], crop_size: int, tracking_uri: str | None
) -> tuple[list[dict[str, Any]], list[FaceMap], list[str]]:
    """Pixel metrics per map model and method, the faces to show, and notes on what could not be done."""
    from mlflow.exceptions import MlflowException

    from flowood_ray.registry import load_registered

    map_models = [r for r in records if r["family"] in SCORERS and SCORERS[r["family"]].map_name]
    if not map_models or sample.num_rows == 0:
        return [], [], []
    registry_problem = _registry_problem(tracking_uri)
    crops = crops_to_array(sample, crop_size)
    masks = masks_to_array(sample, crop_size) >= MASK_MANIPULATED_FROM
    groups = [_group_of(label, method) for label, method in zip(sample.column("label").to_pylist(),
                                                                sample.column("method").to_pylist())]
    rows: list[dict[str, Any]] = []
    faces: list[FaceMap] = []
    notes: list[str] = []
    for record in map_models:
        model_id = f"{record['name']}/{record['version']}"
        problem = registry_problem
        if problem is None:
            try:
                bundle = load_registered(f"models:/{model_id}")
            except (MlflowException, OSError) as exc:
                problem = f"the registry could not give it ({type(exc).__name__}: {exc})"
        if problem is not None:
            notes.append(f"{model_id}: no pixel maps, {problem}")
            log.warning("%s: no pixel maps, %s", model_id, problem)
            continue
        scorer = build_scorer(bundle)
        started = time.perf_counter()
        maps = scorer.pixel_map(crops)
        log.info("%s: %d pixel maps in %.1f s", model_id, len(crops), time.perf_counter() - started)
        for subset, values in localization_table(masks, maps, groups).items():
            rows.append({"level": "pixel", "model": model_id, "score": scorer.map_name, "subset": subset, **values})
        first_of_group: dict[str, int] = {}
        for i, group in enumerate(groups):
            first_of_group.setdefault(group, i)
        for group, i in first_of_group.items():
            video_id, frame = sample.column("video_id")[i].as_py(), sample.column("frame_index")[i].as_py()
            faces.append(FaceMap(f"{model_id} {scorer.map_name}", f"{group} {video_id[:8]} f{frame}",
                                 crops[i], maps[i], masks[i]))
    return rows, faces, notes


def _drift_notes(scores_dir: Path) -> list[str]:
    """The scoring run's conformal verdict rule and its drift warnings (summary.json), in plain words."""
    path = Path(scores_dir) / SUMMARY_FILE
    if not path.exists():
        return []
    summary = json.loads(path.read_text())
    notes = [f"Verdicts are conformal: a video is flagged when its p-value against the calibration reals is at "
             f"most {summary['fpr']:g} (column p_value in videos.parquet, calibration_n reals behind it)."]
    return notes + [f"drift, {model}: {check['warning']}" for model, check in summary["drift"].items()
                    if check.get("warning")]


def _calibration_size(calibration: dict[str, Any]) -> str:
    """The real clips behind a calibration, and at frame level the frames they gave."""
    clips, frames = int(calibration["n"]), calibration.get("samples")
    if calibration["level"] == "frame" and frames is not None:
        return f"{frames} frames of {clips} real videos"
    return f"{clips} real {calibration['level']}s"


def _run_summary(
    videos: pa.Table, records: list[dict[str, Any]], config: dict[str, Any], notes: list[str]
) -> RunSummary:
    models = [
        ModelLine(
            r["name"], r["version"], r["family"], r["primary"],
            {level: _calibration_size(r["calibration"][level][r["primary"]]) for level in ("video", "frame")
             if r["primary"] in r["calibration"].get(level, {})},
        )
        for r in records
    ]
    verdicts: dict[str, dict[str, int]] = {}
    for row in videos.select(["label", "method", "verdict"]).to_pylist():
        counts = verdicts.setdefault(_group_of(row["label"], row["method"]), {})
        key = row["verdict"] or "unscored"
        counts[key] = counts.get(key, 0) + 1
    ordered = dict(sorted(verdicts.items(), key=lambda item: (item[0] != REAL_METHOD, item[0] == UNLABELLED, item[0])))
    scored = videos.filter(pc.field("frames_scored") > 0)
    verdict_score = scored.column("verdict_score")[0].as_py() if scored.num_rows else records[0]["primary"]
    threshold = scored.column("threshold")[0].as_py() if scored.num_rows else None
    return RunSummary(models, verdict_score, config.get("fpr"), threshold, ordered, notes)


def evaluate(
    scores_dir: Path,
    labels: Path | None = None,
    out: Path | None = None,
    n_boot: int = 200,
    tracking_uri: str | None = None,
    *,
    map_crops_per_method: int = MAP_CROPS_PER_METHOD,
) -> list[dict[str, Any]]:
    """Write metrics.json and report.html into `out` (default: the scores directory); returns the metric
    rows: detection rows (level "video" and "frame", see `evaluate_table`) then pixel rows (level
    "pixel": model, score = the map's name, subset, pixel_auroc, aupro, images, reason)."""
    started = time.perf_counter()
    scores_dir = Path(scores_dir)
    out = Path(out or scores_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos, frames = read_scores(scores_dir)
    config = json.loads((scores_dir / CONFIG_FILE).read_text())
    records = read_calibrations(scores_dir)
    videos = _with_labels(videos, _labels_from(labels) if labels else None)
    names = score_columns(frames)
    frames = frames.drop_columns(["keypoints"]).join(
        videos.select(["video_id", "label", "method"]), "video_id", join_type="left outer"
    )
    scored = videos.filter(pc.field("frames_scored") > 0)
    rows = evaluate_table(scored, "video", names, n_boot=n_boot) + evaluate_table(frames, "frame", names, n_boot=n_boot)
    log.info("detection metrics with %d bootstrap resamples in %.1f s", n_boot, time.perf_counter() - started)

    notes: list[str] = []
    localization_rows: list[dict[str, Any]] = []
    faces: list[FaceMap] = []
    if "crop" in frames.column_names:
        sample = map_sample(frames, map_crops_per_method)
        localization_rows, faces, notes = _localization(sample, records, int(config["crop"]["size"]), tracking_uri)
    else:
        notes.append("no crops saved with the scores (score with --save-crops): no pixel maps")
    rows += localization_rows
    write_metrics_json(out / "metrics.json", rows)
    calibrations = [
        Calibration(**c)
        for r in records
        for level in ("frame", "video")
        for c in r["calibration"].get(level, {}).values()
    ]
    report_started = time.perf_counter()
    write_report(
        out / "report.html", [r for r in rows if r["level"] != "pixel"], {"video": scored, "frame": frames}, faces,
        title=f"FlowOOD-Ray report: {scores_dir.name}", score_names=names, calibrations=calibrations,
        summary=_run_summary(videos, records, config, notes + _drift_notes(scores_dir)),
        localization_rows=localization_rows,
        localization_note=(
            f"Pixel maps of a sample: up to {map_crops_per_method} crops per method (reals included), each the "
            "middle scored frame of a different video, fakes only with a mask; a pixel more than half "
            "manipulated is positive. Each method's fakes are pooled with all sampled reals; AUPRO up to 30% FPR."
            if localization_rows else ""
        ),
    )
    log.info("report in %.1f s; evaluation took %.1f s in all; wrote %s and %s",
             time.perf_counter() - report_started, time.perf_counter() - started, out / "metrics.json",
             out / "report.html")
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
