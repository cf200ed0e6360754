"""Online scoring on Ray Serve: a face image or a short clip in, calibrated verdicts out.

One deployment with a FastAPI ingress. A request is authorised and its declared size checked before
any of its body is read; the body is then streamed in under a byte cap (Serve itself has no body
limit), decoded (image dimensions are checked from the header before a pixel is decoded), and its
faces are detected and aligned in a thread pool, cropped exactly as the model's training crops were
(the CropConfig stored with the model). The crops are scored through `@serve.batch`
together with other requests' crops: scorers are batch-independent, so batching changes
throughput, never results.

Models come from the MLflow registry. An alias is resolved to a version (a resolution is reused for
at most `alias_refresh_s`) and the model is cached under that version, so a moved alias takes
effect on the next resolution and a stale version is never served under the alias's name. The
header `serve_multiplexed_model_id` selects another model: a URI (`models:/flowood-vqvae@champion`,
`models:/flowood-glow/2`) or a version or alias of the default model (`2`, `candidate`); Serve
routes such requests to a replica that already holds that model when one does.

Verdict: `fake` when the model's primary score is above the threshold calibrated on real
validation data at `fpr` (1% by default). The primary score is the scorer's (`Scorer.primary`, the
same one archive scoring judges by):
  glow   glow_typicality  |bits/dim - entropy of real faces| (Nalisnick et al.): raw bits/dim rates
                          smooth, simple faces as the most likely (Kirichenko et al.)
  vqvae  vq_latent_nll    sum of the latent NLLs above lambda_s (Marimont & Tarroni's sample score)
A clip's scores are its frames' scores aggregated by `Scorer.aggregate`, as calibration and archive
scoring aggregate them, and the clip is judged against the video-level threshold.

`?heatmap=1` (VQ-VAE family) adds Marimont & Tarroni's restoration map for the largest faces or the
highest-scoring frames (`max_heatmaps`); it costs about as much as hundreds of plain scorings.

Every bad input is answered with a 4xx and the JSON body {"error": code, "detail": reason}.

Run with `serve run flowood_ray.cluster.serve:build_app model=models:/flowood-glow@champion`,
`serve run deploy/serve.yaml`, or `run_server([...])`.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of the Serve
# class-based view at run time, and string annotations of module-level aliases do not resolve there.
import asyncio
import base64
import hmac
import io
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import cv2
import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from flowood_ray import __version__
from flowood_ray.media.align import align_face
from flowood_ray.media.decode import MAX_PIXELS, DecodeOutcome, MediaError, MediaInfo, iter_frames, probe
from flowood_ray.media.facecrop import resize_crops
from flowood_ray.media.faces import CropConfig, Face, FaceTracker
from flowood_ray.media.sampling import SamplingConfig, sample_indices
from flowood_ray.models.glow import preprocess
from flowood_ray.registry import configure, load_registered, parse_model_uri, resolve_version
from flowood_ray.scoring.calibration import Calibration, verdict
from flowood_ray.scoring.restoration import restoration_map
from flowood_ray.scoring.scorers import Scorer, VQVAEScorer, build_scorer

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKEN_ENV = "FLOWOOD_API_TOKEN"
APP_NAME = "flowood"
MAX_MODELS_PER_REPLICA = 3
OCTET_STREAM = "application/octet-stream"
# Content types we accept -> the format Pillow must find in the bytes.
IMAGE_TYPES: dict[str, str] = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
# Pillow's format names -> ours: phone cameras write multi-picture JPEGs, which Pillow calls MPO.
_PIL_FORMATS: dict[str, str] = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
# PyAV recognises a container from its bytes; the suffix only sends the file down probe()'s video path.
VIDEO_TYPES: dict[str, str] = {
    "video/mp4": ".mp4", "video/quicktime": ".mov", "video/x-msvideo": ".avi", "video/avi": ".avi",
    "video/webm": ".webm", "video/x-matroska": ".mkv", "video/mpeg": ".mpg", OCTET_STREAM: ".mp4",
}
_SPOOL_CHUNK = 1 << 16


def _token_from_env() -> SecretStr | None:
    token = os.environ.get(TOKEN_ENV)
    return SecretStr(token) if token else None


class ServeSettings(BaseModel):
    """Everything a replica needs; `build_app` validates Serve's `args` into this."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        min_length=1, max_length=MAX_MODELS_PER_REPLICA,
        description="registry URIs models:/NAME@ALIAS or models:/NAME/VERSION; the first is the default",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking and registry URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    token: SecretStr | None = Field(
        default_factory=_token_from_env, description=f"bearer token required on /v1/* (default: ${TOKEN_ENV})"
    )
    max_body_bytes: int = Field(10 * 2**20, ge=1024, description="largest request body, checked while streaming")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, le=MAX_PIXELS, description="largest image or video frame")
    max_video_seconds: float = Field(10.0, gt=0.0)
    max_video_frames: int = Field(1800, ge=1, description="most frames a clip may hold; bounds the decoding cost")
    frames_per_video: int = Field(32, ge=1, le=256, description="frames sampled uniformly from a clip and scored")
    max_faces: int = Field(8, ge=1, le=64, description="the largest faces of an image that are scored")
    fpr: float = Field(0.01, gt=0.0, lt=1.0, description="false-positive rate of the verdict; a calibrated rate")
    max_heatmaps: int = Field(4, ge=1, le=64, description="restoration maps per request (largest faces, top frames)")
    heatmap_restorations: int = Field(5, ge=1, le=32, description="restorations drawn from the prior per map")
    heatmap_vmax: float = Field(1.0, gt=0.0, description="map value (L1 over channels, at most 3) at the top colour")
    heatmap_seed: int = Field(0, description="base seed of the restorations: a crop always gets the same map")
    alias_refresh_s: float = Field(30.0, ge=0.0, description="how long an alias -> version resolution is reused")
    max_batch_size: int = Field(8, ge=1, description="requests whose crops are scored in one forward pass")
    # Requests that arrive while a batch is being scored form the next batch anyway; waiting for more
    # only adds latency when a replica's CPUs are already busy with the forward pass.
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)
    preprocess_threads: int = Field(2, ge=1, le=32, description="threads (and MediaPipe graphs) decoding and detecting")

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data: Any) -> Any:
        """`model=URI[,URI]`, as `serve run ...:build_app model=...` passes it, or `models` as one string."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "model" in data:
            if "models" in data:
                raise ValueError("give `model` or `models`, not both")
            data["models"] = data.pop("model")
        if isinstance(data.get("models"), str):
            data["models"] = [uri.strip() for uri in data["models"].split(",") if uri.strip()]
        return data

    @model_validator(mode="after")
    def _check_uris(self) -> Self:
        for uri in self.models:
            parse_model_uri(uri)
        return self


class ApiError(Exception):
    """A request the service refuses; becomes {"error": code, "detail": detail} with `status`."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body exceeds the {limit} byte limit")


