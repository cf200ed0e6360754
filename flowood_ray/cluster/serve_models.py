"""The models a scoring replica serves. They come from the MLflow registry: an alias is resolved to a
version (a resolution is reused for at most `alias_refresh_s`) and the model is cached under that
version, so a moved alias takes effect on the next resolution and a stale version is never served under
the alias's name. The header `serve_multiplexed_model_id` selects another model: a URI
(`models:/flowood-vqvae@champion`, `models:/flowood-glow/2`) or a version or alias of the default model
(`2`, `candidate`); Serve keeps the last `MAX_MODELS_PER_REPLICA` of them per replica.

What the registry answers decides the status: an unknown model, version or alias is a 404, a registry
that cannot be reached (connection refused, timeout, server error, missing SQLite database) a 503. Any
other exception while loading is a bug and reaches the 500 handler, which logs its traceback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import requests
from mlflow.exceptions import MlflowException
from ray import serve

from flowood_ray.cluster.score import clip_sampling
from flowood_ray.cluster.serve_schemas import ApiError, ModelInfo
from flowood_ray.cluster.serve_settings import MAX_MODELS_PER_REPLICA, ServeSettings
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.registry import load_registered, parse_model_uri, resolve_version
from flowood_ray.scoring.calibration import Calibration, verdict
from flowood_ray.scoring.scorers import Scorer, build_scorer

log = logging.getLogger(__name__)

# What the registry raises when it cannot answer: MLflow's own errors (its REST client turns refused
# connections and timeouts into them) and the transport errors of artifact downloads over HTTP.
REGISTRY_ERRORS = (MlflowException, requests.RequestException)
# RESOURCE_DOES_NOT_EXIST: no such model or version; INVALID_PARAMETER_VALUE: no such alias.
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class ServedModel:
    uri: str  # pinned: models:/NAME/VERSION
    name: str
    version: str
    family: str
    scorer: Scorer
    score_name: str
    frame: Calibration
    video: Calibration
    calibration: dict[str, Any]
    crop: CropConfig  # how the training crops were made; serving crops the same way
    sampling: SamplingConfig | None  # a clip model's training sampling, which its clips' frames follow
    lambda_p: float | None  # restoration threshold of the VQ-VAE family

    @property
    def aggregation(self) -> str:
        return str(self.calibration.get("video_aggregation", "mean"))

    def info(self, fpr: float) -> ModelInfo:
        return ModelInfo(
            name=self.name, version=self.version, family=self.family, score=self.score_name, fpr=fpr,
            frame_threshold=finite_or_none(self.frame.threshold(fpr)),
            video_threshold=finite_or_none(self.video.threshold(fpr)),
            frame_calibration_n=self.frame.n, frame_calibration_frames=self.frame.samples or self.frame.n,
            video_calibration_n=self.video.n,
            frame_resolved=self.frame.resolved[_rate(self.frame, fpr)],
            video_resolved=self.video.resolved[_rate(self.video, fpr)],
        )

    def verdict_fields(self, level: str, scores: np.ndarray, fpr: float) -> list[dict[str, Any]]:
        """threshold, p_value and verdict of each primary score at `level` ("frame" or "video")."""
        calibration = self.frame if level == "frame" else self.video
        flags = verdict(scores, calibration, fpr)
        p_values = calibration.p_values(scores) if calibration.scores else np.full(len(scores), np.nan)
        threshold = finite_or_none(calibration.threshold(fpr))
        return [{"threshold": threshold, "p_value": finite_or_none(p), "verdict": "fake" if flag else "real"}
                for flag, p in zip(flags, p_values)]


def finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _rate(calibration: Calibration, fpr: float) -> float:
    return next(key for key in calibration.thresholds if np.isclose(key, fpr))


def load_served_model(uri: str, settings: ServeSettings) -> ServedModel:
    """The registered bundle behind `uri` with its scorer and the calibration of its primary score."""
    with registry_call(uri):
        bundle = load_registered(uri, settings.device)
    try:
        scorer = build_scorer(bundle, settings.device)
    except ValueError as exc:
        raise ApiError(422, "unsupported_model", f"{bundle.model_id}: {exc}") from None
    score_name = scorer.primary
    try:
        frame = Calibration.model_validate(bundle.calibration["frame"][score_name])
        video = Calibration.model_validate(bundle.calibration["video"][score_name])
        frame.threshold(settings.fpr)
        video.threshold(settings.fpr)
        crop = CropConfig(**bundle.extra.get("crop", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(422, "model_not_calibrated", f"{bundle.model_id} has no frame and video calibration of "
                       f"{score_name!r} at fpr={settings.fpr}: {exc}") from None
    assert bundle.name is not None and bundle.version is not None
    return ServedModel(
        uri=uri, name=bundle.name, version=bundle.version, family=bundle.family, scorer=scorer, score_name=score_name,
        frame=frame, video=video, calibration=bundle.calibration, crop=crop, sampling=clip_sampling(bundle),
        lambda_p=bundle.extra.get("lambda_p"),
    )


def registry_error(uri: str, exc: MlflowException | requests.RequestException) -> ApiError:
    """404 for an unknown model, version or alias; 503 for a registry that cannot be reached or fails."""
    if isinstance(exc, MlflowException) and exc.error_code in _NOT_FOUND_CODES:
        return ApiError(404, "unknown_model", f"{uri}: {exc.message}")
    return ApiError(503, "registry_unavailable", f"cannot load {uri} from the model registry: {exc}")


def _sqlite_database(registry_uri: str) -> Path | None:
    if not registry_uri.startswith("sqlite:///"):
        return None
    return Path(registry_uri[len("sqlite:///"):].split("?", 1)[0])


@contextmanager
def registry_call(uri: str) -> Iterator[None]:
    """Run registry calls for `uri`, turning the registry's failures into the API's 404 and 503; other
    exceptions pass through unchanged."""
    database = _sqlite_database(mlflow.get_registry_uri())
    if database is not None and not database.is_file():
        # MLflow would create an empty database there and call every model unknown.
        raise ApiError(503, "registry_unavailable", f"cannot load {uri}: no registry database at {database}")
    try:
        yield
    except REGISTRY_ERRORS as exc:
        error = registry_error(uri, exc)
        if error.status == 503:
            log.warning("%s", error.detail)
        raise error from None


def model_aliases(name: str, version: str) -> list[str]:
    with registry_call(f"models:/{name}/{version}"):
        return sorted(mlflow.MlflowClient().get_model_version(name, version).aliases)


def score_jobs(jobs: list[tuple[ServedModel, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Scores of each job's crops, with one scorer call per model over all of that model's crops."""
    results: list[dict[str, np.ndarray]] = [{} for _ in jobs]
    groups: dict[str, list[int]] = {}
    for i, (model, _) in enumerate(jobs):
        groups.setdefault(model.uri, []).append(i)
    for indices in groups.values():
        model = jobs[indices[0]][0]
        if model.scorer.scores_clips:
            # A clip scorer reads its crops as one video's frames: requests cannot share a call.
            for i in indices:
                results[i] = model.scorer.score(jobs[i][1])
            continue
        scores = model.scorer.score(np.concatenate([jobs[i][1] for i in indices]))
        bounds = np.cumsum([0] + [len(jobs[i][1]) for i in indices])
        for i, start, stop in zip(indices, bounds[:-1], bounds[1:]):
            results[i] = {name: values[start:stop] for name, values in scores.items() if values.ndim == 1}
    return results


