"""`flowood cluster up/down` on this machine: down stops the Ray head and MLflow server that up started,
and no other Ray (here: this test process's own)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import psutil  # the copy Ray ships, on sys.path once ray is imported

from conftest import free_port
from flowood_ray.cluster.runtime import init_ray

pytestmark = pytest.mark.e2e
FLOWOOD = str(Path(sys.executable).with_name("flowood"))


@ray.remote(num_cpus=0)
def _answer() -> int:
    return 42


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes whose command line names the head's temp dir (GCS, raylet, dashboard, monitors) and
    all their descendants (workers and agents retitle themselves `ray::...`, so only ancestry finds them)."""
    marker = temp_dir.rstrip("/") + "/"
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(marker in arg or arg.endswith(f"={temp_dir}") for arg in p.info["cmdline"] or [])]
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({child.pid: child for child in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_cluster_down_stops_only_what_cluster_up_started(tmp_path: Path) -> None:
    init_ray(num_cpus=1)  # the unrelated Ray that must survive
    assert ray.get(_answer.remote(), timeout=120) == 42
    state = tmp_path / "cluster"
    mlflow_port = free_port()
    up = [FLOWOOD, "cluster", "up", "--state-dir", str(state), "--num-cpus", "1", "--ray-port", str(free_port()),
          "--agent-port", str(free_port()),
          "--dashboard-port", str(free_port()), "--mlflow-port", str(mlflow_port)]
    try:
        started = subprocess.run(up, timeout=300, capture_output=True, text=True)
        assert started.returncode == 0, started.stderr[-3000:]
        recorded = json.loads((state / "cluster.json").read_text())
        head = _head_processes(recorded["ray_temp_dir"])
        # Catches a head started without its own temp dir: then nothing would tell its processes apart.
        assert {"raylet", "gcs_server"} <= {p.name() for p in head}, [p.name() for p in head]
        mlflow = psutil.Process(recorded["processes"]["mlflow"]["pid"])
        mlflow_group = [mlflow, *mlflow.children(recursive=True)]
        assert _port_open(mlflow_port)

        # Catches a second `up` from the same state starting a second head over the recorded one.
        again = subprocess.run(up, timeout=120, capture_output=True, text=True)
        assert again.returncode == 2 and "cluster down" in again.stderr, again.stderr[-3000:]
    finally:
        stopped = subprocess.run([FLOWOOD, "cluster", "down", "--state-dir", str(state)], timeout=300,
                                 capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    # Catches a `down` that leaves the head's GCS, raylet, agents or workers, or the MLflow server, running.
    assert [p.name() for p in head + mlflow_group if _alive(p)] == []
    assert not _port_open(mlflow_port)
    # Catches `ray stop`: it would have killed this process's raylet and GCS too.
    assert ray.get(_answer.remote(), timeout=60) == 42
    # A second `down` finds nothing of its own to stop and signals nothing else.
    assert subprocess.run([FLOWOOD, "cluster", "down", "--state-dir", str(state)], timeout=120,
                          capture_output=True).returncode == 0
    assert ray.get(_answer.remote(), timeout=60) == 42
    shutil.rmtree(recorded["ray_temp_dir"])  # the head's logs, which `down` keeps
