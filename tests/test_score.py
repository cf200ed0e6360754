"""End to end: `flowood score` on Ray Data, batch independence, resuming after a kill, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import kill_after_commits
from flowood_ray.cluster.score import read_calibrations, read_scores, run_score
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.sampling import SamplingConfig, sample_indices
from flowood_ray.media.shards import crop_dataset
from flowood_ray.registry import configure, load_registered, resolve_version

pytestmark = pytest.mark.e2e
MODELS = ["models:/flowood-glow@candidate", "models:/flowood-vqvae@candidate"]


@pytest.fixture(scope="module")
def archive(synth_crops: Path) -> Path:
    return synth_crops.parent / "archive"


def _by_video(table) -> dict[str, dict]:
    return {row["video_id"]: row for row in table.to_pylist()}


def test_scores_do_not_depend_on_batching_or_on_the_other_videos(
    archive: Path, trained_models: dict, tmp_path: Path
) -> None:
    uri = trained_models["tracking_uri"]
    manifest = build_manifest(archive)
    test = manifest.filter(pc.equal(manifest.column("split"), "test"))
    few = test.slice(0, 3)
    sampling = SamplingConfig(num_frames=6)
    alone = run_score(few, tmp_path / "a", MODELS, sampling, local=True, videos_per_shard=1, tracking_uri=uri)
    mixed = run_score(test, tmp_path / "b", MODELS, sampling, workers=2, videos_per_shard=4, tracking_uri=uri)
    assert mixed.num_rows == test.num_rows
    names = [c for c in alone.column_names if c.startswith(("glow_", "vq_"))]
    assert {"glow_bpd", "glow_lr", "glow_typicality", "glow_complexity", "vq_latent_nll"} <= set(names)
    a, b = _by_video(alone), _by_video(mixed)
    # Equal up to float32 rounding: BLAS kernels may sum in another order for another batch size.
    for vid, row in a.items():
        assert row["status"] == "ok" and row["frames_scored"] > 0 and row["verdict"] in ("real", "fake")
        for name in names:
            assert row[name] == pytest.approx(b[vid][name], rel=1e-6, abs=1e-6), name
    _, frames_a = read_scores(tmp_path / "a")
    _, frames_b = read_scores(tmp_path / "b")
    fa = {(r["video_id"], r["frame_index"]): r for r in frames_a.to_pylist()}
    fb = {(r["video_id"], r["frame_index"]): r for r in frames_b.to_pylist()}
    assert set(fa) <= set(fb)
    for key, row in fa.items():
        for name in names:
            assert row[name] == pytest.approx(fb[key][name], rel=1e-6, abs=1e-6), name


def test_split_cpu_gpu_stages_give_the_fused_results(archive: Path, trained_models: dict, tmp_path: Path) -> None:
    uri = trained_models["tracking_uri"]
    manifest = build_manifest(archive).slice(0, 4)
    sampling = SamplingConfig(num_frames=4)
    fused = run_score(manifest, tmp_path / "fused", MODELS[:1], sampling, workers=2, tracking_uri=uri)
    split = run_score(manifest, tmp_path / "split", MODELS[:1], sampling, workers=2, split_stages=True,
                      tracking_uri=uri)
    f, s = _by_video(fused), _by_video(split)
    assert set(f) == set(s)
    for vid in f:
        assert f[vid]["glow_bpd"] == pytest.approx(s[vid]["glow_bpd"], rel=1e-6, abs=1e-6)


def test_killed_scoring_run_resumes_with_every_video_exactly_once(
    archive: Path, trained_models: dict, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    cmd = [
        sys.executable, "-m", "flowood_ray.cli", "score", str(archive), "--out", str(out), "--model", MODELS[0],
        "--frames", "8", "--videos-per-shard", "1", "--workers", "2", "--tracking-uri", trained_models["tracking_uri"],
    ]
    committed = kill_after_commits(cmd, out / "videos.parquet", 3)
    total = build_manifest(archive).num_rows
    assert 3 <= committed < total
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    videos, frames = read_scores(out)
    ids = videos.column("video_id").to_pylist()
    assert len(ids) == len(set(ids)) == total
    keys = list(zip(frames.column("video_id").to_pylist(), frames.column("frame_index").to_pylist()))
    assert len(keys) == len(set(keys))
    assert set(frames.column("video_id").to_pylist()) == set(ids)


def test_evaluate_writes_metrics_and_a_report(archive: Path, trained_models: dict, tmp_path: Path) -> None:
    from flowood_ray.evaluate import evaluate

    uri = trained_models["tracking_uri"]
    run_score(build_manifest(archive), tmp_path / "s", MODELS, SamplingConfig(num_frames=4), workers=2,
              save_crops=True, tracking_uri=uri)
    rows = evaluate(tmp_path / "s", n_boot=20, tracking_uri=uri)
    detection = [r for r in rows if r["level"] != "pixel"]
    methods = {r["subset"] for r in detection}
    assert {"all", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"} <= methods
    assert {r["level"] for r in rows} == {"video", "frame", "pixel"}
    assert all(np.isfinite(r["auroc"]) for r in detection)
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert len(metrics) == len(rows)
    html = (tmp_path / "s" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "Deepfakes" in html


def test_saved_crops_keep_their_masks_and_the_run_records_its_calibrations(
    synth_crops: Path, archive: Path, trained_models: dict, tmp_path: Path
) -> None:
    # Catches the mask column dropped from saved crops, masks given to the wrong frames, and a run whose
    # recorded calibrations are not those of the versions it scored with.
    uri = trained_models["tracking_uri"]
    manifest = build_manifest(archive)
    fakes = manifest.filter(pc.equal(manifest.column("label"), 1)).slice(0, 2)
    reals = manifest.filter(pc.equal(manifest.column("label"), 0)).slice(0, 1)
    few = pa.concat_tables([fakes, reals])
    assert fakes.column("mask_path").null_count == 0
    # The preprocessing of the fixture sampled 8 frames at 32 px, as the models' crop config says.
    run_score(few, tmp_path / "s", MODELS, SamplingConfig(num_frames=8), local=True, save_crops=True, tracking_uri=uri)
    _, frames = read_scores(tmp_path / "s")
    preprocessed = {
        (r["video_id"], r["frame_index"]): r
        for r in crop_dataset(synth_crops).to_table(columns=["video_id", "frame_index", "crop", "mask"]).to_pylist()
    }
    fake_ids = set(fakes.column("video_id").to_pylist())
    rows = frames.select(["video_id", "frame_index", "crop", "mask"]).to_pylist()
    assert {r["video_id"] for r in rows} == set(few.column("video_id").to_pylist())
    for row in rows:
        reference = preprocessed[(row["video_id"], row["frame_index"])]
        assert row["crop"] == reference["crop"]
        if row["video_id"] in fake_ids:
            assert row["mask"] is not None and row["mask"] == reference["mask"]
            assert max(row["mask"]) > 0
        else:
            assert row["mask"] is None

    configure(uri)
    records = read_calibrations(tmp_path / "s")
    assert [(r["name"], r["family"]) for r in records] == [("flowood-glow", "glow"), ("flowood-vqvae", "vqvae")]
    for record, uri_scored in zip(records, MODELS):
        assert record["version"] == resolve_version(uri_scored)[1]
        bundle = load_registered(f"models:/{record['name']}/{record['version']}")
        assert record["calibration"] == bundle.calibration
        assert record["primary"] == bundle.calibration["primary"]


def test_score_cli_samples_segment_runs_from_keyframes(archive: Path, trained_models: dict, tmp_path: Path) -> None:
    # Catches --segments ignored (evenly spaced frames come back), runs not moved to the keyframes of each
    # file, and a run directory that does not record how its frames were sampled.
    from flowood_ray.cluster.score import CONFIG_FILE
    from flowood_ray.media.decode import probe
    from flowood_ray.media.facecrop import frames_to_sample

    few = build_manifest(archive).slice(0, 2)
    manifest = tmp_path / "few.parquet"
    pq.write_table(few, manifest)
    out = tmp_path / "s"
    done = subprocess.run([sys.executable, "-m", "flowood_ray.cli", "score", str(manifest), "--out", str(out),
                           "--model", MODELS[0], "--frames", "8", "--segments", "2", "--local", "--tracking-uri",
                           trained_models["tracking_uri"]], timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _, frames = read_scores(out)
    runs = SamplingConfig(mode="segments", num_frames=8, segments=2)
    for row in few.to_pylist():
        path = Path(row["path"])
        expected = frames_to_sample(path, probe(path), runs)
        assert expected != sample_indices(probe(path).frame_count, SamplingConfig(num_frames=8))
        got = sorted(frames.filter(pc.equal(frames.column("video_id"), row["video_id"])).column("frame_index")
                     .to_pylist())
        assert got and set(got) <= set(expected)
    assert json.loads((out / CONFIG_FILE).read_text())["sampling"]["mode"] == "segments"
