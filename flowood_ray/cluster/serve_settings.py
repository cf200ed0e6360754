"""Settings of the online scoring service: `build_app` validates Serve's `args` into `ServeSettings`."""

from __future__ import annotations

import os
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from flowood_ray.media.decode import MAX_PIXELS
from flowood_ray.registry import parse_model_uri

TOKEN_ENV = "FLOWOOD_API_TOKEN"
MAX_MODELS_PER_REPLICA = 3


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
    frames_per_video: int = Field(32, ge=1, le=256, description="frames sampled uniformly from a clip and scored by "
                                  "frame models; clip models sample as their training crops were sampled")
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
    device: Literal["cpu", "cuda"] = Field("cpu", description="where replicas run the models (cuda: give each "
                                           "replica a GPU with `gpus_per_replica`)")

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