# ---------------------------------------------------------------------------------------------
# Response bodies (they also document the API at /docs)


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. payload_too_large, no_face, invalid_image")
    detail: str


class ModelInfo(BaseModel):
    name: str
    version: str
    family: str
    score: str = Field(description="the primary score that decides the verdict")
    fpr: float = Field(description="false-positive rate on real validation data at which thresholds were set")
    frame_threshold: float
    video_threshold: float


class Heatmap(BaseModel):
    kind: Literal["restoration"] = Field(
        description="Marimont & Tarroni pixel map: weighted L1 residual to restorations drawn from the prior"
    )
    png_base64: str = Field(description="colour-mapped map over the aligned crop (inferno, 0..vmax)")
    crop_png_base64: str = Field(description="the aligned face crop the map covers")
    vmax: float = Field(description="map value at the top of the colour map")
    max_value: float = Field(description="largest value of this map")


class FaceScore(BaseModel):
    box: list[float] = Field(description="x0, y0, x1, y1 in pixels of the input, clipped to it")
    detection_confidence: float
    scores: dict[str, float | None] = Field(description="every score of the model; higher = more anomalous")
    score: float = Field(description="the primary score")
    threshold: float
    verdict: Literal["real", "fake"]
    heatmap: Heatmap | None = None


class ImageResult(BaseModel):
    model: ModelInfo
    width: int
    height: int
    faces: list[FaceScore] = Field(description="largest first")


