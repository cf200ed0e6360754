"""Connecting to Ray: an existing cluster when an address is given, else a local one."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray

log = logging.getLogger(__name__)


def _cluster_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def starts_local_ray(address: str | None = None) -> bool:
    """Whether `init_ray(address)` would start a local Ray (rather than reuse or join one)."""
    return not ray.is_initialized() and _cluster_address(address) is None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent `ray.init`; `address` (or RAY_ADDRESS) joins a cluster, otherwise a local one starts."""
    if ray.is_initialized():
        return
    address = _cluster_address(address)
    # Workers inherit the driver's package through the shared filesystem on one machine;
    # on a cluster the image or `ray job submit --working-dir` provides it.
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def record_run(out: Path, summary: dict) -> None:
    """Append one line per run to OUT/runs.jsonl: what ran where, for audits and multi-node checks."""
    with open(Path(out) / "runs.jsonl", "a") as handle:
        handle.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}) + "\n")
