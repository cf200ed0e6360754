"""Probing and decoding of videos and still images into RGB frames.

PyAV is the primary decoder (threaded, exact frame counting); OpenCV is the fallback for
containers PyAV cannot open. Still images are one-frame videos so that every later stage
has a single code path.

Every size is checked against MAX_PIXELS before a decoder allocates a frame: images from their
own header (`read_image_header`), videos by FFmpeg itself (`max_pixels`) and by `probe`.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from flowood_ray.media.manifest import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from flowood_ray.media.seeking import PacketIndex

log = logging.getLogger(__name__)

# The one size limit of decoded media, still images and video frames alike (serve's max_image_pixels may
# only lower it). An 8192x8192 RGB frame is 192 MiB, far beyond any face dataset, while a crafted header
# of a few bytes can claim gigabytes: larger sizes are refused from the header, before a pixel is decoded.
MAX_PIXELS = 8192 * 8192
# Opening a container runs avformat_find_stream_info, which decodes frames at whatever size the stream
# header claims before probe() sees that size, and a stream may switch to a larger size mid-way: with
# this option FFmpeg's decoders refuse such a frame instead of allocating it.
_FFMPEG_LIMITS = {"max_pixels": str(MAX_PIXELS)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0..RST7
_WEBP_ANIMATION_FLAG = 0x02


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


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "png", "jpeg", "webp" or "bmp": what the bytes are, whatever the file is called
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


def read_image_header(data: bytes) -> ImageHeader:
    """Format and size of a PNG, JPEG, WebP or BMP image, read from its header without decoding.

    OpenCV picks its decoder from these same leading bytes and sizes its frame from these same
    fields, so the size read here is the size it would allocate. Any other format is refused: its
    bytes would reach a decoder whose header nothing has checked. Raises MediaError.
    """
    if data.startswith(_PNG_SIGNATURE):
        return _png_header(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_header(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    if data.startswith(b"BM"):
        return _bmp_header(data)
    raise MediaError("unsupported", "the bytes are not a PNG, JPEG, WebP or BMP image")


def _unpack(layout: str, data: bytes, offset: int, image_format: str) -> tuple[Any, ...]:
    try:
        return struct.unpack_from(layout, data, offset)
    except struct.error:
        raise MediaError("decode_error", f"truncated {image_format} header") from None


def _png_header(data: bytes) -> ImageHeader:
    # libpng requires IHDR as the first chunk, so its size is the one decoded; a failed CRC means the
    # size itself may be corrupt.
    length, kind, width, height = _unpack(">I4sII", data, 8, "PNG")
    if length != 13 or kind != b"IHDR":
        raise MediaError("decode_error", "PNG does not start with its IHDR chunk")
    (crc,) = _unpack(">I", data, 29, "PNG")
    if zlib.crc32(data[12:29]) != crc:
        raise MediaError("decode_error", "PNG IHDR chunk fails its CRC check")
    # Each frame of an animated PNG carries its own size (fcTL), which IHDR does not bound for every
    # decoder; stills are all this project reads.
    position = 33
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"acTL":
            raise MediaError("unsupported", "animated PNG (APNG) is not supported")
        if kind == b"IDAT":
            break
        position += 12 + length
    return ImageHeader("png", width, height)


def _jpeg_header(data: bytes) -> ImageHeader:
    # Markers are found the way libjpeg's next_marker() finds them (stray bytes, FF 00 pairs and FF fill
    # bytes between segments are skipped) and segments are skipped by their length, so the frame header
    # (SOFn) reached is the decoder's: a SOF-like byte pair inside an EXIF or comment segment is not one.
    position = 2
    while True:
        position = data.find(b"\xff", position)
        while 0 <= position < len(data) and data[position] == 0xFF:
            position += 1
        if not 0 <= position < len(data):
            raise MediaError("decode_error", "truncated JPEG header")
        marker = data[position]
        position += 1
        if marker == 0x00 or marker in _JPEG_MARKERS_WITHOUT_LENGTH:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or SOS: libjpeg needs a frame header first
            raise MediaError("decode_error", "JPEG has no frame header before its image data")
        (length,) = _unpack(">H", data, position, "JPEG")
        if marker in _JPEG_SOF_MARKERS:
            height, width = _unpack(">HH", data, position + 3, "JPEG")
            return ImageHeader("jpeg", width, height)
        if length < 2:
            raise MediaError("decode_error", f"JPEG segment {marker:#04x} has an invalid length {length}")
        position += length


def _webp_header(data: bytes) -> ImageHeader:
    # The first chunk holds the size: the canvas of an extended file (libwebp requires a still's
    # bitstream to match it), else the lossless or lossy bitstream header.
    (kind,) = _unpack("4s", data, 12, "WebP")
    if kind == b"VP8X":
        flags, width, height = _unpack("<B3x3s3s", data, 20, "WebP")
        if flags & _WEBP_ANIMATION_FLAG:
            raise MediaError("unsupported", "animated WebP is not supported")
        return ImageHeader("webp", 1 + int.from_bytes(width, "little"), 1 + int.from_bytes(height, "little"))
    if kind == b"VP8L":
        signature, bits = _unpack("<BI", data, 20, "WebP")
        if signature != 0x2F:
            raise MediaError("decode_error", "WebP lossless bitstream lacks its signature")
        return ImageHeader("webp", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    if kind == b"VP8 ":
        start_code, width, height = _unpack("<3x3sHH", data, 20, "WebP")
        if start_code != b"\x9d\x01\x2a":
            raise MediaError("decode_error", "WebP lossy bitstream lacks its key frame start code")
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)  # the top two bits are a scale hint
    raise MediaError("decode_error", f"WebP starts with an unknown chunk {kind!r}")


def _bmp_header(data: bytes) -> ImageHeader:
    # OpenCV reads a 16-bit size from the old 12-byte OS/2 header and a signed 32-bit size from any
    # header of 36 bytes or more; a negative height only means the rows are stored top-down.
    (header_size,) = _unpack("<I", data, 14, "BMP")
    if header_size == 12:
        width, height = _unpack("<HH", data, 18, "BMP")
    elif header_size >= 36:
        width, height = _unpack("<ii", data, 18, "BMP")
    else:
        raise MediaError("decode_error", f"BMP info header of {header_size} bytes is not a known kind")
    return ImageHeader("bmp", width, abs(height))


def _read_image(path: Path) -> tuple[ImageHeader, np.ndarray]:
    data = Path(path).read_bytes()
    header = read_image_header(data)
    _check_dimensions(header.width, header.height)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise MediaError("decode_error", f"{header.format} image is truncated or corrupt")
    return header, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open_video(path: Path) -> av.container.InputContainer:
    return av.open(str(path), "r", options=_FFMPEG_LIMITS)


def _count_packets(path: Path) -> int:
    """Exact frame count without decoding: one video packet per frame for the codecs we read."""
    with _open_video(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def probe(path: Path) -> MediaInfo:
    """Stream metadata without decoding every frame; raises MediaError for unusable files."""
    path = Path(path)
    kind = media_kind(path)
    _check_readable(path)
    if kind == "image":
        # A full decode, so that a corrupt image is refused here and the size is the decoded (upright) one.
        header, rgb = _read_image(path)
        return MediaInfo("image", 0.0, 1, 0.0, header.format, rgb.shape[1], rgb.shape[0])
    try:
        with _open_video(path) as container:
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
    # Unlike PyAV, OpenCV opens the container with no frame size limit (its stream probing may decode a
    # frame at the claimed size), so the size is only checked once it is open, before any frame is read.
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
            try:
                _, rgb = _read_image(path)
            except MediaError as exc:
                # probe() decoded the file, so it changed since or `info` was not probe()'s.
                outcome.error = exc.reason
                log.warning("%s: %s", path, outcome.error)
                return
            outcome.frames_decoded = 1
            yield 0, 0.0, rgb
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
    if wanted is not None and wanted[-1] + 1 > len(wanted):
        index = _packet_index(path)
        if index is not None:
            outcome.backend = "pyav-seek"
            wanted = yield from _decode_seeking(path, info, index, wanted, outcome, threads)
            if not wanted:
                return
            log.warning("%s: a frame's timestamp is not among the packets'; decoding the rest sequentially", path)
            outcome.backend = "pyav"
    yield from _decode_sequential(path, info, wanted, outcome, threads)


def _packet_index(path: Path) -> PacketIndex | None:
    try:
        stat = os.stat(path)
    except OSError as exc:
        log.debug("%s: no packet index (%s); decoding sequentially", path, exc)
        return None
    return _read_packet_index(str(path), stat.st_mtime_ns, stat.st_size)


# Segments sampling reads a file's keyframes and then decodes it: one demux pass serves both. The
# modification time and size in the key keep a rewritten file from being read with a stale index.
@functools.lru_cache(maxsize=16)
def _read_packet_index(path: str, mtime_ns: int, size: int) -> PacketIndex | None:
    try:
        with _open_video(Path(path)) as container:
            return PacketIndex.read(container)
    except (av.error.FFmpegError, OSError) as exc:
        log.debug("%s: no packet index (%s); decoding sequentially", path, exc)
        return None


def keyframe_indices(path: Path, info: MediaInfo) -> np.ndarray | None:
    """Display indices of the frames a decoder can start from (one demux pass, nothing decoded), or None
    where they are not known: still images, files only OpenCV opens, containers whose keyframe flags are
    not to be trusted (see seeking.py)."""
    if info.kind != "video" or info.codec == "opencv":
        return None
    index = _packet_index(Path(path))
    return None if index is None else index.keyframes


def _decoding(container: av.container.InputContainer, threads: int) -> av.video.stream.VideoStream:
    stream = container.streams.video[0]
    stream.codec_context.options = _FFMPEG_LIMITS
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return stream


def _rgb(frame: av.VideoFrame, index: int, fps: float) -> tuple[int, float, np.ndarray]:
    timestamp = float(frame.time) if frame.time is not None else index / max(fps, 1e-9)
    return index, timestamp, frame_rgb(frame)


def frame_rgb(frame: av.VideoFrame) -> np.ndarray:
    """HxWx3 uint8 RGB of a decoded frame. Limited-range 4:2:0 (nearly all H.264 and MPEG video) goes
    through OpenCV's SIMD BT.601 conversion, three times faster than swscale's at 720p and within 3 levels
    of it; any other pixel format, and odd sizes, through swscale."""
    width, height = frame.width, frame.height
    if frame.format.name != "yuv420p" or width % 2 or height % 2:
        return frame.to_ndarray(format="rgb24")
    planes = [np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : w]
              for plane, w in zip(frame.planes, (width, width // 2, width // 2))]
    i420 = np.concatenate([plane.reshape(-1) for plane in planes]).reshape(height * 3 // 2, width)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)


def _end_check(path: Path, reached: int, expected: int, outcome: DecodeOutcome) -> None:
    """FFmpeg conceals corrupt packets by dropping frames silently; a stream that ends well short of the
    frames asked for is a failure mid-way. A frame or 1% of slack absorbs containers whose counts are
    estimates."""
    if expected - reached > max(1, expected // 100):
        outcome.error = f"stream ended after {reached} of {expected} frames (corrupt or truncated data)"
        log.warning("%s: %s", path, outcome.error)


def _decode_seeking(
    path: Path, info: MediaInfo, index: PacketIndex, wanted: list[int], outcome: DecodeOutcome, threads: int
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield the wanted frames, seeking to the keyframe before each one the decoder would otherwise reach
    only by decoding frames nobody wants. Returns the wanted indices not yielded when a decoded frame's
    timestamp is not in the index (the caller decodes those sequentially), else []."""
    want = set(wanted)
    decoded_to = -1
    try:
        with _open_video(path) as container:
            stream = _decoding(container, threads)
            frames = None
            for target in wanted:
                if target <= decoded_to:
                    continue
                keyframe = index.seek_target(decoded_to, target)
                landing = keyframe
                if keyframe is not None:
                    container.seek(int(index.pts[keyframe]), stream=stream, backward=True, any_frame=False)
                    frames = None
                if frames is None:
                    frames = container.decode(stream)
                for frame in frames:
                    i = index.index_of(frame.pts)
                    if i is None:
                        return sorted(want)
                    # After a seek into an open GOP, frames shown before the keyframe may come out too: they
                    # reference frames the decoder never saw, so they are neither yielded nor counted.
                    if keyframe is not None and i < keyframe:
                        continue
                    if landing is not None:
                        # A decoder started on a frame it cannot decode skips ahead silently: the index lied.
                        if i != landing:
                            return sorted(want)
                        landing = None
                    if i in want:
                        want.discard(i)
                        outcome.frames_decoded += 1
                        yield _rgb(frame, i, info.fps)
                    decoded_to = max(decoded_to, i)
                    if i >= target:
                        break
    except (av.error.FFmpegError, OSError) as exc:
        outcome.error = f"decoder failed after frame {decoded_to}: {exc}"
        log.warning("%s: %s", path, outcome.error)
        return []
    _end_check(path, decoded_to + 1, wanted[-1] + 1, outcome)
    return []


def _decode_sequential(
    path: Path, info: MediaInfo, wanted: list[int] | None, outcome: DecodeOutcome, threads: int
) -> Iterator[tuple[int, float, np.ndarray]]:
    last = wanted[-1] if wanted else None
    want = set(wanted) if wanted is not None else None
    index = 0
    try:
        with _open_video(path) as container:
            stream = _decoding(container, threads)
            for frame in container.decode(stream):
                if want is None or index in want:
                    outcome.frames_decoded += 1
                    yield _rgb(frame, index, info.fps)
                index += 1
                if last is not None and index > last:
                    break
    except (av.error.FFmpegError, OSError) as exc:
        outcome.error = f"decoder failed after {index} frames: {exc}"
        log.warning("%s: %s", path, outcome.error)
        return
    _end_check(path, index, (last + 1) if last is not None else info.frame_count, outcome)


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
