"""One video in, aligned face crops and exactly one status row out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from flowood_ray.media.align import align_face
from flowood_ray.media.decode import DecodeOutcome, MediaError, MediaInfo, iter_frames, keyframe_indices, probe
from flowood_ray.media.faces import CropConfig, FaceTracker
from flowood_ray.media.landmarks import MESH_POINTS, FaceMesher
from flowood_ray.media.manifest import MANIFEST_SCHEMA
from flowood_ray.media.sampling import SamplingConfig, sample_indices

log = logging.getLogger(__name__)

VIDEO_STATUSES = ("ok", "no_face", "decode_error", "unsupported", "empty")

CROP_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("frame_index", pa.int32(), nullable=False),
        pa.field("timestamp_s", pa.float32()),
        pa.field("crop", pa.binary(), nullable=False),  # size*size*3 uint8, RGB, row-major
        pa.field("box", pa.list_(pa.float32(), 4)),
        pa.field("keypoints", pa.list_(pa.float32(), 12)),  # crop coordinates, MediaPipe order
        pa.field("score", pa.float32()),
        pa.field("detected", pa.bool_()),
        # size*size uint8 manipulation mask aligned like the crop (0 untouched .. 255 replaced); fakes with
        # a mask video only.
        pa.field("mask", pa.binary()),
        # Face-mesh landmarks (468 x, y) in crop pixels as float32 bytes, when preprocessing runs the mesh
        # (CropConfig.face_mesh). Bytes, not a fixed-size list: pyarrow cannot read back a null in a
        # Parquet fixed-size list column ("Expected all lists to be of size=936").
        pa.field("mesh", pa.binary()),
    ]
)

VIDEO_SCHEMA = pa.schema(
    list(MANIFEST_SCHEMA)
    + [
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("fps", pa.float32()),
        pa.field("frame_count", pa.int32()),
        pa.field("duration_s", pa.float32()),
        pa.field("codec", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("frames_sampled", pa.int32()),
        pa.field("frames_decoded", pa.int32()),
        pa.field("faces", pa.int32()),
        pa.field("crop_size", pa.int32()),
        pa.field("elapsed_s", pa.float32()),
    ]
)

CropSink = Callable[[pa.Table], None]


def crops_to_array(table: pa.Table, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 view of a crop table's `crop` column."""
    flat = np.frombuffer(b"".join(table.column("crop").to_pylist()), dtype=np.uint8)
    return flat.reshape(-1, size, size, 3)


def masks_to_array(table: pa.Table, size: int) -> np.ndarray:
    """(N, size, size) uint8 masks of a crop table; all zero where a crop has none (reals)."""
    masks = np.zeros((table.num_rows, size, size), np.uint8)
    for i, mask in enumerate(table.column("mask").to_pylist()):
        if mask is not None:
            masks[i] = np.frombuffer(mask, np.uint8).reshape(size, size)
    return masks


def meshes_to_array(table: pa.Table) -> np.ndarray:
    """(N, 468, 2) float32 face-mesh landmarks in crop pixels; NaN where the mesh found no face."""
    meshes = np.full((table.num_rows, MESH_POINTS, 2), np.nan, np.float32)
    for i, mesh in enumerate(table.column("mesh").to_pylist()):
        if mesh is not None:
            meshes[i] = np.frombuffer(mesh, np.float32).reshape(MESH_POINTS, 2)
    return meshes


class _MaskFollower:
    """Frames of a mask video read in step with the video's sampled frames (same indices)."""

    def __init__(self, path: Path, indices: list[int]) -> None:
        self.outcome = DecodeOutcome()
        self._frames: Iterator[tuple[int, float, np.ndarray]] = iter_frames(path, probe(path), indices, self.outcome, 1)
        self._next: tuple[int, float, np.ndarray] | None = next(self._frames, None)

    def at(self, index: int) -> np.ndarray | None:
        """The mask frame with this index as grey uint8, or None when the mask video lacks it."""
        while self._next is not None and self._next[0] < index:
            self._next = next(self._frames, None)
        if self._next is None or self._next[0] != index:
            return None
        return self._next[2][..., 0]


def frames_to_sample(path: Path, info: MediaInfo, sampling: SamplingConfig) -> list[int]:
    """The frame indices `sampling` picks in this file; segments mode reads where its keyframes are."""
    keyframes = keyframe_indices(path, info) if sampling.mode == "segments" else None
    return sample_indices(info.frame_count, sampling, keyframes)


