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
from flowood_ray.scoring.report import FaceMap, ModelLine, RunSummary, auroc_colour, write_metrics_json, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Markup for the HTML, plus bad mathtext ("$\\nope$") and a leading underscore for matplotlib's text handling.
HOSTILE = "_<script>alert('x')</script> & \"q\" $\\nope$"


class _Collector(HTMLParser):
    """Tags, images, text, and the body cells of every table with an id or a data-level, by that key."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[dict[str, str]]]] = {}
        self.order: list[str] = []  # ids of sections, tables and details in document order
        self.details_open: list[bool] = []
        self._table: str | None = None
        self._in_tbody = False
        self._cell: dict[str, str] | None = None
        self._details_depth = 0
        self.in_details: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attr = {k: v or "" for k, v in attrs}
        if "id" in attr:
            self.order.append(attr["id"])
        if tag == "img":
            self.images.append(attr.get("src", ""))
        elif tag == "details":
            self._details_depth += 1
            self.details_open.append("open" in attr)
        elif tag == "table":
            self._table = attr.get("id") or attr.get("data-level")
            if self._table:
                self.tables[self._table] = []
                if self._details_depth:
                    self.in_details.add(self._table)
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_tbody and self._table:
            self._cell = {**attr, "text": ""}
            self.tables[self._table][-1].append(self._cell)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "table":
            self._table = None
        elif tag == "td":
            self._cell = None
        elif tag == "details":
            self._details_depth -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def _parsed(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


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


def _faces(n: int) -> list[FaceMap]:
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, size=(n, 64, 64, 3), dtype=np.uint8)
    masks = np.zeros((n, 64, 64), dtype=bool)
    masks[:, 20:40, 16:48] = True
    # Heatmaps at a lower resolution than the crops, as pooled pixel scores usually are.
    return [FaceMap(f"vq {HOSTILE}", f"{HOSTILE} #{i}", crops[i], rng.random((16, 16)), masks[i]) for i in range(n)]


SUMMARY = RunSummary(
    models=[ModelLine("flowood-glow", "3", "glow", "nll", {"video": "12 real videos", "frame": "288 frames of 12 real videos"})],
    verdict_score="nll",
    fpr=0.01,
    threshold=2.5,
    verdicts={"real": {"real": 38, "fake": 2}, "Deepfakes": {"fake": 15, "real": 4, "unscored": 1}},
    notes=[f"note {HOSTILE}"],
)
LOCALIZATION = [
    {"level": "pixel", "model": "flowood-vqvae/2", "score": "vq_restoration", "subset": "all", "images": 6,
     "pixel_auroc": 0.81, "aupro": 0.42, "reason": None},
    {"level": "pixel", "model": "flowood-vqvae/2", "score": "vq_restoration", "subset": HOSTILE, "images": 4,
     "pixel_auroc": float("nan"), "aupro": float("nan"), "reason": "no fake samples"},
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    tables = _tables()
    scores = ["nll", "typicality"]
    metrics = [row for level, table in tables.items() for row in evaluate_table(table, level, scores, n_boot=20)]
    real_val = {"nll": np.random.default_rng(2).normal(size=200)}
    calibrations = [*calibrate(real_val, "video").values(), *calibrate(real_val, "frame").values()]
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    write_report(out, metrics, tables, _faces(3), title=HOSTILE, calibrations=calibrations, summary=SUMMARY,
                 localization_rows=LOCALIZATION, localization_note="sampled")
    return out, metrics


def test_report_is_self_contained_html_with_figures_and_table(report: tuple[Path, list[dict[str, object]]]) -> None:
    path, metrics = report
    document = path.read_text(encoding="utf-8")
    parser = _parsed(path)
    # One histogram+ROC figure per (level, score) and one per face.
    assert len(parser.images) == 2 * 2 + 3
    for src in parser.images:
        prefix, _, payload = src.partition(",")
        assert prefix == "data:image/png;base64"
        assert base64.b64decode(payload, validate=True).startswith(PNG_MAGIC)
    assert sum(len(parser.tables[level]) for level in ("video", "frame")) == len(metrics) == 2 * 2 * 3
    # Nothing is fetched from elsewhere.
    assert "http://" not in document and "https://" not in document
    assert {"html", "head", "body", "table"} <= set(parser.tags)


def test_summary_comes_first_and_long_tables_are_collapsed(report: tuple[Path, list[dict[str, object]]]) -> None:
    # Catches a summary pushed below the figures, or metric tables left expanded above them.
    parser = _parsed(report[0])
    assert parser.order.index("summary") < parser.order.index("localization") < parser.order.index("metric-tables")
    assert parser.in_details == {"video", "frame"} and parser.details_open == [False]
    assert "auroc-grid" not in parser.in_details and "verdicts" not in parser.in_details


def test_summary_grid_holds_the_video_aurocs_and_marks_the_best(report: tuple[Path, list[dict[str, object]]]) -> None:
    # Catches frame-level values in the video grid, a best score taken as the minimum or across columns,
    # and a colour that does not follow its cell's value.
    path, metrics = report
    grid = _parsed(path).tables["auroc-grid"]
    video = {(r["score"], r["subset"]): r["auroc"] for r in metrics if r["level"] == "video"}
    subsets = ["all", "Deepfakes", HOSTILE]  # "all" first, then the methods as evaluate_table orders them
    *score_rows, best_row = grid
    assert [row[0]["text"] for row in score_rows] == ["nll", "typicality"]
    for row in score_rows:
        for subset, cell in zip(subsets, row[1:]):
            assert float(cell["data-auroc"]) == pytest.approx(video[(row[0]["text"], subset)], abs=1e-6)
            assert cell["style"] == f"background:{auroc_colour(float(cell['data-auroc']))}"
    for j, subset in enumerate(subsets, start=1):
        expected = "nll" if video[("nll", subset)] >= video[("typicality", subset)] else "typicality"
        assert best_row[j]["text"] == expected
        marked = [row[0]["text"] for row in score_rows if row[j].get("class") == "best"]
        assert marked == [expected]


def test_auroc_colours_run_from_red_through_white_to_green() -> None:
    # Catches a reversed scale (a below-chance score shown green) and a wrong strength: by hand,
    # 0.9 is 80% of the way from white to (26, 152, 80): 255 + 0.8 * (26 - 255) = 71.8 -> 72, and so on.
    assert auroc_colour(0.5) == "#ffffff"
    assert auroc_colour(1.0) == "#1a9850" and auroc_colour(0.0) == "#d73027"
    assert auroc_colour(0.9) == "#48ad73"
    assert auroc_colour(float("nan")) == "#dddddd"


def test_summary_states_verdicts_models_and_threshold_samples(report: tuple[Path, list[dict[str, object]]]) -> None:
    # Catches verdict columns swapped (flagged vs passed), a share over the wrong total, and threshold
    # sample counts dropped from the model line.
    parser = _parsed(report[0])
    verdicts = [[cell["text"] for cell in row] for row in parser.tables["verdicts"]]
    assert verdicts == [["real", "40", "2 (5%)", "38", "0"], ["Deepfakes", "20", "15 (79%)", "4", "1"]]
    text = "".join(parser.text)
    assert "flowood-glow v3 (glow), primary nll; thresholds from 12 real videos, 288 frames of 12 real videos" in text
    assert "0.01 FPR" in text and "nll > 2.5" in text


def test_localization_table_shows_each_row_and_its_reason(report: tuple[Path, list[dict[str, object]]]) -> None:
    # Catches pixel AUROC and AUPRO swapped, and a NaN shown as a number.
    table = [[cell["text"] for cell in row] for row in _parsed(report[0]).tables["localization"]]
    assert table == [
        ["flowood-vqvae/2", "vq_restoration", "all", "6", "0.810", "0.420", ""],
        ["flowood-vqvae/2", "vq_restoration", HOSTILE, "4", "–", "–", "no fake samples"],
    ]


def test_report_escapes_every_text(report: tuple[Path, list[dict[str, object]]]) -> None:
    parser = _parsed(report[0])
    assert "script" not in parser.tags
    text = "".join(parser.text)
    assert HOSTILE in text  # the title, a method name, notes, face groups and captions come back as plain text
    assert text.count(HOSTILE) >= 1 + 2 + 3


def test_report_refuses_malformed_faces(tmp_path: Path) -> None:
    crop = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="uint8"):
        write_report(tmp_path / "r.html", [], {}, [FaceMap("g", "bad", crop, np.zeros((8, 8)))])
    uint8_crop = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="mask must be bool"):
        bad_mask = FaceMap("g", "bad", uint8_crop, np.zeros((8, 8)), np.ones((4, 4), bool))
        write_report(tmp_path / "r.html", [], {}, [bad_mask])


def test_metrics_json_is_strict(tmp_path: Path) -> None:
    row = {"score": "s", "auroc": float("nan"), "eer": np.float64(0.25), "n_real": np.int64(3)}
    rows = [{**row, "reason": "no fake samples"}]
    path = write_metrics_json(tmp_path / "m" / "metrics.json", rows)
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded == [{"score": "s", "auroc": None, "eer": 0.25, "n_real": 3, "reason": "no fake samples"}]
    assert not any(isinstance(v, float) and math.isnan(v) for v in loaded[0].values())