class FrameScore(FaceScore):
    frame_index: int
    timestamp_s: float
    tracked: bool = Field(description="the face position came from tracking rather than a fresh detection")


class VideoScore(BaseModel):
    scores: dict[str, float | None] = Field(description="every score, aggregated over the frames")
    score: float = Field(description="the primary score")
    threshold: float
    verdict: Literal["real", "fake"]
    aggregation: str
    frames_scored: int


class VideoResult(BaseModel):
    model: ModelInfo
    width: int
    height: int
    fps: float
    duration_s: float
    frame_count: int
    video: VideoScore
    frames: list[FrameScore]


class ModelEntry(ModelInfo):
    uri: str = Field(description="as configured")
    default: bool
    aliases: list[str]
    image_size: int
    crop_size: int
    crop_margin: float
    video_aggregation: str
    thresholds: dict[str, dict[str, dict[str, float]]] = Field(description="level -> score -> fpr -> threshold")


class ModelList(BaseModel):
    models: list[ModelEntry]


class Health(BaseModel):
    status: Literal["ok"]
    default_model: str
    version: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "empty, corrupt or truncated media; heatmap asked of a model without one; malformed request"),
        (401, "missing or wrong bearer token"),
        (404, "unknown model"),
        (413, "body over max_body_bytes, or pixels over max_image_pixels"),
        (415, "unsupported or mismatched content type"),
        (422, "no face, clip too long, unscorable input, uncalibrated model, invalid parameters"),
        (503, "the model registry cannot be reached"),
    )
}


def _body_doc(types: Iterable[str], what: str) -> dict[str, Any]:
    """OpenAPI request body for handlers that read the raw stream themselves."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    content: dict[str, Any] = {content_type: binary for content_type in types}
    content["multipart/form-data"] = {
        "schema": {
            "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"],
        }
    }
    return {"requestBody": {"required": True, "description": what, "content": content}}


# ---------------------------------------------------------------------------------------------
# Models


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
    lambda_p: float | None  # restoration threshold of the VQ-VAE family

    @property
    def aggregation(self) -> str:
        return str(self.calibration.get("video_aggregation", "mean"))

    def info(self, fpr: float) -> ModelInfo:
        return ModelInfo(
            name=self.name, version=self.version, family=self.family, score=self.score_name, fpr=fpr,
            frame_threshold=self.frame.threshold(fpr), video_threshold=self.video.threshold(fpr),
        )


def load_served_model(uri: str, settings: ServeSettings) -> ServedModel:
    """The registered bundle behind `uri` with its scorer and the calibration of its primary score."""
    bundle = load_registered(uri)
    try:
        scorer = build_scorer(bundle)
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
        frame=frame, video=video, calibration=bundle.calibration, crop=crop, lambda_p=bundle.extra.get("lambda_p"),
    )


def _registry_error(uri: str, exc: Exception) -> ApiError:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        return ApiError(404, "unknown_model", f"{uri}: {exc.message}")
    return ApiError(503, "registry_unavailable", f"cannot load {uri} from the model registry: {exc}")


def _aliases(name: str, version: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(MlflowClient().get_model_version(name, version).aliases)


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


def restoration_heatmaps(model: ServedModel, crops: np.ndarray, settings: ServeSettings) -> list[Heatmap]:
    """Restoration pixel maps of aligned crops, colour-mapped on a fixed scale so requests compare by eye."""
    scorer = model.scorer
    assert isinstance(scorer, VQVAEScorer) and model.lambda_p is not None
    images = preprocess(torch.from_numpy(resize_crops(crops, scorer.image_size)).to(scorer.device), 8, "center")
    # Batch-independent restorations seeded from the crop's bytes: the same face gets the same map.
    result = restoration_map(
        scorer.vqvae, scorer.prior, images, model.lambda_p, settings.heatmap_restorations,
        generator=torch.Generator().manual_seed(settings.heatmap_seed),
    )
    size = crops.shape[1]
    maps = []
    for crop, values in zip(crops, result.pixel_map.double().cpu().numpy()):
        up = cv2.resize(values.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        levels = np.clip(up / settings.heatmap_vmax * 255.0, 0, 255).astype(np.uint8)
        maps.append(Heatmap(
            kind="restoration", png_base64=_png_base64(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)),
            crop_png_base64=_png_base64(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)), vmax=settings.heatmap_vmax,
            max_value=float(values.max()),
        ))
    return maps


def _png_base64(bgr: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(png.tobytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Request bodies


class _CappedReceive:
    """ASGI receive that refuses a body growing past `limit`: Content-Length may be absent (chunked) or wrong."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._received = 0

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise _too_large(self._limit)
        return message


