"""A single self-contained HTML report, readable at a glance.

Order: a one-screen summary (video-level AUROC of every score against every manipulation method as a
coloured grid, the best score per method, verdict counts at the calibrated threshold, the models and
versions behind them), then the score figures, then pixel-level localization with a few maps beside
their ground-truth masks, and last the full metric tables, collapsed. Figures are PNGs inlined as
base64 (scoring/figures.py), so the file can be mailed or attached to an MLflow run and still open
anywhere; nothing is fetched from elsewhere.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flowood_ray.scoring.calibration import Calibration
from flowood_ray.scoring.figures import face_figure, png_data_uri, score_figure
from flowood_ray.scoring.metrics import ALL_SUBSET, METRIC_NAMES, TableLike, table_column_names, table_columns

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class FaceMap:
    """One face of the localization section: a crop, one model's pixel map of it and, for a fake with a
    mask, the ground truth. Faces of one `group` (a model's map) share a colour scale."""

    group: str
    title: str
    crop: np.ndarray  # uint8 (H, W, 3)
    heatmap: np.ndarray  # float (h, w), stretched over the crop
    mask: np.ndarray | None = None  # bool (H, W): manipulated pixels


@dataclass(frozen=True)
class ModelLine:
    """A model of the run; `threshold_samples`: level -> the real validation samples behind its primary's
    thresholds, in words (e.g. "416 frames of 13 real videos")."""

    name: str
    version: str
    family: str
    primary: str
    threshold_samples: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """What the summary states besides the AUROC grid. verdicts: group ("real" or a method) ->
    {"fake", "real", "unscored"} -> number of videos."""

    models: Sequence[ModelLine]
    verdict_score: str
    fpr: float | None
    threshold: float | None
    verdicts: Mapping[str, Mapping[str, int]]
    notes: Sequence[str] = ()


_METRIC_TITLES = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-in",
    "aupr_out": "AUPR-out",
    "fpr_at_95_tpr": "FPR@95TPR",
    "eer": "EER",
}
_LEVEL_ORDER = ("video", "frame")
_CSS = """
body { font-family: sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 0.4em; } h2 { margin-top: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
img { max-width: 100%; }
#summary { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
#summary h2 { margin: 0 0 0.3em; font-size: 1.05em; }
#auroc-grid td { min-width: 3.2em; }
#auroc-grid td.best { font-weight: bold; outline: 2px solid #222; outline-offset: -2px; }
#auroc-grid tr.best-row td { font-size: 0.75em; text-align: center; background: #f6f6f6; word-break: break-all; }
.panel { max-width: 34em; } #summary .note { max-width: 34em; }
.faces { display: flex; flex-wrap: wrap; gap: 1em; }
.faces figure { margin: 0; width: 390px; } figcaption { font-size: 0.8em; word-break: break-all; }
.note { color: #555; font-size: 0.9em; margin: 0.2em 0; }
details > summary { cursor: pointer; font-weight: bold; margin: 1em 0; }
"""


def _level_key(level: str) -> tuple[int, str]:
    return (_LEVEL_ORDER.index(level) if level in _LEVEL_ORDER else len(_LEVEL_ORDER), level)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="{png_data_uri(fig)}" alt="{_esc(alt)}">'


def auroc_colour(value: float) -> str:
    """Cell colour of an AUROC: white at chance (0.5), deepening to green at 1 and to red at 0 (a score
    that ranks the wrong way round); grey when unknown."""
    if _is_missing(value):
        return "#dddddd"
    strength = min(abs(value - 0.5) * 2.0, 1.0)
    target = (26, 152, 80) if value >= 0.5 else (215, 48, 39)
    r, g, b = (round(255 + strength * (c - 255)) for c in target)
    return f"#{r:02x}{g:02x}{b:02x}"


