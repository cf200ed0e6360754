from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import face_frames, write_video
from flowood_ray.media.align import align_face, template, umeyama_similarity
from flowood_ray.media.decode import DecodeOutcome, iter_frames, probe
from flowood_ray.media.facecrop import VideoCropper, crops_to_array
from flowood_ray.media.faces import CropConfig, FaceTracker
from flowood_ray.media.manifest import manifest_table, video_id_for
from flowood_ray.media.sampling import SamplingConfig, sample_indices


def test_sample_indices_modes() -> None:
    assert sample_indices(100, SamplingConfig(num_frames=4)) == [12, 37, 62, 87]
    assert sample_indices(3, SamplingConfig(num_frames=32)) == [0, 1, 2]
    assert sample_indices(10, SamplingConfig(mode="stride", stride=3)) == [0, 3, 6, 9]
    assert sample_indices(10, SamplingConfig(mode="all", max_frames=4)) == [0, 1, 2, 3]
    assert sample_indices(0, SamplingConfig()) == []
    with pytest.raises(ValueError):
        SamplingConfig(mode="uniform", stride=2)
    with pytest.raises(ValueError):
        SamplingConfig(mode="uniform", segments=2)
    assert SamplingConfig().bounded and SamplingConfig(mode="segments").bounded
    assert SamplingConfig(mode="all", max_frames=4).bounded and not SamplingConfig(mode="stride", stride=2).bounded


def test_segment_runs_are_spread_and_start_at_keyframes() -> None:
    runs = SamplingConfig(mode="segments", num_frames=32, segments=4)
    # 1,500 frames in four parts of 375: runs of 8 centred at 187.5, 562.5, 937.5 and 1312.5.
    assert sample_indices(1500, runs) == [*range(183, 191), *range(558, 566), *range(933, 941), *range(1308, 1316)]
    # A keyframe every 250 frames: each run moves back to the last keyframe at or before its start.
    every_250 = list(range(0, 1500, 250))
    assert sample_indices(1500, runs, every_250) == [*range(0, 8), *range(500, 508), *range(750, 758),
                                                     *range(1250, 1258)]
    # One keyframe (a 10 s clip with x264's default GOP): the runs, all moved to it, are laid end to end.
    assert sample_indices(250, runs, [0]) == list(range(32))
    # Fewer frames than asked: all of them.
    assert sample_indices(20, runs, [0, 10]) == list(range(20))
    # 10 frames in 3 runs: lengths 4, 3, 3.
    assert sample_indices(90, SamplingConfig(mode="segments", num_frames=10, segments=3)) == [
        *range(13, 17), *range(43, 46), *range(73, 76)]


def test_segment_runs_keep_their_count_for_any_keyframe_layout() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        frames, wanted, parts = int(rng.integers(1, 400)), int(rng.integers(1, 64)), int(rng.integers(1, 10))
        keyframes = sorted(set(rng.integers(0, frames, int(rng.integers(1, 12))).tolist()))
        indices = sample_indices(frames, SamplingConfig(mode="segments", num_frames=wanted, segments=parts), keyframes)
        assert len(indices) == min(wanted, frames) and indices == sorted(set(indices))
        assert 0 <= indices[0] and indices[-1] < frames


def test_umeyama_recovers_a_similarity_exactly() -> None:
    src = template(112, 0.0)
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    matrix = umeyama_similarity(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)
    with pytest.raises(ValueError):
        umeyama_similarity(np.zeros((4, 2)), dst)


def test_probe_and_decode_selected_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", face_frames(20))
    info = probe(path)
    assert (info.kind, info.frame_count, info.width, info.height, info.codec) == ("video", 20, 320, 240, "h264")
    assert info.fps == pytest.approx(25.0) and info.duration_s == pytest.approx(0.8, abs=0.05)
    outcome = DecodeOutcome()
    frames = list(iter_frames(path, info, [2, 5, 19], outcome))
    assert [i for i, _, _ in frames] == [2, 5, 19]
    assert frames[1][1] == pytest.approx(5 / 25)
    assert frames[0][2].shape == (240, 320, 3) and outcome.error is None


def test_aligned_crop_puts_landmarks_on_the_template() -> None:
    tracker = FaceTracker(CropConfig(size=128, detect_every=1))
    frame = face_frames(1)[0]
    face = tracker.update(0, frame)
    assert face is not None and face.detected and face.score > 0.8
    crop, matrix = align_face(frame, face.keypoints, 128, 0.3)
    mapped = face.keypoints[:4] @ matrix[:, :2].T + matrix[:, 2]
    # Four detector points cannot all land exactly on the template; a few px is a good fit.
    assert np.abs(mapped - template(128, 0.3)).max() < 6
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    tracker.close()


def test_tracking_follows_the_face_between_detections() -> None:
    frames = face_frames(12)
    every = FaceTracker(CropConfig(detect_every=1, smoothing=1.0))
    tracked = FaceTracker(CropConfig(detect_every=5, smoothing=1.0))
    sources = []
    for i, frame in enumerate(frames):
        truth, guess = every.update(i, frame), tracked.update(i, frame)
        sources.append(guess.detected)
        eye_distance = np.linalg.norm(truth.keypoints[0] - truth.keypoints[1])
        assert np.abs(guess.keypoints[:4] - truth.keypoints[:4]).max() < 0.15 * eye_distance
    assert sources == [True, False, False, False, False] * 2 + [True, False]
    every.close(), tracked.close()


def test_a_gap_in_the_frame_sequence_forces_a_detection() -> None:
    tracker = FaceTracker(CropConfig(detect_every=5))
    frames = face_frames(3)
    assert tracker.update(0, frames[0]).detected
    assert not tracker.update(1, frames[1]).detected
    assert tracker.update(5, frames[2]).detected
    tracker.close()


def test_video_cropper_streams_crops_and_reports(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", face_frames(30))
    row = manifest_table([{"video_id": video_id_for(path, tmp_path), "path": str(path), "source": "test"}]).to_pylist()[0]
    cropper = VideoCropper(SamplingConfig(mode="all"), CropConfig(size=64), flush_rows=8)
    sunk: list[pa.Table] = []
    result = cropper.process(row, sunk.append)
    cropper.close()
    assert [t.num_rows for t in sunk] == [8, 8, 8, 6]
    crops = pa.concat_tables(sunk)
    assert result["status"] == "ok" and result["faces"] == 30 and result["frames_decoded"] == 30
    assert crops.column("frame_index").to_pylist() == list(range(30))
    images = crops_to_array(crops, 64)
    assert images.shape == (30, 64, 64, 3) and images.std() > 10