def check_declared_length(request: Request, limit: int) -> None:
    """Refuse from the headers alone, before a byte of an oversized body is read."""
    header = request.headers.get("content-length")
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise ApiError(400, "bad_content_length", f"Content-Length {header!r} is not a number") from None
    if length < 0:
        raise ApiError(400, "bad_content_length", f"Content-Length {length} is negative")
    if length > limit:
        raise _too_large(limit)


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _unsupported(got: str | None, accepted: Iterable[str]) -> ApiError:
    return ApiError(415, "unsupported_media_type",
                    f"content type {got or '(none)'} is not accepted; send one of {sorted(accepted)} "
                    "or multipart/form-data with a `file` field")


@asynccontextmanager
async def _form_file(request: Request) -> AsyncIterator[UploadFile]:
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_file", "the multipart body needs a `file` field holding the media")
        yield upload
    finally:
        await form.close()


async def read_image_body(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The image bytes and the content type the client declared for them (None: unknown)."""
    capped = Request(request.scope, _CappedReceive(request.receive, limit))
    media_type = _media_type(request.headers.get("content-type"))
    accepted = [*IMAGE_TYPES, OCTET_STREAM]
    try:
        if media_type == "multipart/form-data":
            async with _form_file(capped) as upload:
                declared = _media_type(upload.content_type)
                if declared is not None and declared not in accepted:
                    raise _unsupported(declared, accepted)
                data = await upload.read()
        elif media_type in accepted:
            declared = media_type
            data = b"".join([chunk async for chunk in capped.stream()])
        else:
            raise _unsupported(media_type, accepted)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None
    if not data:
        raise ApiError(400, "empty_body", "the request carries no image bytes")
    return data, None if declared == OCTET_STREAM else declared


async def spool_video_body(request: Request, limit: int, directory: Path) -> Path:
    """Stream the clip into a file under `directory`; nothing beyond `limit` bytes is accepted."""
    capped = Request(request.scope, _CappedReceive(request.receive, limit))
    media_type = _media_type(request.headers.get("content-type"))
    try:
        if media_type == "multipart/form-data":
            async with _form_file(capped) as upload:
                declared = _media_type(upload.content_type) or OCTET_STREAM
                if declared not in VIDEO_TYPES:
                    raise _unsupported(declared, VIDEO_TYPES)
                path = directory / f"upload{VIDEO_TYPES[declared]}"
                with path.open("wb") as out:
                    while chunk := await upload.read(_SPOOL_CHUNK):
                        out.write(chunk)
        elif media_type in VIDEO_TYPES:
            path = directory / f"upload{VIDEO_TYPES[media_type]}"
            with path.open("wb") as out:
                async for chunk in capped.stream():
                    out.write(chunk)
        else:
            raise _unsupported(media_type, VIDEO_TYPES)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None
    if path.stat().st_size == 0:
        raise ApiError(400, "empty_body", "the request carries no video bytes")
    return path


def decode_image(data: bytes, declared: str | None, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels of a JPEG, PNG or WebP; the size is checked from the header before decoding."""
    try:
        # Only these decoders ever see client bytes: fewer parsers, less attack surface.
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"]) as image:
            found = _PIL_FORMATS.get(str(image.format))
            if found is None:
                raise ApiError(415, "unsupported_media_type", f"{image.format} images are not accepted")
            if declared is not None and IMAGE_TYPES[declared] != found:
                raise ApiError(415, "content_type_mismatch", f"declared {declared} but the bytes are {found}")
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large", f"{width}x{height} pixels exceed the {max_pixels} pixel limit")
            image.load()  # the full decode: a truncated file fails here instead of decoding grey
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", "the bytes are not a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "invalid_image", f"the image is truncated or corrupt: {exc}") from None


