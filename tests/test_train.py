"""End to end: DDP training on Ray Train, MLflow registration, reload by alias, `ray job submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import E2E_FAMILIES, TINY_MODELS, free_port
from flowood_ray.media.shards import read_crop_images, read_videos, real_split_ids
from flowood_ray.models.catalog import family, parse_configs
from flowood_ray.registry import configure, list_models, load_registered, promote
from flowood_ray.scoring.scorers import build_scorer, score_videos

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent


def _calibration_scores(run_id: str, tmp: Path):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="calibration_scores.parquet", dst_path=tmp)
    return pq.read_table(path)


@pytest.mark.parametrize("family_name", E2E_FAMILIES)
def test_two_worker_ddp_training_registers_a_calibrated_version(
    family_name: str, synth_crops: Path, trained_models: dict, tmp_path: Path
) -> None:
    uri, summary = trained_models["tracking_uri"], trained_models["summaries"][family_name]
    configure(uri)
    # The version this training registered (other tests may register later ones of the family).
    rows = [r for r in list_models() if r["name"] == f"flowood-{family_name}" and r["version"] == summary["version"]]
    assert rows and "candidate" in rows[0]["aliases"]
    client = mlflow.MlflowClient()
    for phase in family(family_name).phases:
        history = client.get_metric_history(summary["run_id"], f"val_{phase.metric}")
        assert history and all(np.isfinite(m.value) for m in history)
    # Two epochs per phase: the last phase's reported best is the minimum of its validation history.
    last = family(family_name).phases[-1].metric
    values = [m.value for m in sorted(client.get_metric_history(summary["run_id"], f"val_{last}"), key=lambda m: m.step)]
    best = sorted(client.get_metric_history(summary["run_id"], f"best_val_{last}"), key=lambda m: m.step)
    assert len(values) == 2 and best[-1].value == min(values)
    assert summary["calibration"]["frame"] and summary["calibration"]["video"]
    for cal in summary["calibration"]["frame"].values():
        strict, loose = cal["thresholds"]["0.01"], cal["thresholds"]["0.05"]
        # Conformal: a rate needs at least 1/fpr - 1 reals, else its threshold is None (nothing flagged).
        assert (strict is None) == (cal["n"] < 99) and (loose is None) == (cal["n"] < 19)
        assert strict is None or strict >= loose

    promote(f"flowood-{family_name}", summary["version"], alias="test-champion")
    bundle = load_registered(f"models:/flowood-{family_name}@test-champion")
    assert bundle.calibration == summary["calibration"]
    size = family(family_name).image_size(parse_configs(family_name, TINY_MODELS[family_name]))
    images, ids = read_crop_images(synth_crops, real_split_ids(read_videos(synth_crops), "val"), size)
    reference = _calibration_scores(summary["run_id"], tmp_path)
    assert reference.column("video_id").to_pylist() == ids.tolist()
    scores = score_videos(build_scorer(bundle), images, ids, batch_size=7)
    # Float32 agreement: registration scored in other batches (other summation orders), and a clip score of
    # magnitude 5 differs by 1e-5 from that alone; a crop scored against the wrong batch differs by far more.
    for name in summary["calibration"]["frame"]:
        np.testing.assert_allclose(scores[name], reference.column(name).to_numpy(), rtol=1e-5, atol=1e-5)
    if family_name == "glow":
        assert summary["val_bpd_glow"] < summary["val_bpd_diagonal_gaussian"]


def test_ray_job_submit_to_a_local_head_trains_and_registers(synth_crops: Path, tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    flowood = str(Path(sys.executable).with_name("flowood"))
    dashboard, tracking = free_port(), free_port()
    subprocess.run(
        [flowood, "cluster", "up", "--state-dir", str(state), "--num-cpus", "2", "--ray-port", str(free_port()),
         "--agent-port", str(free_port()),
         "--dashboard-port", str(dashboard), "--mlflow-port", str(tracking)],
        check=True, timeout=300, capture_output=True,
    )
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
        submit = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(REPO), "--",
             "python", "jobs/train_glow.py", "--data", str(synth_crops), "--epochs", "1", "--batch-size", "16",
             "--storage", str(tmp_path / "ray_results"), "--model-config", json.dumps(TINY_MODELS["glow"])],
            env=env, timeout=600, capture_output=True, text=True,
        )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
        uri = f"http://127.0.0.1:{tracking}"
        configure(uri)
        versions = [r for r in list_models() if r["name"] == "flowood-glow"]
        assert len(versions) == 1 and versions[0]["aliases"] == ["candidate"]
        bundle = load_registered("models:/flowood-glow@candidate")
        images, _ = read_crop_images(synth_crops, real_split_ids(read_videos(synth_crops), "val"), 32)
        reference = _calibration_scores(versions[0]["run_id"], tmp_path)
        np.testing.assert_allclose(
            build_scorer(bundle).score(images)["glow_bpd"], reference.column("glow_bpd").to_numpy(), atol=1e-5
        )
    finally:
        subprocess.run([flowood, "cluster", "down", "--state-dir", str(state)], timeout=120, capture_output=True)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
