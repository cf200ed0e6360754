"""A single self-contained HTML report: score histograms, ROC curves, the metric table and heatmaps.

Figures are PNGs inlined as base64, so the file can be mailed or attached to an MLflow run and
still open anywhere. Figures are drawn on `matplotlib.figure.Figure` objects (Agg) rather than
pyplot, which keeps no global figure state between reports.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flowood_ray.scoring.calibration import Calibration
from flowood_ray.scoring.metrics import (
    ALL_SUBSET,
    METRIC_NAMES,
    TableLike,
    method_subsets,
    roc_points,
    table_column_names,
    table_columns,
)

logger = logging.getLogger(__name__)

HeatmapItem = tuple[str, np.ndarray, np.ndarray]

_METRIC_TITLES = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-in",
    "aupr_out": "AUPR-out",
    "fpr_at_95_tpr": "FPR@95TPR",
    "eer": "EER",
}
_LEVEL_ORDER = ("video", "frame")
_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
img { max-width: 100%; }
.faces { display: flex; flex-wrap: wrap; gap: 1em; }
.faces figure { margin: 0; width: 300px; } figcaption { font-size: 0.8em; word-break: break-all; }
.note { color: #555; font-size: 0.9em; }
"""


def _level_key(level: str) -> tuple[int, str]:
    return (_LEVEL_ORDER.index(level) if level in _LEVEL_ORDER else len(_LEVEL_ORDER), level)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _plain_legend(ax: Any) -> None:
    # Method names are data: no mathtext parsing of "$", and no underscore prefix hiding an entry.
    handles, labels = ax.get_legend_handles_labels()
    legend = ax.legend(handles, labels, fontsize=8, loc="best")
    for text in legend.get_texts():
        text.set_parse_math(False)


def _series_label(name: str) -> str:
    return f" {name}" if name.startswith("_") else name


def _png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="{_png_data_uri(fig)}" alt="{_esc(alt)}">'


def _score_figure(
    score: str,
    level: str,
    labels: np.ndarray,
    methods: np.ndarray,
    values: np.ndarray,
    thresholds: Mapping[float, float],
) -> Figure:
    """Overlaid histograms of real vs each manipulation method (as in seed 000) beside their ROC curves."""
    fig = Figure(figsize=(12, 4.2))
    hist_ax, roc_ax = fig.subplots(1, 2)
    finite = values[np.isfinite(values)]
    # Percentile range so that one overflowing score does not squash every histogram into one bin;
    # outliers are clipped into the edge bins and stay visible there.
    low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 50)
    subsets = method_subsets(labels, methods)
    real = labels == 0
    if real.any():
        hist_ax.hist(np.clip(values[real], low, high), bins=bins, density=True, color="0.6", alpha=0.6, label="real")
    for subset, mask in subsets[1:]:
        fake = mask & (labels == 1)
        clipped = np.clip(values[fake], low, high)
        hist_ax.hist(clipped, bins=bins, density=True, histtype="step", lw=1.6, label=_series_label(subset))
    for i, (fpr, threshold) in enumerate(sorted(thresholds.items())):
        hist_ax.axvline(threshold, color="k", ls="--", lw=1)
        # Staggered, because the 1% and 5% thresholds are often close together.
        hist_ax.text(
            threshold,
            0.98 - 0.06 * i,
            f" {fpr:g} FPR",
            transform=hist_ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            parse_math=False,
        )
    hist_ax.set_title(f"{score} ({level} level)", parse_math=False)
    hist_ax.set_xlabel("score (higher = more anomalous)")
    hist_ax.set_ylabel("density")
    _plain_legend(hist_ax)

    for subset, mask in subsets:
        fpr_curve, tpr_curve = roc_points(labels[mask], values[mask])
        if fpr_curve.size:
            style = {"color": "k", "ls": "--"} if subset == ALL_SUBSET else {}
            roc_ax.plot(fpr_curve, tpr_curve, lw=1.5, label=_series_label(subset), **style)
    roc_ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    roc_ax.set_xlim(0, 1)
    roc_ax.set_ylim(0, 1.01)
    roc_ax.set_xlabel("false-positive rate (reals flagged)")
    roc_ax.set_ylabel("true-positive rate (fakes caught)")
    roc_ax.set_title(f"ROC per method: {score} ({level} level)", parse_math=False)
    _plain_legend(roc_ax)
    return fig


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
    return "\n".join(parts)


