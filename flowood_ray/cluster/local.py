"""A one-machine "cluster" for trying the real submission path: a Ray head node with token auth
and an MLflow tracking server on SQLite, both on loopback.

State lives in one directory (default `.flowood-cluster/`): the MLflow database, its artifacts, the
logs of both servers, `env` with the variables a shell needs to submit jobs, and `cluster.json` with
the settings and the processes `down` stops.

`down` stops only what `up` started, never other Ray clusters on the host (`ray stop` kills every Ray
process of every user it can signal). The head runs as `ray start --head --block`: that one process
owns the head's GCS, raylet, dashboard and monitors, tears them down itself on SIGTERM (and the raylet
its workers), and Ray's fate sharing kills them if it dies. `up` records that process and the MLflow
server (pid and start time, so a reused pid is never signalled); `down` terminates exactly those. The
head gets its own `--temp-dir`, so its sessions, sockets and logs never mix with another Ray's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray  # noqa: F401  (puts the psutil that Ray ships, and `ray stop` uses, on sys.path)
import psutil

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LocalCluster:
    state_dir: Path
    ray_port: int = 6380
    dashboard_port: int = 8265
    # The head's dashboard agent runs submitted jobs; Ray's default port is taken by any other local Ray
    # (and then this head's agent starts without HTTP, so every `ray job submit` fails).
    agent_port: int = 52366
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


def _wait_http(url: str, server: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{server.args[0]} exited with code {server.returncode} before {url} answered; "
                               f"see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers (auth may refuse us): it is up
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s ({last}); see {log_path}")


def _record(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """What identifies the process later: its pid alone could by then belong to someone else's process."""
    return {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time()}


def _running(record: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it is still the one `up` started and has not exited."""
    try:
        process = psutil.Process(record["pid"])
        if process.create_time() != record["create_time"] or process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:
        return None
    return process


def _read_state(state: Path) -> dict[str, Any]:
    path = state / STATE_FILE
    if not path.exists():
        raise ValueError(f"{state} holds no {STATE_FILE}: it is not the state of a `flowood cluster up`")
    return json.loads(path.read_text())


def up(cluster: LocalCluster) -> None:
    state = cluster.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE_FILE).exists():
        alive = [name for name, record in _read_state(state).get("processes", {}).items() if _running(record)]
        if alive:
            raise ValueError(f"the cluster of {state} is running ({', '.join(alive)}); `flowood cluster down` first")
    # Job entrypoints run `python` from the head's PATH: make that this environment's interpreter.
    # Jobs inherit the head's environment, so they log to this cluster's MLflow server by default.
    env = {
        **os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": cluster.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        # `down` means now: no 30 s wait for Serve proxies to drain on SIGTERM.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # A token is needed before the head starts; `ray get-auth-token --generate` keeps an existing one.
    subprocess.run([_bin("ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    # Short and outside the state directory: Ray's socket paths under it must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="flowood-ray-")
    head = [
        _bin("ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={cluster.ray_port}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_port}",
        f"--dashboard-agent-listen-port={cluster.agent_port}", "--include-dashboard=true", "--disable-usage-stats",
    ]
    if cluster.num_cpus is not None:
        head.append(f"--num-cpus={cluster.num_cpus}")
    log.info("starting Ray head: %s", " ".join(head))
    with open(state / "ray-head.log", "ab") as head_log:
        ray_head = subprocess.Popen(head, env=env, stdout=head_log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=state)
    with open(state / "mlflow.log", "ab") as mlflow_log:
        server = subprocess.Popen(
            [
                _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(cluster.mlflow_port),
                "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination", str(state / "mlartifacts"), "--workers", "1",
            ],
            stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=state,
        )
    # Recorded before waiting, so `down` stops both even when one of them never comes up.
    (state / STATE_FILE).write_text(json.dumps({
        **asdict(cluster), "state_dir": str(state), "ray_temp_dir": temp_dir,
        "processes": {"ray_head": _record(ray_head), "mlflow": _record(server)},
    }))
    (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in cluster.env().items()))
    _wait_http(cluster.dashboard_url, ray_head, state / "ray-head.log", 60)
    # Jobs are submitted through the agent, which registers itself right after its HTTP server starts;
    # until then the dashboard answers every submission with "No available agent".
    _wait_http(f"http://127.0.0.1:{cluster.agent_port}/api/job_agent/jobs/none/logs", ray_head,
               state / "ray-head.log", 60)
    _wait_http(f"{cluster.tracking_uri}/health", server, state / "mlflow.log", 120)
    log.info("Ray dashboard %s, MLflow %s; `source %s` to submit jobs", cluster.dashboard_url,
             cluster.tracking_uri, state / "env")


def _stop(name: str, record: dict[str, Any], group: bool) -> None:
    """SIGTERM the recorded process (and its process group when `group`), SIGKILL it after STOP_TIMEOUT_S."""
    process = _running(record)
    if process is None:
        log.info("%s (pid %d) is not running", name, record["pid"])
        return
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _running(record) is not None:
        if time.monotonic() > deadline:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", name, process.pid, STOP_TIMEOUT_S)
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            break
        time.sleep(0.2)
    log.info("stopped %s (pid %d)", name, process.pid)


def down(state_dir: Path) -> None:
    """Stop the Ray head and MLflow server that `up` started from `state_dir`, and nothing else."""
    state = state_dir.resolve()
    recorded = _read_state(state)
    processes = recorded.get("processes")
    if processes is None:
        raise ValueError(f"{state / STATE_FILE} records no processes: that cluster was started by an older flowood "
                         "whose `down` ran `ray stop`; stop its Ray head and MLflow server by hand")
    # The head process tears down the GCS, raylet (and with it the workers), dashboard and monitors.
    _stop("Ray head", processes["ray_head"], group=False)
    # The MLflow server has its own session; its workers share its process group.
    _stop("MLflow server", processes["mlflow"], group=True)
    log.info("local cluster stopped (state kept in %s, Ray logs in %s)", state, recorded["ray_temp_dir"])
