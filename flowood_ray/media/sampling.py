"""Which frames of a video to look at."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator


class SamplingConfig(BaseModel):
    """`uniform`: `num_frames` evenly spaced over the video; `stride`: every `stride`-th frame
    (capped at `max_frames` when set); `all`: every frame (capped likewise)."""

    mode: Literal["uniform", "stride", "all"] = "uniform"
    num_frames: int = Field(32, ge=1)
    stride: int = Field(1, ge=1)
    max_frames: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _stride_only_for_stride_mode(self) -> "SamplingConfig":
        if self.mode != "stride" and self.stride != 1:
            raise ValueError("stride is only used with mode='stride'")
        return self


def sample_indices(frame_count: int, config: SamplingConfig) -> list[int]:
    """Sorted, unique frame indices in [0, frame_count)."""
    if frame_count <= 0:
        return []
    if config.mode == "uniform":
        n = min(config.num_frames, frame_count)
        # Centres of n equal segments: no bias towards the first or the last frame.
        return sorted({int(i) for i in np.floor((np.arange(n) + 0.5) * frame_count / n)})
    step = config.stride if config.mode == "stride" else 1
    indices = list(range(0, frame_count, step))
    return indices[: config.max_frames] if config.max_frames else indices