def _media_error(exc: MediaError) -> ApiError:
    if exc.status == "unsupported":
        return ApiError(422, "unsupported_video", exc.reason)
    return ApiError(400, "invalid_video", exc.reason)


def _finite_scores(scores: dict[str, np.ndarray], i: int) -> dict[str, float | None]:
    return {name: float(v[i]) if math.isfinite(float(v[i])) else None for name, v in scores.items()}


def _primary(model: ServedModel, scores: dict[str, np.ndarray]) -> np.ndarray:
    values = np.asarray(scores[model.score_name], dtype=np.float64)
    if not np.isfinite(values).all():
        # JSON has no NaN and a non-finite density score says the model broke, not that the face is fake.
        raise ApiError(422, "unscorable", f"{model.score_name} is not finite for this input")
    return values


def _box(face: Face, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in face.box)
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


# ---------------------------------------------------------------------------------------------
# The deployment

# Serve's FastAPI ingress pattern needs the route table at class-definition time; it holds no state.
api = FastAPI(
    title="FlowOOD scoring",
    version=__version__,
    description="Deepfake detection as out-of-distribution detection: face images and short clips scored by "
    "density models trained on real footage, with verdicts at thresholds calibrated on real data only.",
)
bearer = HTTPBearer(auto_error=False, description=f"required on /v1/* when the server has {TOKEN_ENV}")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
HeatmapFlag = Annotated[bool, Query(
    description="add restoration heatmaps (PNG) for the largest faces or the highest-scoring frames, up to "
    "max_heatmaps; VQ-VAE family only"
)]

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.detail)
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": _HTTP_CODES.get(exc.status_code, "http_error"), "detail": str(exc.detail)},
                        status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    # The message may hold paths or internals; the replica log has the traceback.
    return JSONResponse({"error": "internal_error", "detail": f"{type(exc).__name__}; see the replica log"},
                        status_code=500)


