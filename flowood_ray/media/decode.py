"""Probing and decoding of videos and still images into RGB frames.

PyAV is the primary decoder (threaded, exact frame counting); OpenCV is the fallback for
containers PyAV cannot open. Still images are one-frame videos so that every later stage
has a single code path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from flowood_ray.media.manifest import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

log = logging.getLogger(__name__)

# Decompression bombs: refuse to allocate frames beyond this many pixels.
MAX_PIXELS = 8192 * 8192


class MediaError(Exception):
    """A file that cannot be turned into frames; `status` is the video row's status."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class MediaInfo:
    kind: str  # "video" or "image"
    fps: float
    frame_count: int
    duration_s: float
    codec: str
    width: int
    height: int


@dataclass
class DecodeOutcome:
    """Filled in while frames are yielded: a decoder may fail after some good frames."""

    frames_decoded: int = 0
    error: str | None = None
    backend: str = ""


def media_kind(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    raise MediaError("unsupported", f"unsupported file extension {suffix!r}")


def _check_readable(path: Path) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise MediaError("decode_error", f"file not found: {path}") from None
    except OSError as exc:
        raise MediaError("decode_error", f"cannot stat file: {exc}") from None
    if size == 0:
        raise MediaError("empty", "file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise MediaError("decode_error", f"file is not readable: {path}")


def _check_dimensions(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError("decode_error", f"invalid frame size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise MediaError("unsupported", f"frame size {width}x{height} exceeds the {MAX_PIXELS} pixel limit")


def _read_image(path: Path) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    # Header-only decode first, so a decompression bomb is refused before its pixels are allocated.
    header = cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_8)
    if header is None:
        raise MediaError("decode_error", "bytes are not a decodable image")
    _check_dimensions(header.shape[1] * 8, header.shape[0] * 8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise MediaError("decode_error", "bytes are not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _count_packets(path: Path) -> int:
    """Exact frame count without decoding: one video packet per frame for the codecs we read."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def probe(path: Path) -> MediaInfo:
    """Stream metadata without decoding every frame; raises MediaError for unusable files."""
    path = Path(path)
    kind = media_kind(path)
    _check_readable(path)
    if kind == "image":
        rgb = _read_image(path)
        return MediaInfo("image", 0.0, 1, 0.0, path.suffix.lower().lstrip("."), rgb.shape[1], rgb.shape[0])
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("unsupported", "container has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(0)
            fps = float(rate)
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
            frames = int(stream.frames or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as exc:
        return _probe_opencv(path, f"PyAV: {exc}")
    _check_dimensions(width, height)
    if frames <= 0:
        frames = _count_packets(path)
    if frames <= 0:
        raise MediaError("empty", "video stream has no frames")
    if duration <= 0 and fps > 0:
        duration = frames / fps
    return MediaInfo("video", fps, frames, duration, codec, width, height)


def _probe_opencv(path: Path, pyav_error: str) -> MediaInfo:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError("decode_error", f"no decoder can open this file ({pyav_error})")
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        cap.release()
    _check_dimensions(width, height)
    if frames <= 0:
        raise MediaError("decode_error", f"OpenCV opened the file but reports no frames ({pyav_error})")
    return MediaInfo("video", fps, frames, frames / fps if fps > 0 else 0.0, "opencv", width, height)


def iter_frames(
    path: Path, info: MediaInfo, indices: Sequence[int] | None, outcome: DecodeOutcome, threads: int = 0
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (frame_index, timestamp_s, rgb uint8 HxWx3) for the wanted indices, in order.

    Decoding is sequential and stops after the last wanted index, so only a bounded window
    of frames is ever alive. A failure after some frames is recorded in `outcome` instead of
    raised: the frames already yielded are valid and the caller keeps them.
    """
    path = Path(path)
    if info.kind == "image":
        outcome.backend = "opencv-image"
        if indices is None or 0 in indices:
            outcome.frames_decoded = 1
            yield 0, 0.0, _read_image(path)
        return
    wanted = None if indices is None else sorted(set(indices))
    if wanted is not None and not wanted:
        return
    if info.codec == "opencv":
        yield from _iter_frames_opencv(path, info, wanted, outcome)
        return
    yield from _iter_frames_pyav(path, info, wanted, outcome, threads)


def _iter_frames_pyav(
    path: Path, info: MediaInfo, wanted: list[int] | None, outcome: DecodeOutcome, threads: int
) -> Iterator[tuple[int, float, np.ndarray]]:
    outcome.backend = "pyav"
    last = wanted[-1] if wanted else None
    want = set(wanted) if wanted is not None else None
    index = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            for frame in container.decode(stream):
                if want is None or index in want:
                    timestamp = float(frame.time) if frame.time is not None else index / max(info.fps, 1e-9)
                    rgb = frame.to_ndarray(format="rgb24")
                    outcome.frames_decoded += 1
                    yield index, timestamp, rgb
                index += 1
                if last is not None and index > last:
                    break
    except (av.error.FFmpegError, OSError) as exc:
        outcome.error = f"decoder failed after {index} frames: {exc}"
        log.warning("%s: %s", path, outcome.error)
        return
    # FFmpeg conceals corrupt packets by dropping frames silently; a stream that ends well short
    # of its container's frame count is a failure mid-way. A frame or 1% of slack absorbs
    # containers whose counts are estimates.
    expected = (last + 1) if last is not None else info.frame_count
    if expected - index > max(1, expected // 100):
        outcome.error = f"stream ended after {index} of {expected} frames (corrupt or truncated data)"
        log.warning("%s: %s", path, outcome.error)


def _iter_frames_opencv(
    path: Path, info: MediaInfo, wanted: list[int] | None, outcome: DecodeOutcome
) -> Iterator[tuple[int, float, np.ndarray]]:
    outcome.backend = "opencv"
    last = wanted[-1] if wanted else info.frame_count - 1
    want = set(wanted) if wanted is not None else None
    cap = cv2.VideoCapture(str(path))
    try:
        for index in range(last + 1):
            if want is not None and index not in want:
                ok = cap.grab()
            else:
                ok, bgr = cap.read()
                if ok:
                    outcome.frames_decoded += 1
                    yield index, index / max(info.fps, 1e-9), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if not ok:
                outcome.error = f"OpenCV decoder stopped at frame {index} of {info.frame_count}"
                log.warning("%s: %s", path, outcome.error)
                break
    finally:
        cap.release()
