"""Faces of request media, detected and aligned exactly as the model's training crops were (the
CropConfig stored with the model): the largest faces of an image, the tracked main face of a clip's
sampled frames (`frames_per_video` uniformly, or a clip model's training sampling). A clip is probed and
refused over its limits before a frame is decoded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from flowood_ray.cluster.serve_inputs import decode_image
from flowood_ray.cluster.serve_schemas import ApiError
from flowood_ray.cluster.serve_settings import ServeSettings
from flowood_ray.media.align import align_face
from flowood_ray.media.decode import DecodeOutcome, MediaError, MediaInfo, iter_frames, probe
from flowood_ray.media.faces import CropConfig, Face, FaceTracker
from flowood_ray.media.facecrop import frames_to_sample
from flowood_ray.media.sampling import SamplingConfig


class FaceCropper:
    """Face crops of request media, for requests that run side by side in `preprocess_threads` threads."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._trackers: dict[str, queue.SimpleQueue[FaceTracker]] = {}
        self._trackers_lock = threading.Lock()

    def check_detectors(self) -> None:
        """Run every idle tracker's detector once: a MediaPipe graph that hit an internal error raises."""
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

    @contextmanager
    def tracker(self, crop: CropConfig) -> Iterator[FaceTracker]:
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

    def image_crops(self, data: bytes, declared: str | None, crop: CropConfig
                    ) -> tuple[np.ndarray, np.ndarray, list[Face]]:
        """The image's pixels and the crops of its largest faces (at most max_faces), largest first."""
        rgb = decode_image(data, declared, self.settings.max_image_pixels)
        with self.tracker(crop) as tracker:
            faces = tracker.detector.detect(rgb)
        faces = sorted(faces, key=lambda f: f.area, reverse=True)[: self.settings.max_faces]
        if not faces:
            raise ApiError(422, "no_face", f"no face found in the {rgb.shape[1]}x{rgb.shape[0]} image")
        crops = np.stack([align_face(rgb, face.keypoints, crop.size, crop.margin)[0] for face in faces])
        return rgb, crops, faces

    def video_crops(self, path: Path, crop: CropConfig, sampling: SamplingConfig | None = None
                    ) -> tuple[MediaInfo, np.ndarray, list[tuple[int, float, Face]]]:
        """The clip's header, and the main face's crop in each sampled frame where it was found or tracked;
        frames are sampled as `sampling` says (default: `frames_per_video` uniformly)."""
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
        indices = frames_to_sample(path, info, sampling or SamplingConfig(num_frames=settings.frames_per_video))
        outcome = DecodeOutcome()
        crops: list[np.ndarray] = []
        rows: list[tuple[int, float, Face]] = []
        with self.tracker(crop) as tracker:
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


def _media_error(exc: MediaError) -> ApiError:
    if exc.status == "unsupported":
        return ApiError(422, "unsupported_video", exc.reason)
    return ApiError(400, "invalid_video", exc.reason)