@serve.deployment(
    # Requests beyond max_ongoing_requests wait in Serve's router, whose back-off halved throughput at
    # concurrency 32 in bench/serve.py; a waiting request here holds at most max_body_bytes.
    ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, health_check_period_s=10, health_check_timeout_s=30,
)
@serve.ingress(api)
class ScoringService:
    def __init__(self, settings: ServeSettings) -> None:
        cv2.setNumThreads(1)
        self.settings = settings
        configure(settings.tracking_uri)
        self._token = settings.token.get_secret_value() if settings.token else None
        self._default_name = parse_model_uri(settings.models[0])[0]
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="flowood-media")
        self._trackers: dict[str, queue.SimpleQueue[FaceTracker]] = {}
        self._trackers_lock = threading.Lock()
        self._compute_lock = threading.Lock()
        # The default model is loaded now: a wrong URI fails the deployment rather than every request,
        # and the first request does not pay for the download, the detector and torch's first call.
        name, version = resolve_version(settings.models[0])
        pinned = f"models:/{name}/{version}"
        model = load_served_model(pinned, settings)
        with self._tracker(model.crop) as tracker:
            tracker.detector.detect(np.zeros((64, 64, 3), np.uint8))
        model.scorer.score(np.zeros((1, model.crop.size, model.crop.size, 3), np.uint8))
        self._preloaded: dict[str, ServedModel] = {pinned: model}
        self._pins: dict[str, tuple[float, str]] = {settings.models[0]: (time.monotonic(), pinned)}
        self._score_batch.set_max_batch_size(settings.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        log.info("serving %s (default %s, auth %s)", settings.models, pinned, "on" if self._token else "off")

    def check_health(self) -> None:
        """A MediaPipe graph that hit an internal error stays broken; Serve restarts a replica that raises."""
        with self._trackers_lock:
            pools = list(self._trackers.values())
        for pool in pools:
            idle: list[FaceTracker] = []
            try:
                while True:
                    idle.append(pool.get_nowait())
            except queue.Empty:
                pass
            try:
                for tracker in idle:
                    tracker.detector.detect(np.zeros((64, 64, 3), np.uint8))
            finally:
                for tracker in idle:
                    pool.put(tracker)

    # -- models -----------------------------------------------------------------------------

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
        try:
            name, version = await asyncio.to_thread(resolve_version, uri)
        except Exception as exc:  # noqa: BLE001 - MLflow's own and transport errors alike become 404/503
            raise _registry_error(uri, exc) from None
        pinned = f"models:/{name}/{version}"
        if cached is not None and cached[1] != pinned:
            log.info("%s moved from %s to %s", uri, cached[1], pinned)
        self._pins[uri] = (now, pinned)
        return pinned

    async def _load(self, uri: str) -> ServedModel:
        pinned = await self._pin(uri)
        try:
            return await self.get_model(pinned)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - see _pin
            log.warning("loading %s failed: %s", pinned, exc)
            raise _registry_error(pinned, exc) from None

    async def _requested_model(self) -> ServedModel:
        requested = serve.get_multiplexed_model_id() or self.settings.models[0]
        return await self._load(self._model_uri(requested))

    # -- work off the event loop --------------------------------------------------------------

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        # One model computation at a time: restoration hooks into the prior that scoring also runs,
        # and a single forward already keeps the replica's CPUs busy.
        with self._compute_lock:
            return fn(*args)

    @contextmanager
    def _tracker(self, crop: CropConfig) -> Iterator[FaceTracker]:
        """A face tracker set up as `crop` says; one per pool thread, as a graph must not see two frames at once."""
        key = crop.model_dump_json()
        with self._trackers_lock:
            pool = self._trackers.get(key)
            if pool is None:
                pool = self._trackers[key] = queue.SimpleQueue()
                for _ in range(self.settings.preprocess_threads):
                    pool.put(FaceTracker(crop))
        tracker = pool.get()
        try:
            yield tracker
        finally:
            pool.put(tracker)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _score_batch(self, jobs: list[tuple[ServedModel, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return await asyncio.to_thread(self._compute, score_jobs, jobs)

    def _image_crops(self, data: bytes, declared: str | None, crop: CropConfig
                     ) -> tuple[np.ndarray, np.ndarray, list[Face]]:
        rgb = decode_image(data, declared, self.settings.max_image_pixels)
        with self._tracker(crop) as tracker:
            faces = tracker.detector.detect(rgb)
        faces = sorted(faces, key=lambda f: f.area, reverse=True)[: self.settings.max_faces]
        if not faces:
            raise ApiError(422, "no_face", f"no face found in the {rgb.shape[1]}x{rgb.shape[0]} image")
        crops = np.stack([align_face(rgb, face.keypoints, crop.size, crop.margin)[0] for face in faces])
        return rgb, crops, faces

    def _video_crops(self, path: Path, crop: CropConfig
                     ) -> tuple[MediaInfo, np.ndarray, list[tuple[int, float, Face]]]:
        settings = self.settings
        try:
            info = probe(path)
        except MediaError as exc:
            raise _media_error(exc) from None
        if info.width * info.height > settings.max_image_pixels:
            raise ApiError(413, "image_too_large",
                           f"{info.width}x{info.height} frames exceed the {settings.max_image_pixels} pixel limit")
        if info.duration_s > settings.max_video_seconds or info.frame_count > settings.max_video_frames:
            raise ApiError(422, "video_too_long", f"{info.duration_s:.1f} s / {info.frame_count} frames exceed the "
                           f"{settings.max_video_seconds} s / {settings.max_video_frames} frame limit")
        indices = sample_indices(info.frame_count, SamplingConfig(num_frames=settings.frames_per_video))
        outcome = DecodeOutcome()
        crops: list[np.ndarray] = []
        rows: list[tuple[int, float, Face]] = []
        with self._tracker(crop) as tracker:
            tracker.reset()
            try:
                # One decoder thread: requests run side by side in the pool and the replica owns few CPUs.
                for index, timestamp, rgb in iter_frames(path, info, indices, outcome, threads=1):
                    face = tracker.update(index, rgb)
                    if face is not None:
                        crops.append(align_face(rgb, face.keypoints, crop.size, crop.margin)[0])
                        rows.append((index, timestamp, face))
            except (MediaError, ValueError, cv2.error) as exc:
                raise ApiError(400, "invalid_video", f"decoding failed: {exc}") from None
        if outcome.error is not None:
            # A clip cut short would be judged on frames the client did not choose; refuse it.
            raise ApiError(400, "invalid_video", outcome.error)
        if outcome.frames_decoded == 0:
            raise ApiError(400, "invalid_video", "no frame could be decoded")
        if not crops:
            raise ApiError(422, "no_face", f"no face found in {outcome.frames_decoded} sampled frames")
        return info, np.stack(crops), rows

    async def _heatmaps(self, model: ServedModel, crops: np.ndarray, chosen: list[int]) -> list[Heatmap | None]:
        """Maps for the crops at `chosen` (the rest get None): restorations cost too much to map them all."""
        maps: list[Heatmap | None] = [None] * len(crops)
        made = await self._in_pool(self._compute, restoration_heatmaps, model, crops[chosen], self.settings)
        for i, heatmap in zip(chosen, made):
            maps[i] = heatmap
        return maps

    # -- endpoints -------------------------------------------------------------------------------

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self._token is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, self._token.encode()):
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <FLOWOOD_API_TOKEN>",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _prepare(self, request: Request, credentials: HTTPAuthorizationCredentials | None,
                       heatmap: bool) -> ServedModel:
        """Everything that can refuse a request before its body is read."""
        self._authorize(credentials)
        check_declared_length(request, self.settings.max_body_bytes)
        model = await self._requested_model()
        if heatmap and model.lambda_p is None:
            raise ApiError(400, "heatmap_unsupported", f"heatmaps need the VQ-VAE family; {model.name}/{model.version} "
                           f"is {model.family}. Select one with the serve_multiplexed_model_id header.")
        return model

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok", default_model=self.settings.models[0], version=__version__)

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, credentials: Credentials) -> ModelList:
        """The configured models as loaded now: versions behind their aliases, and calibrated thresholds."""
        self._authorize(credentials)
        entries = []
        for i, uri in enumerate(self.settings.models):
            model = await self._load(uri)
            try:
                aliases = await asyncio.to_thread(_aliases, model.name, model.version)
            except Exception as exc:  # noqa: BLE001 - see _pin
                raise _registry_error(model.uri, exc) from None
            thresholds = {
                level: {name: {str(f): float(t) for f, t in cal["thresholds"].items()} for name, cal in cals.items()}
                for level, cals in model.calibration.items() if level in ("frame", "video")
            }
            entries.append(ModelEntry(
                **model.info(self.settings.fpr).model_dump(), uri=uri, default=i == 0, aliases=aliases,
                image_size=model.scorer.image_size, crop_size=model.crop.size, crop_margin=model.crop.margin,
                video_aggregation=model.aggregation, thresholds=thresholds,
            ))
        return ModelList(models=entries)

    @api.post("/v1/score/image", response_model=ImageResult, responses=ERROR_RESPONSES,
              openapi_extra=_body_doc(IMAGE_TYPES, "a JPEG, PNG or WebP image, raw or as the multipart field `file`"))
    async def score_image(
        self, request: Request, credentials: Credentials, heatmap: HeatmapFlag = False
    ) -> ImageResult:
        """Score every face of an image (largest first, at most max_faces)."""
        model = await self._prepare(request, credentials, heatmap)
        if model.scorer.scores_clips:
            raise ApiError(400, "video_only_model", f"{model.name}/{model.version} ({model.family}) scores clips of "
                           "consecutive frames; send the video to /v1/score/video")
        data, declared = await read_image_body(request, self.settings.max_body_bytes)
        rgb, crops, faces = await self._in_pool(self._image_crops, data, declared, model.crop)
        scores = await self._score_batch((model, crops))
        primary = _primary(model, scores)
        maps: list[Heatmap | None] = [None] * len(crops)
        if heatmap:
            maps = await self._heatmaps(model, crops, list(range(min(len(crops), self.settings.max_heatmaps))))
        fpr = self.settings.fpr
        flags = verdict(primary, model.frame, fpr)
        height, width = rgb.shape[:2]
        return ImageResult(model=model.info(fpr), width=width, height=height, faces=[
            FaceScore(
                box=_box(face, width, height), detection_confidence=face.score, scores=_finite_scores(scores, i),
                score=float(primary[i]), threshold=model.frame.threshold(fpr), verdict="fake" if flags[i] else "real",
                heatmap=maps[i],
            )
            for i, face in enumerate(faces)
        ])

    @api.post("/v1/score/video", response_model=VideoResult, responses=ERROR_RESPONSES,
              openapi_extra=_body_doc(VIDEO_TYPES, "a short clip (MP4, MOV, AVI, WebM, MKV), raw or multipart `file`"))
    async def score_video(
        self, request: Request, credentials: Credentials, heatmap: HeatmapFlag = False
    ) -> VideoResult:
        """Score the main face in up to frames_per_video uniformly sampled frames, and the clip as a whole."""
        model = await self._prepare(request, credentials, heatmap)
        with tempfile.TemporaryDirectory(prefix="flowood-serve-") as tmp:
            path = await spool_video_body(request, self.settings.max_body_bytes, Path(tmp))
            info, crops, rows = await self._in_pool(self._video_crops, path, model.crop)
        scores = await self._score_batch((model, crops))
        primary = _primary(model, scores)
        _, clip_scores = model.scorer.aggregate(np.zeros(len(crops), dtype=np.int64), scores)
        clip = {name: values[:1] for name, values in clip_scores.items()}
        clip_score = float(_primary(model, clip)[0])
        maps: list[Heatmap | None] = [None] * len(crops)
        if heatmap:
            top = np.argsort(-primary, kind="stable")[: self.settings.max_heatmaps]
            maps = await self._heatmaps(model, crops, sorted(top.tolist()))
        fpr = self.settings.fpr
        flags = verdict(primary, model.frame, fpr)
        return VideoResult(
            model=model.info(fpr), width=info.width, height=info.height, fps=info.fps, duration_s=info.duration_s,
            frame_count=info.frame_count,
            video=VideoScore(
                scores=_finite_scores(clip, 0), score=clip_score, threshold=model.video.threshold(fpr),
                verdict="fake" if verdict(clip_score, model.video, fpr) else "real", aggregation=model.aggregation,
                frames_scored=len(rows),
            ),
            frames=[
                FrameScore(
                    frame_index=index, timestamp_s=timestamp, tracked=not face.detected,
                    box=_box(face, info.width, info.height), detection_confidence=face.score,
                    scores=_finite_scores(scores, i), score=float(primary[i]), threshold=model.frame.threshold(fpr),
                    verdict="fake" if flags[i] else "real", heatmap=maps[i],
                )
                for i, (index, timestamp, face) in enumerate(rows)
            ],
        )


# ---------------------------------------------------------------------------------------------
# Entry points


def build_application(settings: ServeSettings, **deployment_options: Any) -> Application:
    """The Serve application for `settings`; `deployment_options` go to `ScoringService.options`."""
    deployment = ScoringService.options(**deployment_options) if deployment_options else ScoringService
    return deployment.bind(settings)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run/deploy`: `args` are ServeSettings fields (`model=URI` is short for
    `models: [URI]`)."""
    settings = ServeSettings.model_validate(args)
    if settings.tracking_uri is None:
        # Resolved here, where the operator's environment and working directory are, not in the replicas.
        settings = settings.model_copy(update={"tracking_uri": configure(None)})
    return build_application(settings)


def run_server(
    model_uris: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    num_replicas: int = 1,
    blocking: bool = True,
    **settings: Any,
) -> None:
    """Start Serve on `host:port` and deploy the scoring app (`flowood serve`); blocks until Ctrl-C when
    `blocking`. `token` defaults to $FLOWOOD_API_TOKEN; `settings` are further ServeSettings fields."""
    from flowood_ray.cluster.runtime import init_ray

    fields: dict[str, Any] = {"models": model_uris, "tracking_uri": configure(tracking_uri), **settings}
    if token is not None:
        fields["token"] = token
    config = ServeSettings.model_validate(fields)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the API is reachable from other machines%s", host,
                    "" if config.token else f" and has no token (set {TOKEN_ENV})")
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_application(config, num_replicas=num_replicas), name=APP_NAME, route_prefix="/")
        log.info("scoring %s at http://%s:%d (docs at /docs)", config.models, host, port)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        # Like `serve run`: the service lives as long as the command, also on a joined cluster.
        log.info("interrupted: shutting Serve down")
        serve.shutdown()
