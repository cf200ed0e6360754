"""`flowood evaluate` offline: detection metrics from the scores directory alone; pixel metrics of a sample
of saved crops, for which alone the registry is read."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.metrics import roc_auc_score

from flowood_ray.cluster.score import read_scores, run_score
from flowood_ray.evaluate import evaluate, map_sample, score_columns
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.facecrop import crops_to_array
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.registry import configure, load_registered
from flowood_ray.scoring.scorers import build_scorer

MODELS = ["models:/flowood-glow@candidate", "models:/flowood-vqvae@candidate"]
MASK = b"\x01"


def _frames(rows: list[tuple[str, int, int | None, str | None, bytes | None]]) -> pa.Table:
    names = ["video_id", "frame_index", "label", "method", "mask"]
    return pa.table({name: [row[i] for row in rows] for i, name in enumerate(names)})


def test_p_value_columns_are_not_evaluated_as_scores() -> None:
    """Catches the verdict's p-value column reported as a detector of its own (its AUROC is 1 minus the
    score's), and a filter so broad that it drops a score whose name merely ends in _p."""
    frames = pa.table({"video_id": ["a"], "frame_index": [0], "glow_bpd": [1.0], "glow_typicality": [0.5],
                       "glow_typicality_p": [0.3], "cls_p": [0.2]})
    assert score_columns(frames) == ["glow_bpd", "glow_typicality", "cls_p"]


def test_map_sample_takes_the_middle_frame_of_a_few_videos_per_method() -> None:
    # Catches a cap applied to all methods together instead of to each, two frames of one video, the first
    # frame instead of the middle one, fakes without a mask, and crops with no label.
    rows = [
        ("a2", 1, 1, "Swap", MASK), ("a2", 3, 1, "Swap", MASK),
        ("a1", 0, 1, "Swap", MASK), ("a1", 4, 1, "Swap", MASK), ("a1", 2, 1, "Swap", MASK),
        ("a3", 0, 1, "Swap", MASK),
        ("b1", 0, 1, "Blend", None), ("b1", 1, 1, "Blend", None),
        ("b2", 5, 1, "Blend", MASK),
        ("r1", 5, 0, "real", None), ("r1", 6, 0, "real", None), ("r1", 7, 0, "real", None),
        ("r2", 9, 0, "real", None), ("r3", 1, 0, "real", None),
        ("u1", 0, None, None, MASK),
    ]
    sample = map_sample(_frames(rows), per_method=2)
    chosen = list(zip(sample.column("video_id").to_pylist(), sample.column("frame_index").to_pylist()))
    # Methods in name order, videos in id order; a2's two frames have index 1 and 3, the middle is 3.
    assert chosen == [("b2", 5), ("a1", 2), ("a2", 3), ("r1", 6), ("r2", 9)]
    with pytest.raises(ValueError, match="per_method"):
        map_sample(_frames(rows), per_method=0)


class _Tables(HTMLParser):
    """Body cell texts of every table with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id")
            if self._table:
                self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _report_tables(path: Path) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return {name: [row for row in rows if row] for name, rows in parser.tables.items()}


def _detection_json(path: Path) -> str:
    return json.dumps([r for r in json.loads(path.read_text()) if r["level"] != "pixel"])


@pytest.mark.e2e
def test_evaluation_is_offline_except_for_pixel_maps(
    synth_crops: Path, trained_models: dict, tmp_path: Path
) -> None:
    # Catches an evaluation that still reads calibrations from the registry (it would fail once the
    # database is gone), one that crashes instead of reporting without maps, one that creates an empty
    # database where the old one was, pixel metrics over misaligned masks or a wrong sample, and verdict
    # counts that do not match the scored videos.
    registry = tmp_path / "mlflow.db"
    shutil.copy(trained_models["tracking_uri"][len("sqlite:///"):], registry)
    uri = f"sqlite:///{registry}"
    scores = tmp_path / "scores"
    manifest = build_manifest(synth_crops.parent / "archive")
    run_score(manifest, scores, MODELS, SamplingConfig(num_frames=4), local=True, save_crops=True, tracking_uri=uri)

    online = evaluate(scores, out=tmp_path / "online", n_boot=20, tracking_uri=uri)
    pixel = {r["subset"]: r for r in online if r["level"] == "pixel"}
    assert set(pixel) == {"all", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"}
    assert {r["model"] for r in pixel.values()} == {f"flowood-vqvae/{trained_models['summaries']['vqvae']['version']}"}

    # The sample by hand: per method (reals as one), the first two videos by id, each its middle frame.
    videos, frames = read_scores(scores)
    frames = frames.drop_columns(["keypoints"]).join(videos.select(["video_id", "label", "method"]), "video_id")
    by_video: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i, row in enumerate(frames.select(["video_id", "frame_index", "label", "method"]).to_pylist()):
        group = "real" if row["label"] == 0 else row["method"]
        by_video.setdefault((group, row["video_id"]), []).append((row["frame_index"], i))
    picked, per_group = [], {}
    for group, video_id in sorted(by_video):
        if per_group.get(group, 0) < 2:
            ordered = sorted(by_video[(group, video_id)])
            picked.append(ordered[len(ordered) // 2][1])
            per_group[group] = per_group.get(group, 0) + 1
    sample = frames.take(pa.array(picked))
    crops = crops_to_array(sample, 32)
    masks = np.stack([
        np.zeros((32, 32), bool) if m is None else np.frombuffer(m, np.uint8).reshape(32, 32) >= 128
        for m in sample.column("mask").to_pylist()
    ])
    fake = np.asarray(sample.column("label")) == 1
    assert masks[fake].any() and not masks[~fake].any()
    configure(uri)
    maps = build_scorer(load_registered(f"models:/{pixel['all']['model']}")).pixel_map(crops)
    # The model line says how many clips stand behind each threshold, and how many frames they gave.
    glow = load_registered(MODELS[0]).calibration
    video_cal, frame_cal = (glow[level][glow["primary"]] for level in ("video", "frame"))
    assert frame_cal["n"] == video_cal["n"] and frame_cal["samples"] > frame_cal["n"]
    assert (f"thresholds from {video_cal['n']} real videos, {frame_cal['samples']} frames of {frame_cal['n']} real "
            f"videos") in (tmp_path / "online" / "report.html").read_text()
    assert pixel["all"]["images"] == len(picked) == 10
    assert pixel["all"]["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)

    registry.unlink()
    offline = evaluate(scores, out=tmp_path / "offline", n_boot=20, tracking_uri=uri)
    assert not registry.exists()
    assert [r for r in offline if r["level"] == "pixel"] == []
    assert _detection_json(tmp_path / "offline/metrics.json") == _detection_json(tmp_path / "online/metrics.json")
    html = (tmp_path / "offline" / "report.html").read_text()
    assert f"no pixel maps, no MLflow database at {registry}" in html
    tables = _report_tables(tmp_path / "offline" / "report.html")
    video_scores = {r["score"] for r in offline if r["level"] == "video"}
    assert "localization" not in tables and len(tables["auroc-grid"]) == len(video_scores) + 1  # and "best score"
    assert pc.sum(pc.is_null(videos.column("verdict"))).as_py() == 0
    expected: dict[str, dict[str, int]] = {}
    for row in videos.to_pylist():
        counts = expected.setdefault("real" if row["label"] == 0 else row["method"], {"fake": 0, "real": 0})
        counts[row["verdict"]] += 1
    # Verdict table columns: group, n, flagged fake "k (share)", passed real, unscored.
    shown = {row[0]: {"fake": int(row[2].split()[0]), "real": int(row[3])} for row in tables["verdicts"]}
    assert shown == expected
