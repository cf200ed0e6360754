"""Which frames of a video to look at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator


class SamplingConfig(BaseModel):
    """`uniform`: `num_frames` evenly spaced over the video; `segments`: `num_frames` in `segments` runs of
    consecutive frames spread over the video, each run starting at a keyframe where the container says which
    frames those are; `stride`: every `stride`-th frame (capped at `max_frames` when set); `all`: every frame
    (capped likewise)."""

    mode: Literal["uniform", "segments", "stride", "all"] = "uniform"
    num_frames: int = Field(32, ge=1)
    segments: int = Field(4, ge=1, description="runs of consecutive frames (segments mode)")
    stride: int = Field(1, ge=1)
    max_frames: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _options_of_their_mode(self) -> "SamplingConfig":
        if self.mode != "stride" and self.stride != 1:
            raise ValueError("stride is only used with mode='stride'")
        if self.mode != "segments" and self.segments != 4:
            raise ValueError("segments is only used with mode='segments'")
        return self

    @property
    def bounded(self) -> bool:
        """Whether a video of any length yields a fixed maximum number of frames."""
        return self.mode in ("uniform", "segments") or self.max_frames is not None


def sample_indices(frame_count: int, config: SamplingConfig, keyframes: Sequence[int] | None = None) -> list[int]:
    """Sorted, unique frame indices in [0, frame_count). `keyframes` (display indices, ascending) places the
    runs of segments mode; the other modes ignore it."""
    if frame_count <= 0:
        return []
    if config.mode == "uniform":
        n = min(config.num_frames, frame_count)
        # Centres of n equal segments: no bias towards the first or the last frame.
        return sorted({int(i) for i in np.floor((np.arange(n) + 0.5) * frame_count / n)})
    if config.mode == "segments":
        return _segment_runs(frame_count, config.num_frames, config.segments, keyframes)
    step = config.stride if config.mode == "stride" else 1
    indices = list(range(0, frame_count, step))
    return indices[: config.max_frames] if config.max_frames else indices


def _segment_runs(frame_count: int, num_frames: int, segments: int, keyframes: Sequence[int] | None) -> list[int]:
    """min(num_frames, frame_count) indices in runs, run i centred in the i-th of `segments` equal parts of
    the video, then moved back to the last keyframe at or before its start.

    A decoder can start only at a keyframe, so a run that starts on one costs its own frames and one seek,
    whatever the video's length; evenly spaced single frames cost up to a GOP of decoding each. Where runs
    move back onto one keyframe (a GOP longer than a part of the video), they are laid end to end from it,
    so the count never changes: a short video with one keyframe gets one long run from its start.
    """
    n = min(num_frames, frame_count)
    runs = min(segments, n)
    lengths = [n // runs + (i < n % runs) for i in range(runs)]
    starts = [min(frame_count - length, max(0, int((i + 0.5) * frame_count / runs - length / 2)))
              for i, length in enumerate(lengths)]
    keys = np.asarray(keyframes if keyframes is not None else [], np.int64)
    if len(keys):
        starts = [int(keys[before]) if (before := int(np.searchsorted(keys, s, side="right")) - 1) >= 0 else s
                  for s in starts]
    indices: list[int] = []
    for i, (start, length) in enumerate(zip(starts, lengths)):
        # After the previous run, and early enough that this run and the ones after it still fit.
        begin = min(max(start, indices[-1] + 1 if indices else 0), frame_count - sum(lengths[i:]))
        indices.extend(range(begin, begin + length))
    return indices
