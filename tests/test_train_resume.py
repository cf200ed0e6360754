"""End to end: a training whose driver is SIGKILLed mid-run, beside a process that eats a CPU, resumes from
its checkpoint, registers exactly one version, and ends on the weights of the session's uninterrupted run
on a quiet machine (its best epoch's): training is reproducible whatever the workers' timing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import TINY_MODELS
from flowood_ray.registry import configure, list_models, load_registered

pytestmark = pytest.mark.e2e
EPOCHS = 2  # as conftest's trained_models


def _weights(uri: str, name: str, version: str) -> dict[str, torch.Tensor]:
    configure(uri)
    bundle = load_registered(f"models:/{name}/{version}")
    return {f"{c}.{k}": v for c, m in bundle.modules.items() for k, v in m.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(trained_models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The weights of the session's uninterrupted 2-worker tiny Glow (conftest: EPOCHS epochs, batch 16), and
    a registry of this module's own for the runs that must reproduce them."""
    root = tmp_path_factory.mktemp("resume")
    version = trained_models["summaries"]["glow"]["version"]
    return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}",
            "weights": _weights(trained_models["tracking_uri"], "flowood-glow", version)}


def test_a_killed_training_resumes_and_registers_one_version_with_the_uninterrupted_weights(
    synth_crops: Path, reference: dict
) -> None:
    """Catches a resume that restarts (or retrains an epoch), a second registration, a killed run that
    registers, and any data order, shuffle or random draw that follows Ray's scheduling or the restart
    instead of the seed: the killed attempt runs while another process eats a CPU, unlike the reference run."""
    root, uri = reference["root"], reference["uri"]
    storage = root / "ray_results"
    command = [sys.executable, "-m", "flowood_ray.cli", "train", "glow", "--data", str(synth_crops), "--epochs",
               str(EPOCHS), "--batch-size", "16", "--workers", "2", "--model-config", json.dumps(TINY_MODELS["glow"]),
               "--run-name", "killed", "--storage", str(storage), "--tracking-uri", uri]
    configure(uri)
    before = len(list_models())
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        # Killed once Ray Train has registered the first epoch's checkpoint (its snapshot lists it) and
        # before the run can finish.
        while not (storage / "killed" / "checkpoint_manager_snapshot.json").exists() and time.monotonic() < deadline:
            assert job.poll() is None, "training ended before it could be killed"
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        burner.kill()
    assert len(list_models()) == before, "the killed run registered a version"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads(finished.stdout[finished.stdout.index("{"):])
    configure(uri)
    assert len(list_models()) == before + 1
    # Resumed, not restarted: the rerun reused the MLflow run, and epoch 1 (checkpointed before the kill)
    # was trained and logged once.
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(summary["run_id"], "val_bpd")]
    assert steps.count(1) == 1 and set(steps) == set(range(1, EPOCHS + 1))  # val_bpd: the first phase
    _assert_same(_weights(uri, summary["name"], summary["version"]), reference["weights"])
