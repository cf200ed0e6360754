"""A one-machine "cluster" for trying the real submission path: a Ray head node with token auth
and an MLflow tracking server on SQLite, both on loopback.

State lives in one directory (default `.flowood-cluster/`): the MLflow database, its artifacts,
the server's pid and log, and `env` with the variables a shell needs to submit jobs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalCluster:
    state_dir: Path
    ray_port: int = 6380
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    num_cpus: int | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """Variables for `ray job submit` and MLflow clients talking to this cluster."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": self.dashboard_url,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        }


def _bin(name: str) -> str:
    """The console script beside the running interpreter, so the venv's Ray and MLflow are used."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable} nor on PATH")
    return found


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers (auth may refuse us): it is up
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s ({last})")


def up(cluster: LocalCluster) -> None:
    state = cluster.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    # Job entrypoints run `python` from the head's PATH: make that this environment's interpreter.
    # Jobs inherit the head's environment, so they log to this cluster's MLflow server by default.
    env = {
        **os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": cluster.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # A token is needed before the head starts; `ray get-auth-token --generate` keeps an existing one.
    subprocess.run([_bin("ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    head = [
        _bin("ray"), "start", "--head", f"--port={cluster.ray_port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_port}", "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    if cluster.num_cpus is not None:
        head.append(f"--num-cpus={cluster.num_cpus}")
    log.info("starting Ray head: %s", " ".join(head))
    subprocess.run(head, env=env, check=True, capture_output=True, text=True)
    mlflow_log = open(state / "mlflow.log", "ab")
    server = subprocess.Popen(
        [
            _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(cluster.mlflow_port),
            "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
            "--artifacts-destination", str(state / "mlartifacts"), "--workers", "1",
        ],
        stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=state,
    )
    (state / "mlflow.pid").write_text(str(server.pid))
    (state / "cluster.json").write_text(json.dumps({**asdict(cluster), "state_dir": str(state)}))
    (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in cluster.env().items()))
    _wait_http(cluster.dashboard_url, 60)
    _wait_http(f"{cluster.tracking_uri}/health", 120)
    log.info("Ray dashboard %s, MLflow %s; `source %s` to submit jobs", cluster.dashboard_url,
             cluster.tracking_uri, state / "env")


def down(state_dir: Path) -> None:
    state = state_dir.resolve()
    pid_file = state / "mlflow.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    subprocess.run([_bin("ray"), "stop", "--force"], check=False, capture_output=True)
    log.info("local cluster stopped (state kept in %s)", state)
