"""What the scoring API answers: the response bodies (they also document the API at /docs), the OpenAPI
description of raw request bodies, and the error JSON {"error": code, "detail": reason} of every refusal."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the service refuses; becomes {"error": code, "detail": detail} with `status`."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. payload_too_large, no_face, invalid_image")
    detail: str


class ModelInfo(BaseModel):
    name: str
    version: str
    family: str
    score: str = Field(description="the primary score that decides the verdict")
    fpr: float = Field(description="false-positive rate on real validation data at which thresholds were set")
    frame_threshold: float | None = Field(description="None when the calibration holds too few reals for any score to be flagged at this rate")
    video_threshold: float | None = Field(description="None when the calibration holds too few reals for any score to be flagged at this rate")
    frame_calibration_n: int = Field(description="real clips whose frames set the frame threshold; each clip "
                                     "weighs one however many frames it gave (frames of a clip are not independent)")
    frame_calibration_frames: int = Field(description="real frames behind the frame threshold")
    video_calibration_n: int = Field(description="real videos behind the video threshold")
    frame_resolved: bool = Field(description="at least 1/fpr real clips stand behind the frame threshold")
    video_resolved: bool = Field(description="at least 1/fpr real videos stand behind the video threshold")


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
    threshold: float | None = Field(description="flagged above it; None when the calibration holds too few reals for any score to be flagged at this rate")
    p_value: float | None = Field(description="conformal p-value against the calibration reals (None for models "
                                  "calibrated before p-values); fake when at most fpr")
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
    threshold: float | None = Field(description="flagged above it; None when the calibration holds too few reals for any score to be flagged at this rate")
    p_value: float | None = Field(description="conformal p-value against the calibration reals (None for models "
                                  "calibrated before p-values); fake when at most fpr")
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
    thresholds: dict[str, dict[str, dict[str, float | None]]] = Field(
        description="level -> score -> fpr -> threshold (None: too few calibration reals for that rate)")


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
        (404, "unknown model, version or alias"),
        (413, "body over max_body_bytes, or pixels over max_image_pixels"),
        (415, "unsupported or mismatched content type"),
        (422, "no face, clip too long, unscorable input, uncalibrated model, invalid parameters"),
        (500, "a bug while loading a model or scoring; the replica log holds the traceback"),
        (503, "the model registry cannot be reached: refused connection, timeout, server error, missing database"),
    )
}


def body_doc(types: Iterable[str], what: str) -> dict[str, Any]:
    """OpenAPI request body for handlers that read the raw stream themselves."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    content: dict[str, Any] = {content_type: binary for content_type in types}
    content["multipart/form-data"] = {
        "schema": {
            "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"],
        }
    }
    return {"requestBody": {"required": True, "description": what, "content": content}}


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.detail)
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": _HTTP_CODES.get(exc.status_code, "http_error"), "detail": str(exc.detail)},
                        status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    # The message may hold paths or internals; the replica log has the traceback.
    return JSONResponse({"error": "internal_error", "detail": f"{type(exc).__name__}; see the replica log"},
                        status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    """Refusals, routing errors, invalid parameters and crashes alike answer with the error JSON."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