def _auroc_grid(video_rows: Sequence[Mapping[str, Any]]) -> str:
    scores = list(dict.fromkeys(str(r["score"]) for r in video_rows))
    subsets = list(dict.fromkeys(str(r["subset"]) for r in video_rows))
    subsets.sort(key=lambda s: s != ALL_SUBSET)  # "all" first, methods in their given order
    value = {(str(r["score"]), str(r["subset"])): r.get("auroc") for r in video_rows}
    best: dict[str, str] = {}
    for subset in subsets:
        known = [(value[(s, subset)], s) for s in scores if not _is_missing(value.get((s, subset)))]
        if known:
            best[subset] = max(known)[1]
    header = '<th class="text">score</th>' + "".join(f"<th>{_esc(s)}</th>" for s in subsets)
    body = []
    for score in scores:
        cells = [f'<td class="text">{_esc(score)}</td>']
        for subset in subsets:
            auroc = value.get((score, subset))
            shown = "–" if _is_missing(auroc) else f"{auroc:.3f}"
            mark = ' class="best"' if best.get(subset) == score else ""
            data = "" if _is_missing(auroc) else f' data-auroc="{auroc:.6f}"'
            cells.append(f'<td{mark}{data} style="background:{auroc_colour(auroc)}">{shown}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    best_cells = "".join(f"<td>{_esc(best.get(s, '–'))}</td>" for s in subsets)
    body.append(f'<tr class="best-row"><td class="text">best score</td>{best_cells}</tr>')
    return (
        '<div><h2>Video-level AUROC</h2><table id="auroc-grid"><thead><tr>'
        f'{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        '<p class="note">Fake is the positive class; each method is its fakes against all reals. '
        "Green above chance, red below, bold: the best score of the column.</p></div>"
    )


def _verdict_table(summary: RunSummary) -> str:
    rows = []
    for group, counts in summary.verdicts.items():
        scored = counts.get("fake", 0) + counts.get("real", 0)
        share = f" ({counts.get('fake', 0) / scored:.0%})" if scored else ""
        rows.append(
            f'<tr><td class="text">{_esc(group)}</td><td>{scored + counts.get("unscored", 0)}</td>'
            f'<td>{counts.get("fake", 0)}{share}</td><td>{counts.get("real", 0)}</td>'
            f'<td>{counts.get("unscored", 0)}</td></tr>'
        )
    at = "" if summary.fpr is None else f" at {summary.fpr:g} FPR"
    threshold = "" if summary.threshold is None else f" &gt; {summary.threshold:.4g}"
    return (
        f"<h2>Verdicts{_esc(at)}</h2>"
        f'<p class="note">fake when {_esc(summary.verdict_score)}{threshold} (threshold calibrated on real '
        "validation videos)</p>"
        '<table id="verdicts"><thead><tr><th class="text">videos</th><th>n</th><th>flagged fake</th>'
        f'<th>passed real</th><th>unscored</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _models_list(models: Sequence[ModelLine]) -> str:
    items = []
    for model in models:
        samples = ", ".join(model.threshold_samples.values())
        behind = f"; thresholds from {samples}" if samples else ""
        items.append(
            f"<li><b>{_esc(model.name)}</b> v{_esc(model.version)} ({_esc(model.family)}), "
            f"primary {_esc(model.primary)}{_esc(behind)}</li>"
        )
    return f'<h2>Models</h2><ul id="models">{"".join(items)}</ul>'


def _summary_section(video_rows: Sequence[Mapping[str, Any]], summary: RunSummary | None) -> str:
    parts = [_auroc_grid(video_rows) if video_rows else '<p class="note">No video-level metrics.</p>']
    if summary is not None:
        notes = "".join(f'<p class="note">{_esc(n)}</p>' for n in summary.notes)
        parts.append(f'<div class="panel">{_verdict_table(summary)}{_models_list(summary.models)}{notes}</div>')
    return f'<section id="summary">{"".join(parts)}</section>'


def _cell(row: Mapping[str, Any], metric: str) -> str:
    value = row.get(metric)
    if _is_missing(value):
        return "–"
    low, high = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    if _is_missing(low) or _is_missing(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _metric_tables(metrics_rows: Sequence[Mapping[str, Any]]) -> str:
    levels = sorted({str(r.get("level")) for r in metrics_rows}, key=_level_key)
    header = "".join(
        f"<th>{_esc(t)}</th>"
        for t in ("score", "subset", "n real", "n fake", *(_METRIC_TITLES[m] for m in METRIC_NAMES), "note")
    )
    parts = ['<p class="note">Fake is the positive class; each method\'s fakes are compared with all reals. '
             "Brackets: bootstrap percentile interval.</p>"]
    for level in levels:
        body = []
        for row in (r for r in metrics_rows if str(r.get("level")) == level):
            notes = [str(row["reason"])] if row.get("reason") else []
            if row.get("n_missing"):
                notes.append(f"{row['n_missing']} unscored rows left out")
            cells = [
                f'<td class="text">{_esc(row.get("score", ""))}</td>',
                f'<td class="text">{_esc(row.get("subset", ""))}</td>',
                f"<td>{_esc(row.get('n_real', ''))}</td>",
                f"<td>{_esc(row.get('n_fake', ''))}</td>",
                *(f"<td>{_esc(_cell(row, m))}</td>" for m in METRIC_NAMES),
                f'<td class="text">{_esc("; ".join(notes))}</td>',
            ]
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<h3>{_esc(level)} level</h3>")
        parts.append(
            f'<table data-level="{_esc(level)}"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>'
        )
    title = f"<summary>All metrics ({len(metrics_rows)} rows)</summary>"
    return f'<details id="metric-tables">{title}{"".join(parts)}</details>'


def _localization_table(rows: Sequence[Mapping[str, Any]]) -> str:
    titles = ("model", "map", "subset", "images", "pixel AUROC", "AUPRO", "note")
    text_columns = {"model", "map", "subset", "note"}
    header = "".join(f'<th class="text">{t}</th>' if t in text_columns else f"<th>{t}</th>" for t in titles)
    body = []
    for row in rows:
        values = [row.get("pixel_auroc"), row.get("aupro")]
        shown = ["–" if _is_missing(v) else f"{v:.3f}" for v in values]
        body.append(
            f'<tr><td class="text">{_esc(row.get("model", ""))}</td><td class="text">{_esc(row.get("score", ""))}</td>'
            f'<td class="text">{_esc(row.get("subset", ""))}</td><td>{_esc(row.get("images", ""))}</td>'
            f'<td>{shown[0]}</td><td>{shown[1]}</td><td class="text">{_esc(row.get("reason") or "")}</td></tr>'
        )
    return f'<table id="localization"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _check_face(face: FaceMap) -> None:
    crop, heatmap, mask = face.crop, face.heatmap, face.mask
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"face {face.title!r}: crop must be uint8 HxWx3, got {crop.dtype} {crop.shape}")
    if heatmap.ndim != 2:
        raise ValueError(f"face {face.title!r}: heatmap must be HxW, got shape {heatmap.shape}")
    if mask is not None and (mask.dtype != np.bool_ or mask.shape != crop.shape[:2]):
        raise ValueError(f"face {face.title!r}: mask must be bool of the crop's HxW, got {mask.dtype} {mask.shape}")


def _faces_section(faces: Sequence[FaceMap]) -> str:
    parts = []
    for group in dict.fromkeys(face.group for face in faces):
        members = [face for face in faces if face.group == group]
        pooled = np.concatenate([np.asarray(f.heatmap, dtype=np.float64).ravel() for f in members])
        pooled = pooled[np.isfinite(pooled)]
        # One colour scale per map, so that a hotter map means a higher pixel score, not just a different
        # normalisation; maps of different models have different units and get their own.
        vmin, vmax = np.percentile(pooled, [1, 99]) if pooled.size else (0.0, 1.0)
        if vmax <= vmin:
            vmax = vmin + 1e-6
        figures = []
        for face in members:
            heatmap = np.asarray(face.heatmap, dtype=np.float64)
            img = _img(face_figure(face.crop, heatmap, face.mask, vmin, vmax), f"face {face.title}")
            figures.append(f"<figure>{img}<figcaption>{_esc(face.title)}</figcaption></figure>")
        parts.append(
            f"<h3>{_esc(group)}</h3><p class=\"note\">Crop, pixel map (colour scale {vmin:.3g} blue to {vmax:.3g} "
            "red, shared by this map's faces) and, for fakes, the ground-truth mask in red.</p>"
            f'<div class="faces">{"".join(figures)}</div>'
        )
    return "".join(parts)


def _score_figures(
    score_tables: Mapping[str, TableLike], names: Sequence[str], calibrations: Sequence[Calibration]
) -> list[str]:
    sections = []
    for level in sorted(score_tables, key=_level_key):
        table = score_tables[level]
        available = table_column_names(table)
        present = [n for n in names if n in available]
        if not present:
            logger.warning("%s level: none of the scores %s is in the score table", level, names)
            continue
        columns = table_columns(table, ["label", "method", *present])
        label = columns["label"].astype(np.float64)
        known = ~np.isnan(label)
        labels = label[known].astype(np.int64)
        sections.append(f"<h2>{_esc(level)}-level scores</h2>")
        for score in present:
            values = columns[score][known].astype(np.float64)
            scored = ~np.isnan(values)
            if not scored.any():
                sections.append(f'<p class="note">{_esc(score)}: no scored rows.</p>')
                continue
            thresholds = next((c.thresholds for c in calibrations if c.score == score and c.level == level), {})
            methods = columns["method"][known][scored]
            fig = score_figure(score, level, labels[scored], methods, values[scored], thresholds)
            sections.append(f"<h3>{_esc(score)}</h3>{_img(fig, f'{score} {level} histogram and ROC')}")
    return sections


def write_report(
    out_html: Path,
    metrics_rows: Sequence[Mapping[str, Any]],
    score_tables: Mapping[str, TableLike],
    faces: Sequence[FaceMap] = (),
    title: str = "FlowOOD-Ray report",
    *,
    score_names: Sequence[str] | None = None,
    calibrations: Sequence[Calibration] = (),
    summary: RunSummary | None = None,
    localization_rows: Sequence[Mapping[str, Any]] = (),
    localization_note: str = "",
    max_faces: int = 24,
) -> Path:
    """Write the HTML report and return its path.

    metrics_rows: rows from `evaluate_table` (any levels); the summary grid shows the video-level ones.
    score_tables: level ("video", "frame") -> table with `label`, `method` and score columns.
    faces: pixel maps to show, in order (at most `max_faces`). score_names default to the scores named
    in `metrics_rows`. Calibration thresholds of matching score and level are marked on the
    histograms. localization_rows: {"model", "score" (the map), "subset", "images", "pixel_auroc",
    "aupro", "reason"}, with `localization_note` saying how the maps were sampled.
    """
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    shown = list(faces)[:max_faces]
    for face in shown:
        _check_face(face)
    names = list(score_names) if score_names is not None else list(dict.fromkeys(str(r["score"]) for r in metrics_rows))
    video_rows = [r for r in metrics_rows if r.get("level") == "video"]
    sections = [f"<h1>{_esc(title)}</h1>", _summary_section(video_rows, summary)]
    sections += _score_figures(score_tables, names, calibrations)
    if localization_rows or shown or localization_note:
        sections.append('<h2 id="localization-heading">Localization (pixel level)</h2>')
        if localization_note:
            sections.append(f'<p class="note">{_esc(localization_note)}</p>')
        if localization_rows:
            sections.append(_localization_table(localization_rows))
        sections.append(_faces_section(shown))
    sections.append(_metric_tables(metrics_rows) if metrics_rows else '<p class="note">No metrics.</p>')
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(document, encoding="utf-8")
    logger.info("wrote report %s (%.1f kB)", out_html, len(document) / 1024)
    return out_html


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: a metric that could not be computed becomes null (its `reason` says why).
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(path: Path, metrics_rows: Sequence[Mapping[str, Any]]) -> Path:
    """Metric rows as strict JSON (NaN as null), for MLflow artifacts and machine comparison."""
    rows = [{str(k): _json_safe(v) for k, v in row.items()} for row in metrics_rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