class VideoCropper:
    """Owns a MediaPipe graph; build one per process or actor and reuse it across videos."""

    def __init__(self, sampling: SamplingConfig, crop: CropConfig, flush_rows: int = 256, decode_threads: int = 0):
        self.sampling = sampling
        self.crop = crop
        self.flush_rows = flush_rows
        self.decode_threads = decode_threads
        self.tracker = FaceTracker(crop)
        self.mesher = FaceMesher(video=False) if crop.face_mesh else None

    def process(self, row: Mapping[str, object], sink: CropSink) -> dict[str, object]:
        """Crop one manifest row, streaming crops to `sink`; never raises for bad media."""
        started = time.perf_counter()
        result: dict[str, object] = {name: row.get(name) for name in MANIFEST_SCHEMA.names}
        result.update(status="ok", reason=None, crop_size=self.crop.size, frames_sampled=0, frames_decoded=0, faces=0)
        try:
            info = probe(Path(str(row["path"])))
        except MediaError as exc:
            result.update(status=exc.status, reason=exc.reason)
        else:
            result.update(
                fps=info.fps, frame_count=info.frame_count, duration_s=info.duration_s, codec=info.codec,
                width=info.width, height=info.height,
            )
            mask = row.get("mask_path")
            self._crop_frames(str(row["video_id"]), Path(str(row["path"])), info, result, sink,
                              Path(str(mask)) if mask else None)
        result["elapsed_s"] = time.perf_counter() - started
        return result

    def _crop_frames(self, video_id: str, path: Path, info, result: dict[str, object], sink: CropSink,
                     mask_path: Path | None) -> None:
        indices = frames_to_sample(path, info, self.sampling)
        outcome = DecodeOutcome()
        masks = None
        if mask_path is not None:
            try:
                masks = _MaskFollower(mask_path, indices)
            except MediaError as exc:
                log.warning("%s: mask video %s unusable (%s); crops get no mask", path, mask_path, exc.reason)
        self.tracker.reset()
        buffer: dict[str, list] = {name: [] for name in CROP_SCHEMA.names}
        faces = 0
        for index, timestamp, rgb in iter_frames(path, info, indices, outcome, self.decode_threads):
            face = self.tracker.update(index, rgb)
            if face is None:
                continue
            crop, matrix = align_face(rgb, face.keypoints, self.crop.size, self.crop.margin)
            kps = face.keypoints @ matrix[:, :2].T + matrix[:, 2]
            mask = masks.at(index) if masks is not None else None
            if mask is not None:
                # Outside the frame nothing was manipulated, so the border is 0, not reflected.
                mask = cv2.warpAffine(mask, matrix, (self.crop.size,) * 2, flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0).tobytes()
            mesh = self.mesher.mesh(crop) if self.mesher is not None else None
            for name, value in (
                ("video_id", video_id), ("frame_index", index), ("timestamp_s", timestamp),
                ("crop", crop.tobytes()), ("box", face.box.tolist()), ("keypoints", kps.ravel().tolist()),
                ("score", face.score), ("detected", face.detected), ("mask", mask),
                ("mesh", None if mesh is None else mesh.astype(np.float32).tobytes()),
            ):
                buffer[name].append(value)
            faces += 1
            if len(buffer["video_id"]) >= self.flush_rows:
                sink(pa.table(buffer, schema=CROP_SCHEMA))
                buffer = {name: [] for name in CROP_SCHEMA.names}
        if buffer["video_id"]:
            sink(pa.table(buffer, schema=CROP_SCHEMA))
        result.update(frames_sampled=len(indices), frames_decoded=outcome.frames_decoded, faces=faces)
        if outcome.error is not None:
            # Crops decoded before the failure are kept; the row says how far decoding got.
            result.update(status="decode_error", reason=outcome.error)
        elif outcome.frames_decoded == 0:
            result.update(status="decode_error", reason="no frame could be decoded")
        elif faces == 0:
            result.update(status="no_face", reason=f"no face in {outcome.frames_decoded} decoded frames")

    def close(self) -> None:
        self.tracker.close()
        if self.mesher is not None:
            self.mesher.close()


class ModelInput(BaseModel):
    """How aligned crops become model inputs; saved with each model so scoring matches training."""

    face_fraction: float = Field(1.0, gt=0.2, le=1.0, description="central part of the crop kept (drops background)")
    highpass: bool = Field(False, description="model the high-frequency residual instead of the pixels")
    highpass_sigma: float = Field(1.5, gt=0.0)
    highpass_gain: float = Field(4.0, gt=0.0)


def model_input(crops: np.ndarray, size: int, config: ModelInput) -> np.ndarray:
    """(N, S, S, 3) uint8 crops -> (N, size, size, 3) uint8 model inputs.

    The high-pass residual (crop minus its Gaussian blur, re-centred on 128) keeps sensor noise
    and resampling traces and drops identity, skin tone and lighting: manipulations warp, blend
    or re-synthesise the face, which changes the first and hardly touches the second. It is
    taken before any resizing, which would itself low-pass the crop.
    """
    if config.highpass:
        x = crops.astype(np.float32)
        blurred = np.stack([cv2.GaussianBlur(c, (0, 0), config.highpass_sigma) for c in x])
        crops = np.clip(128.0 + config.highpass_gain * (x - blurred), 0, 255).round().astype(np.uint8)
    if config.face_fraction < 1.0:
        side = crops.shape[1]
        keep = max(1, round(side * config.face_fraction))
        start = (side - keep) // 2
        crops = crops[:, start : start + keep, start : start + keep]
    return resize_crops(np.ascontiguousarray(crops), size)


def model_input_points(points: np.ndarray, crop_size: int, size: int, config: ModelInput) -> np.ndarray:
    """Crop-pixel coordinates (..., 2) -> the same points in the model input `model_input` makes."""
    keep = max(1, round(crop_size * config.face_fraction)) if config.face_fraction < 1.0 else crop_size
    start = (crop_size - keep) // 2
    # Pixel centres map to pixel centres under cv2.resize: x' = (x + 0.5) * size / keep - 0.5.
    return ((points - start + 0.5) * (size / keep) - 0.5).astype(np.float32)


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, size, size, 3); area filter when shrinking, as aliasing would add noise."""
    if crops.shape[1] == size and crops.shape[2] == size:
        return crops
    interp = cv2.INTER_AREA if size < crops.shape[1] else cv2.INTER_LINEAR
    out = np.empty((len(crops), size, size, 3), dtype=np.uint8)
    for i, crop in enumerate(crops):
        out[i] = cv2.resize(crop, (size, size), interpolation=interp)
    return out
