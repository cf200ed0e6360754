"""Face crops of request media without Ray: a clip's limits judged from its probe, and images without a face."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import face_frames, write_video
from flowood_ray.cluster.serve_faces import FaceCropper
from flowood_ray.cluster.serve_schemas import ApiError
from flowood_ray.cluster.serve_settings import ServeSettings
from flowood_ray.media.faces import CropConfig

CROP = CropConfig(size=32)
WIDTH, HEIGHT, FRAMES = 320, 240, 25  # one second at 25 fps


def cropper(**limits: Any) -> FaceCropper:
    return FaceCropper(ServeSettings(models=["models:/flowood-glow@champion"], token=None, frames_per_video=4,
                                     preprocess_threads=1, **limits))


def refusal(cropper: FaceCropper, path: Path) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        cropper.video_crops(path, CROP)
    return caught.value.status, caught.value.code


def test_clip_limits_are_judged_from_the_probe(tmp_path: Path) -> None:
    # Catches a limit compared with >= (a clip exactly at a limit is refused), the frame size checked per
    # side rather than in pixels, and a limit not checked at all.
    clip = write_video(tmp_path / "clip.mp4", face_frames(FRAMES, width=WIDTH, height=HEIGHT))
    assert refusal(cropper(max_image_pixels=WIDTH * HEIGHT - 1), clip) == (413, "image_too_large")
    assert refusal(cropper(max_video_frames=FRAMES - 1), clip) == (422, "video_too_long")
    assert refusal(cropper(max_video_seconds=0.5), clip) == (422, "video_too_long")
    info, crops, rows = cropper(max_image_pixels=WIDTH * HEIGHT, max_video_frames=FRAMES).video_crops(clip, CROP)
    assert (info.width, info.height, info.frame_count) == (WIDTH, HEIGHT, FRAMES)
    assert crops.shape[1:] == (32, 32, 3) and 0 < len(crops) == len(rows) <= 4
    assert [index for index, _, _ in rows] == sorted({index for index, _, _ in rows})


def two_faces() -> bytes:
    """A smaller face (280x210 photo) on the left, a larger one (320x240) on the right, as a PNG."""
    canvas = np.zeros((HEIGHT, 600, 3), np.uint8)
    canvas[15:225, :280] = face_frames(1, width=280, height=210, seed=5)[0]
    canvas[:, 280:] = face_frames(1, width=WIDTH, height=HEIGHT)[0]
    return cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_an_image_without_a_face_is_a_422_and_max_faces_keeps_the_largest() -> None:
    # Catches an empty crop stack reaching the scorer, max_faces ignored, and the wrong faces kept.
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8), (31, 31), 10)
    with pytest.raises(ApiError) as caught:
        cropper().image_crops(cv2.imencode(".png", noise)[1].tobytes(), "image/png", CROP)
    assert (caught.value.status, caught.value.code) == (422, "no_face")
    rgb, crops, faces = cropper().image_crops(two_faces(), "image/png", CROP)
    assert rgb.shape == (HEIGHT, 600, 3) and crops.shape == (2, 32, 32, 3)
    assert faces[0].box[0] >= 280 > faces[1].box[2]  # largest first: the right-hand face
    _, crops, faces = cropper(max_faces=1).image_crops(two_faces(), "image/png", CROP)
    assert crops.shape == (1, 32, 32, 3) and faces[0].box[0] >= 280