def primary_scores(model: ServedModel, scores: dict[str, np.ndarray]) -> np.ndarray:
    values = np.asarray(scores[model.score_name], dtype=np.float64)
    if not np.isfinite(values).all():
        # JSON has no NaN and a non-finite density score says the model broke, not that the face is fake.
        raise ApiError(422, "unscorable", f"{model.score_name} is not finite for this input")
    return values


class MultiplexedModels:
    """The deployment's models, resolved and cached as the module docstring says. A base class of the
    deployment rather than a member of it: Serve routes requests by model id only to deployments whose
    class defines the `@serve.multiplexed` loader."""

    settings: ServeSettings

    def _preload_default_model(self) -> ServedModel:
        """The default model, loaded now: a wrong URI fails the deployment rather than every request."""
        settings = self.settings
        self._default_name = parse_model_uri(settings.models[0])[0]
        with registry_call(settings.models[0]):
            name, version = resolve_version(settings.models[0])
        pinned = f"models:/{name}/{version}"
        model = load_served_model(pinned, settings)
        self._preloaded: dict[str, ServedModel] = {pinned: model}
        self._pins: dict[str, tuple[float, str]] = {settings.models[0]: (time.monotonic(), pinned)}
        return model

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> ServedModel:
        """Load a pinned models:/NAME/VERSION; Serve evicts the least recently used beyond three."""
        preloaded = self._preloaded.pop(model_id, None)
        if preloaded is not None:
            return preloaded
        log.info("loading %s", model_id)
        return await asyncio.to_thread(load_served_model, model_id, self.settings)

    def _model_uri(self, requested: str) -> str:
        if requested.startswith("models:/"):
            uri = requested
        elif requested.isdigit():
            uri = f"models:/{self._default_name}/{requested}"
        else:
            uri = f"models:/{self._default_name}@{requested}"
        try:
            parse_model_uri(uri)
        except ValueError as exc:
            raise ApiError(400, "invalid_model_id", str(exc)) from None
        return uri

    async def _pin(self, uri: str) -> str:
        """models:/NAME/VERSION for `uri`, with an alias resolved at most `alias_refresh_s` ago."""
        name, ref = parse_model_uri(uri)
        if ref.isdigit():
            return f"models:/{name}/{ref}"
        now = time.monotonic()
        cached = self._pins.get(uri)
        if cached is not None and now - cached[0] < self.settings.alias_refresh_s:
            return cached[1]
        with registry_call(uri):
            name, version = await asyncio.to_thread(resolve_version, uri)
        pinned = f"models:/{name}/{version}"
        if cached is not None and cached[1] != pinned:
            log.info("%s moved from %s to %s", uri, cached[1], pinned)
        self._pins[uri] = (now, pinned)
        return pinned

    async def _load(self, uri: str) -> ServedModel:
        return await self.get_model(await self._pin(uri))

    async def _requested_model(self) -> ServedModel:
        requested = serve.get_multiplexed_model_id() or self.settings.models[0]
        return await self._load(self._model_uri(requested))
