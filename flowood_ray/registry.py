"""MLflow tracking and model registry: bundles of weights, configs and calibration.

A registered version never holds a pickled module: it holds `bundle/` with
  config.json       family, per-component model configs, code version, extra statistics, and for
                    frozen ImageNet encoders the packaged weights' name and sha256
  weights.pt        {component: state_dict} of the trained components, loaded with weights_only=True
  calibration.json  per-score statistics and thresholds from real-only validation data
wrapped as a pyfunc model "from code" (flowood_ray/mlflow_model.py), so `mlflow.pyfunc.load_model`
works too, while our own loaders rebuild the modules from their configs.
"""

from __future__ import annotations

import json
import math
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowood_ray import __version__

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_PREFIX = "flowood-"
CANDIDATE, CHAMPION = "candidate", "champion"
_PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")


@dataclass
class ModelBundle:
    family: str
    configs: dict[str, dict[str, Any]]
    modules: dict[str, nn.Module]
    calibration: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    name: str | None = None
    version: str | None = None

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.version}" if self.name else self.family


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri`, MLFLOW_TRACKING_URI, or a SQLite file in the working directory."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Ray workers run in other directories: a relative SQLite path would open another database.
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def code_version() -> str:
    """The git commit of the running code when there is one (plus '-dirty'), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"flowood-ray=={__version__}"


def _pretrained_identities(family_name: str, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """component -> the packaged weights it is rebuilt from (frozen ImageNet encoders only)."""
    from flowood_ray.models.catalog import family
    from flowood_ray.models.efficientnet import weights_identity

    return {comp: weights_identity(configs[comp]["variant"]).model_dump() for comp in family(family_name).frozen}


def save_bundle(bundle: ModelBundle, directory: Path) -> None:
    from flowood_ray.models.catalog import family

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frozen = family(bundle.family).frozen
    meta = {
        "family": bundle.family, "configs": bundle.configs, "extra": bundle.extra,
        "code_version": bundle.code_version or code_version(),
        "pretrained": _pretrained_identities(bundle.family, bundle.configs),
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (directory / "calibration.json").write_text(json.dumps(bundle.calibration, indent=2, sort_keys=True))
    torch.save({k: m.state_dict() for k, m in bundle.modules.items() if k not in frozen}, directory / "weights.pt")


def load_bundle(directory: Path, device: str | torch.device = "cpu") -> ModelBundle:
    from flowood_ray.models.catalog import build_modules, family

    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    frozen = family(meta["family"]).frozen
    recorded, installed = meta.get("pretrained", {}), _pretrained_identities(meta["family"], meta["configs"])
    for comp in frozen:
        if recorded.get(comp, {}).get("sha256") != installed[comp]["sha256"]:
            raise ValueError(
                f"{directory}: component {comp!r} was trained on top of {recorded.get(comp)} but the installed "
                f"weights are {installed[comp]}; install the package version the model was made with"
            )
    modules = build_modules(meta["family"], meta["configs"])
    states = torch.load(directory / "weights.pt", map_location=device, weights_only=True)
    trained = set(modules) - set(frozen)
    if set(states) != trained:
        raise ValueError(f"weights hold {sorted(states)} but family {meta['family']} needs {sorted(trained)}")
    for name, module in modules.items():
        if name in states:
            module.load_state_dict(states[name])
        module.to(device).eval()
    return ModelBundle(
        family=meta["family"], configs=meta["configs"], modules=modules,
        calibration=json.loads((directory / "calibration.json").read_text()), extra=meta.get("extra", {}),
        code_version=meta.get("code_version", ""),
    )


def register_bundle(bundle: ModelBundle, run_id: str, name: str | None = None, alias: str = CANDIDATE) -> str:
    """Log the bundle under `run_id`, register it as a new version and point `alias` at it."""
    import mlflow
    from mlflow import MlflowClient

    name = name or f"{MODEL_PREFIX}{bundle.family}"
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(bundle, Path(tmp) / "bundle")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_PYFUNC_CODE),
                artifacts={"bundle": str(Path(tmp) / "bundle")},
                registered_model_name=name,
                # Explicit requirements: inferring them would import and probe the whole environment.
                pip_requirements=[f"flowood-ray=={__version__}", f"torch=={torch.__version__.split('+')[0]}"],
            )
    version = str(info.registered_model_version)
    for key, value in calibration_tags(bundle.calibration).items():
        MlflowClient().set_model_version_tag(name, version, key, value)
    MlflowClient().set_registered_model_alias(name, alias, version)
    log.info("registered %s version %s (alias %s)", name, version, alias)
    return version


def calibration_tags(calibration: dict[str, Any]) -> dict[str, str]:
    """What `models list` shows of a version's calibration without downloading it: per level, the primary
    score's clip count (and score count: frames at frame level) and its thresholds with their resolved flags."""
    primary = calibration.get("primary")
    tags = {"flowood.primary": str(primary)}
    for level in ("frame", "video"):
        cal = calibration.get(level, {}).get(primary)
        if cal:
            n = int(cal["n"])
            summary = {fpr: {"threshold": t, "resolved": n >= math.ceil(1.0 / float(fpr) - 1e-9)}
                       for fpr, t in cal["thresholds"].items()}
            samples = int(cal.get("samples") or n)
            tags[f"flowood.{level}"] = json.dumps({"n": n, "samples": samples, "thresholds": summary}, sort_keys=True)
    return tags


def parse_model_uri(uri: str) -> tuple[str, str]:
    """'models:/NAME@ALIAS' or 'models:/NAME/VERSION' -> (name, alias-or-version)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"model URI must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, ref = rest.split("@", 1)
    elif "/" in rest:
        name, ref = rest.rsplit("/", 1)
    else:
        raise ValueError(f"model URI {uri!r} names no alias or version")
    if not name or not ref:
        raise ValueError(f"malformed model URI {uri!r}")
    return name, ref


def resolve_version(uri: str) -> tuple[str, str]:
    """Resolve an alias to a concrete version now, so a later move of the alias is picked up on reload."""
    from mlflow import MlflowClient

    name, ref = parse_model_uri(uri)
    if ref.isdigit():
        return name, ref
    return name, str(MlflowClient().get_model_version_by_alias(name, ref).version)


def load_registered(uri: str, device: str | torch.device = "cpu") -> ModelBundle:
    import mlflow

    name, version = resolve_version(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        bundle = load_bundle(Path(local) / "artifacts" / "bundle", device=device)
    bundle.name, bundle.version = name, version
    return bundle


def list_models() -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    client = MlflowClient()
    rows = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{MODEL_PREFIX}%'"):
        aliases = model.aliases or {}
        for mv in client.search_model_versions(f"name = '{model.name}'"):
            rows.append({
                "name": model.name, "version": str(mv.version), "run_id": mv.run_id,
                "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                "created": mv.creation_timestamp, "primary": mv.tags.get("flowood.primary"),
                **{level: json.loads(mv.tags[f"flowood.{level}"]) for level in ("frame", "video")
                   if f"flowood.{level}" in mv.tags},
            })
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def promote(name: str, version: str, alias: str = CHAMPION) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.get_model_version(name, version)  # raises a clear MLflow error for an unknown version
    client.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s", name, alias, version)