def _face_figure(crop: np.ndarray, heatmap: np.ndarray, vmin: float, vmax: float) -> Figure:
    fig = Figure(figsize=(4, 2))
    crop_ax, overlay_ax = fig.subplots(1, 2)
    height, width = crop.shape[:2]
    for ax in (crop_ax, overlay_ax):
        ax.imshow(crop)
        ax.set_axis_off()
    # The extent stretches a lower-resolution map over the whole crop.
    overlay_ax.imshow(
        heatmap,
        cmap="jet",
        alpha=0.45,
        vmin=vmin,
        vmax=vmax,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="bilinear",
    )
    fig.subplots_adjust(0, 0, 1, 1, 0.02, 0)
    return fig


def _faces_section(heatmaps: Sequence[HeatmapItem], max_faces: int) -> str:
    items = list(heatmaps)[:max_faces]
    for title, crop, heatmap in items:
        if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
            raise ValueError(f"face {title!r}: crop must be uint8 HxWx3, got {crop.dtype} {crop.shape}")
        if heatmap.ndim != 2:
            raise ValueError(f"face {title!r}: heatmap must be HxW, got shape {heatmap.shape}")
    pooled = np.concatenate([np.asarray(h, dtype=np.float64).ravel() for _, _, h in items])
    pooled = pooled[np.isfinite(pooled)]
    # One colour scale for all faces, so that a hotter map means a higher pixel score, not just a
    # different normalisation.
    vmin, vmax = np.percentile(pooled, [1, 99]) if pooled.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-6
    figures = []
    for title, crop, heatmap in items:
        img = _img(_face_figure(crop, np.asarray(heatmap, dtype=np.float64), vmin, vmax), f"face {title}")
        figures.append(f"<figure>{img}<figcaption>{_esc(title)}</figcaption></figure>")
    return (
        '<p class="note">Crop and pixel heatmap; colour scale shared by all faces: '
        f"{vmin:.3g} (blue) to {vmax:.3g} (red).</p>"
        f'<div class="faces">{"".join(figures)}</div>'
    )


def write_report(
    out_html: Path,
    metrics_rows: Sequence[Mapping[str, Any]],
    score_tables: Mapping[str, TableLike],
    heatmaps: Sequence[HeatmapItem] | None = None,
    title: str = "FlowOOD-Ray report",
    *,
    score_names: Sequence[str] | None = None,
    calibrations: Sequence[Calibration] = (),
    max_faces: int = 24,
) -> Path:
    """Write the HTML report and return its path.

    metrics_rows: rows from `evaluate_table` (any levels). score_tables: level ("video", "frame")
    -> table with `label`, `method` and score columns. heatmaps: (title, uint8 HxWx3 crop, float
    HxW map) of the most anomalous faces, in the order to show them. score_names default to the
    scores named in `metrics_rows`. Calibration thresholds of matching score and level are marked
    on the histograms.
    """
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    names = list(score_names) if score_names is not None else list(dict.fromkeys(str(r["score"]) for r in metrics_rows))
    sections = [f"<h1>{_esc(title)}</h1>"]
    sections.append("<h2>Metrics</h2>")
    sections.append(_metric_tables(metrics_rows) if metrics_rows else '<p class="note">No metrics.</p>')
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
            fig = _score_figure(score, level, labels[scored], methods, values[scored], thresholds)
            sections.append(f"<h3>{_esc(score)}</h3>{_img(fig, f'{score} {level} histogram and ROC')}")
    if heatmaps:
        sections.append("<h2>Most anomalous faces</h2>")
        sections.append(_faces_section(heatmaps, max_faces))
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
