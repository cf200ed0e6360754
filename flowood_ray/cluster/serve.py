"""Online scoring on Ray Serve: a face image or a short clip in, calibrated verdicts out.

One deployment with a FastAPI ingress. A request is authorised and its declared size checked before
any of its body is read; the body is then streamed in under a byte cap, decoded (serve_inputs) and
its faces are detected and aligned in a thread pool (serve_faces). The crops are scored alone when
the replica is idle, else through `@serve.batch` together with other requests' crops (serve_queue):
scorers are batch-independent, so batching changes throughput, never results. Models come from the MLflow registry, aliases resolved and
models multiplexed as serve_models describes.

Verdict: `fake` when the model's primary score is above the threshold calibrated on real
validation data at `fpr` (1% by default). The primary score is the scorer's (`Scorer.primary`, the
same one archive scoring judges by):
  glow   glow_typicality  |bits/dim - entropy of real faces| (Nalisnick et al.): raw bits/dim rates
                          smooth, simple faces as the most likely (Kirichenko et al.)
  vqvae  vq_latent_nll    sum of the latent NLLs above lambda_s (Marimont & Tarroni's sample score)
A clip's scores are its frames' scores aggregated by `Scorer.aggregate`, as calibration and archive
scoring aggregate them, and the clip is judged against the video-level threshold.

`?heatmap=1` (VQ-VAE family) adds Marimont & Tarroni's restoration map for the largest faces or the
highest-scoring frames (`max_heatmaps`), by the parallel restoration of scoring/restoration.py: one
prior pass and a few decodes per map, a few plain scorings' worth. Maps are made on their own thread,
one request's at a time, while plain requests go on being scored.

Every bad input is answered with a 4xx and the JSON body {"error": code, "detail": reason}.

Run with `serve run flowood_ray.cluster.serve:build_app model=models:/flowood-glow@champion`,
`serve run deploy/serve.yaml`, or `run_server([...])`.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of the Serve
# class-based view at run time, and string annotations of module-level aliases do not resolve there.
import asyncio
import logging
import math
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypeVar

import cv2
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve import Application

from flowood_ray import __version__
from flowood_ray.cluster.serve_faces import FaceCropper
from flowood_ray.cluster.serve_heatmaps import restoration_heatmaps
from flowood_ray.cluster.serve_ingress import Ingress, set_local_ingress
from flowood_ray.cluster.serve_inputs import (IMAGE_TYPES, VIDEO_TYPES, check_bearer_token, check_declared_length,
                                              read_image_body, spool_video_body)
from flowood_ray.cluster.serve_models import (MultiplexedModels, ServedModel, model_aliases, primary_scores,
                                              score_jobs)
from flowood_ray.cluster.serve_queue import ForwardPasses
from flowood_ray.cluster.serve_schemas import (ERROR_RESPONSES, ApiError, FaceScore, FrameScore, Health, Heatmap,
                                               ImageResult, ModelEntry, ModelList, VideoResult, VideoScore,
                                               add_error_handlers, body_doc)
from flowood_ray.cluster.serve_settings import TOKEN_ENV, ServeSettings
from flowood_ray.media.faces import Face
from flowood_ray.registry import configure

log = logging.getLogger(__name__)

T = TypeVar("T")

APP_NAME = "flowood"


def _finite_scores(scores: dict[str, np.ndarray], i: int) -> dict[str, float | None]:
    return {name: float(v[i]) if math.isfinite(float(v[i])) else None for name, v in scores.items()}


def _box(face: Face, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in face.box)
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


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
add_error_handlers(api)


@serve.deployment(
    # Requests beyond max_ongoing_requests wait in Serve's router, whose back-off halved throughput at
    # concurrency 32 in bench/serve.py; a waiting request here holds at most max_body_bytes.
    ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, health_check_period_s=10, health_check_timeout_s=30,
)
@serve.ingress(api)
class ScoringService(MultiplexedModels):
    def __init__(self, settings: ServeSettings) -> None:
        cv2.setNumThreads(1)
        self.settings = settings
        configure(settings.tracking_uri)
        self._token = settings.token.get_secret_value() if settings.token else None
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="flowood-media")
        self._faces = FaceCropper(settings)
        # Heatmaps queue among themselves, not behind or in front of scoring, nor on the media threads.
        self._heatmap_pool = ThreadPoolExecutor(1, thread_name_prefix="flowood-heatmap")
        self._forward_passes: ForwardPasses[tuple[ServedModel, np.ndarray], dict[str, np.ndarray]] = ForwardPasses(
            lambda job: score_jobs([job])[0], self._score_batch
        )
        model = self._preload_default_model()
        # The first request does not pay for the download, the detector and torch's first call.
        with self._faces.tracker(model.crop) as tracker:
            tracker.detector.detect(np.zeros((64, 64, 3), np.uint8))
        model.scorer.score(np.zeros((1, model.crop.size, model.crop.size, 3), np.uint8))
        self._score_batch.set_max_batch_size(settings.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        log.info("serving %s (default %s, auth %s)", settings.models, model.uri, "on" if self._token else "off")

    def check_health(self) -> None:
        """A MediaPipe graph that hit an internal error stays broken; Serve restarts a replica that raises."""
        self._faces.check_detectors()

    # -- work off the event loop --------------------------------------------------------------

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # Restoration maps only read the modules scoring runs (no hooks, no buffers), so a map can be made
    # while crops are scored.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _score_batch(self, jobs: list[tuple[ServedModel, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        async with self._forward_passes.turn():
            return await asyncio.to_thread(score_jobs, jobs)

    async def _heatmaps(self, model: ServedModel, crops: np.ndarray, chosen: list[int]) -> list[Heatmap | None]:
        """Maps for the crops at `chosen` (the rest get None): the requests that asked share one thread."""
        maps: list[Heatmap | None] = [None] * len(crops)
        made = await asyncio.get_running_loop().run_in_executor(
            self._heatmap_pool, restoration_heatmaps, model, crops[chosen], self.settings
        )
        for i, heatmap in zip(chosen, made):
            maps[i] = heatmap
        return maps

    # -- endpoints -------------------------------------------------------------------------------

    async def _prepare(self, request: Request, credentials: HTTPAuthorizationCredentials | None,
                       heatmap: bool) -> ServedModel:
        """Everything that can refuse a request before its body is read."""
        check_bearer_token(credentials, self._token)
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
        check_bearer_token(credentials, self._token)
        entries = []
        for i, uri in enumerate(self.settings.models):
            model = await self._load(uri)
            aliases = await asyncio.to_thread(model_aliases, model.name, model.version)
            thresholds = {
                level: {name: {str(f): (None if t is None else float(t)) for f, t in cal["thresholds"].items()}
                        for name, cal in cals.items()}
                for level, cals in model.calibration.items() if level in ("frame", "video")
            }
            entries.append(ModelEntry(
                **model.info(self.settings.fpr).model_dump(), uri=uri, default=i == 0, aliases=aliases,
                image_size=model.scorer.image_size, crop_size=model.crop.size, crop_margin=model.crop.margin,
                video_aggregation=model.aggregation, thresholds=thresholds,
            ))
        return ModelList(models=entries)

    @api.post("/v1/score/image", response_model=ImageResult, responses=ERROR_RESPONSES,
              openapi_extra=body_doc(IMAGE_TYPES, "a JPEG, PNG or WebP image, raw or as the multipart field `file`"))
    async def score_image(
        self, request: Request, credentials: Credentials, heatmap: HeatmapFlag = False
    ) -> ImageResult:
        """Score every face of an image (largest first, at most max_faces)."""
        model = await self._prepare(request, credentials, heatmap)
        if model.scorer.scores_clips:
            raise ApiError(400, "video_only_model", f"{model.name}/{model.version} ({model.family}) scores clips of "
                           "consecutive frames; send the video to /v1/score/video")
        data, declared = await read_image_body(request, self.settings.max_body_bytes)
        rgb, crops, faces = await self._in_pool(self._faces.image_crops, data, declared, model.crop)
        scores = await self._forward_passes.run((model, crops))
        primary = primary_scores(model, scores)
        maps: list[Heatmap | None] = [None] * len(crops)
        if heatmap:
            maps = await self._heatmaps(model, crops, list(range(min(len(crops), self.settings.max_heatmaps))))
        fpr = self.settings.fpr
        verdicts = model.verdict_fields("frame", primary, fpr)
        height, width = rgb.shape[:2]
        return ImageResult(model=model.info(fpr), width=width, height=height, faces=[
            FaceScore(
                box=_box(face, width, height), detection_confidence=face.score, scores=_finite_scores(scores, i),
                score=float(primary[i]), heatmap=maps[i], **verdicts[i],
            )
            for i, face in enumerate(faces)
        ])

    @api.post("/v1/score/video", response_model=VideoResult, responses=ERROR_RESPONSES,
              openapi_extra=body_doc(VIDEO_TYPES, "a short clip (MP4, MOV, AVI, WebM, MKV), raw or multipart `file`"))
    async def score_video(
        self, request: Request, credentials: Credentials, heatmap: HeatmapFlag = False
    ) -> VideoResult:
        """Score the main face in up to frames_per_video uniformly sampled frames (a clip model: in the frames
        its training sampling picks), and the clip as a whole."""
        model = await self._prepare(request, credentials, heatmap)
        with tempfile.TemporaryDirectory(prefix="flowood-serve-") as tmp:
            path = await spool_video_body(request, self.settings.max_body_bytes, Path(tmp))
            info, crops, rows = await self._in_pool(self._faces.video_crops, path, model.crop, model.sampling)
        scores = await self._forward_passes.run((model, crops))
        primary = primary_scores(model, scores)
        _, clip_scores = model.scorer.aggregate(np.zeros(len(crops), dtype=np.int64), scores)
        clip = {name: values[:1] for name, values in clip_scores.items()}
        clip_score = float(primary_scores(model, clip)[0])
        maps: list[Heatmap | None] = [None] * len(crops)
        if heatmap:
            top = np.argsort(-primary, kind="stable")[: self.settings.max_heatmaps]
            maps = await self._heatmaps(model, crops, sorted(top.tolist()))
        fpr = self.settings.fpr
        verdicts = model.verdict_fields("frame", primary, fpr)
        return VideoResult(
            model=model.info(fpr), width=info.width, height=info.height, fps=info.fps, duration_s=info.duration_s,
            frame_count=info.frame_count,
            video=VideoScore(
                scores=_finite_scores(clip, 0), score=clip_score, aggregation=model.aggregation,
                frames_scored=len(rows), **model.verdict_fields("video", np.array([clip_score]), fpr)[0],
            ),
            frames=[
                FrameScore(
                    frame_index=index, timestamp_s=timestamp, tracked=not face.detected,
                    box=_box(face, info.width, info.height), detection_confidence=face.score,
                    scores=_finite_scores(scores, i), score=float(primary[i]), heatmap=maps[i], **verdicts[i],
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
    gpus_per_replica: float = 0.0,
    ingress: Ingress = "auto",
    blocking: bool = True,
    **settings: Any,
) -> None:
    """Start Serve on `host:port` and deploy the scoring app (`flowood serve`); blocks until Ctrl-C when
    `blocking`. `token` defaults to $FLOWOOD_API_TOKEN; `settings` are further ServeSettings fields;
    `ingress` is the front door when this call starts Ray (serve_ingress)."""
    from flowood_ray.cluster.runtime import init_ray, starts_local_ray

    fields: dict[str, Any] = {"models": model_uris, "tracking_uri": configure(tracking_uri), **settings}
    if token is not None:
        fields["token"] = token
    config = ServeSettings.model_validate(fields)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the API is reachable from other machines%s", host,
                    "" if config.token else f" and has no token (set {TOKEN_ENV})")
    chosen = set_local_ingress(ingress, starts_local_ray(address))
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    try:
        options: dict[str, Any] = {"num_replicas": num_replicas}
        if gpus_per_replica:
            options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": gpus_per_replica}
            config = config.model_copy(update={"device": "cuda"})
        serve.run(build_application(config, **options), name=APP_NAME, route_prefix="/")
        log.info("scoring %s at http://%s:%d (docs at /docs; ingress: %s)", config.models, host, port,
                 chosen or "the running Ray's")
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        # Like `serve run`: the service lives as long as the command, also on a joined cluster.
        log.info("interrupted: shutting Serve down")
        serve.shutdown()
