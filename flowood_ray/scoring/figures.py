"""The report's figures: score histograms beside ROC curves, and pixel maps beside their ground truth.

Drawn on `matplotlib.figure.Figure` objects (Agg) rather than pyplot, which keeps no global figure
state between reports, and returned as PNG data URIs so that the report stays one self-contained file.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flowood_ray.scoring.metrics import ALL_SUBSET, method_subsets, roc_points

def png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plain_legend(ax: Any) -> None:
    # Method names are data: no mathtext parsing of "$", and no underscore prefix hiding an entry.
    handles, labels = ax.get_legend_handles_labels()
    legend = ax.legend(handles, labels, fontsize=8, loc="best")
    for text in legend.get_texts():
        text.set_parse_math(False)


def _series_label(name: str) -> str:
    return f" {name}" if name.startswith("_") else name


def score_figure(
    score: str,
    level: str,
    labels: np.ndarray,
    methods: np.ndarray,
    values: np.ndarray,
    thresholds: Mapping[float, float | None],
) -> Figure:
    """Overlaid histograms of real vs each manipulation method (as in seed 000) beside their ROC curves."""
    fig = Figure(figsize=(12, 4.2))
    # Fixed margins instead of a tight bounding box, which draws every figure twice.
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.92, wspace=0.18)
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

    def density(selected: np.ndarray) -> np.ndarray:
        return np.histogram(np.clip(values[selected], low, high), bins=bins, density=True)[0]

    # One stepped outline per series (ax.stairs) rather than ax.hist's patch per bin: the same picture,
    # drawn in a fraction of the time.
    if real.any():
        hist_ax.stairs(density(real), bins, fill=True, color="0.6", alpha=0.6, label="real")
    for subset, mask in subsets[1:]:
        hist_ax.stairs(density(mask & (labels == 1)), bins, lw=1.6, label=_series_label(subset))
    # An unresolved threshold (too few calibration reals for its rate) flags nothing and gets no line.
    resolved = sorted((fpr, t) for fpr, t in thresholds.items() if t is not None)
    for i, (fpr, threshold) in enumerate(resolved):
        hist_ax.axvline(threshold, color="k", ls="--", lw=1)
        # Staggered, because the 1% and 5% thresholds are often close together.
        hist_ax.text(
            threshold, 0.98 - 0.06 * i, f" {fpr:g} FPR", transform=hist_ax.get_xaxis_transform(), va="top",
            fontsize=8, parse_math=False,
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


def face_figure(crop: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None, vmin: float, vmax: float) -> Figure:
    """The crop, the map over it, and (when known) the ground-truth mask over it, side by side."""
    panels = 2 if mask is None else 3
    fig = Figure(figsize=(2 * panels, 2))
    axes = fig.subplots(1, panels)
    height, width = crop.shape[:2]
    # The extent stretches a lower-resolution map over the whole crop.
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    for ax in axes:
        ax.imshow(crop)
        ax.set_axis_off()
    axes[1].imshow(heatmap, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax, extent=extent, interpolation="bilinear")
    if mask is not None:
        # Manipulated pixels in opaque red, the rest of the face left visible.
        overlay = np.zeros((*mask.shape, 4))
        overlay[mask] = (1.0, 0.0, 0.0, 0.55)
        axes[2].imshow(overlay, extent=extent, interpolation="nearest")
    fig.subplots_adjust(0, 0, 1, 1, 0.02, 0)
    return fig
