"""The HTML report is one valid, self-contained, escaped file; metrics JSON is strict."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from flowood_ray.scoring.calibration import calibrate
from flowood_ray.scoring.metrics import evaluate_table
from flowood_ray.scoring.report import write_metrics_json, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Markup for the HTML, plus bad mathtext ("$\\nope$") and a leading underscore for matplotlib's text handling.
HOSTILE = "_<script>alert('x')</script> & \"q\" $\\nope$"


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.body_rows = 0
        self.text: list[str] = []
        self._in_tbody = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self.body_rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_tbody = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _tables() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    methods = np.array(["real"] * 40 + ["Deepfakes"] * 20 + [HOSTILE] * 20, dtype=object)
    labels = (methods != "real").astype(int)
    video_ids = np.array([f"v{i}" for i in range(labels.size)])
    video = {"video_id": video_ids, "label": labels, "method": methods, "nll": rng.normal(size=80) + 2 * labels}
    video["typicality"] = np.abs(video["nll"] - 0.3)
    video["typicality"][3] = np.nan  # an unscored video must not break the figures
    frames = 6
    frame = {key: np.repeat(values, frames) for key, values in video.items()}
    frame["nll"] = frame["nll"] + rng.normal(0, 0.5, size=frame["nll"].size)
    frame["nll"][0] = np.inf  # an overflowing likelihood must not squash the histogram
    return {"video": video, "frame": frame}


def _faces(n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, size=(n, 64, 64, 3), dtype=np.uint8)
    # Heatmaps at a lower resolution than the crops, as pooled pixel scores usually are.
    return [(f"{HOSTILE} #{i}", crops[i], rng.random((16, 16))) for i in range(n)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    tables = _tables()
    scores = ["nll", "typicality"]
    metrics = [row for level, table in tables.items() for row in evaluate_table(table, level, scores, n_boot=20)]
    real_val = {"nll": np.random.default_rng(2).normal(size=200)}
    calibrations = [*calibrate(real_val, "video").values(), *calibrate(real_val, "frame").values()]
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    write_report(out, metrics, tables, _faces(3), title=HOSTILE, calibrations=calibrations)
    return out, metrics


def test_report_is_self_contained_html_with_figures_and_table(report: tuple[Path, list[dict[str, object]]]) -> None:
    path, metrics = report
    document = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(document)
    parser.close()
    # One histogram+ROC figure per (level, score) and one per face.
    assert len(parser.images) == 2 * 2 + 3
    for src in parser.images:
        prefix, _, payload = src.partition(",")
        assert prefix == "data:image/png;base64"
        assert base64.b64decode(payload, validate=True).startswith(PNG_MAGIC)
    assert parser.body_rows == len(metrics) == 2 * 2 * 3
    # Nothing is fetched from elsewhere.
    assert "http://" not in document and "https://" not in document
    assert {"html", "head", "body", "table"} <= set(parser.tags)


def test_report_escapes_every_text(report: tuple[Path, list[dict[str, object]]]) -> None:
    path, _ = report
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    assert "script" not in parser.tags
    text = "".join(parser.text)
    assert HOSTILE in text  # the title, a method name and face captions come back as plain text
    assert text.count(HOSTILE) >= 1 + 2 + 3


def test_report_refuses_malformed_faces(tmp_path: Path) -> None:
    crop = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="uint8"):
        write_report(tmp_path / "r.html", [], {}, [("bad", crop, np.zeros((8, 8)))])


def test_metrics_json_is_strict(tmp_path: Path) -> None:
    row = {"score": "s", "auroc": float("nan"), "eer": np.float64(0.25), "n_real": np.int64(3)}
    rows = [{**row, "reason": "no fake samples"}]
    path = write_metrics_json(tmp_path / "m" / "metrics.json", rows)
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded == [{"score": "s", "auroc": None, "eer": 0.25, "n_real": 3, "reason": "no fake samples"}]
    assert not any(isinstance(v, float) and math.isnan(v) for v in loaded[0].values())
