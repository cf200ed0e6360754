"""What preprocessing stores beside each crop: the fake's manipulation mask, aligned like the crop, and
optionally the face-mesh landmarks the self-blends need."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from conftest import face_frames, write_video
from flowood_ray.media.facecrop import VideoCropper, crops_to_array, masks_to_array, meshes_to_array
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.ffpp_layout import MASK_CRF, encode_video
from flowood_ray.media.landmarks import LEFT_EYE, RIGHT_EYE
from flowood_ray.media.manifest import manifest_table, video_id_for
from flowood_ray.media.sampling import SamplingConfig


def _crop(tmp_path: Path, crop: CropConfig, sampling: SamplingConfig, mask: Path | None = None) -> pa.Table:
    path = write_video(tmp_path / "v.mp4", face_frames(24))
    row = manifest_table([{"video_id": video_id_for(path, tmp_path), "path": str(path), "source": "test",
                           "mask_path": None if mask is None else str(mask)}]).to_pylist()[0]
    cropper = VideoCropper(sampling, crop)
    sunk: list[pa.Table] = []
    result = cropper.process(row, sunk.append)
    cropper.close()
    assert result["status"] == "ok"
    return pa.concat_tables(sunk)


def test_mask_is_cropped_with_the_frame_alignment_and_index(tmp_path: Path) -> None:
    """The mask video here is the footage's own grey image, so its aligned crop must equal the grey of
    the face crop: a different warp, a transposed mask or a mask frame from another index all fail."""
    grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in face_frames(24)])
    mask = tmp_path / "mask.mp4"
    encode_video(grey, mask, MASK_CRF, 25)
    table = _crop(tmp_path, CropConfig(size=64), SamplingConfig(mode="stride", stride=3), mask)
    crops, masks = crops_to_array(table, 64), masks_to_array(table, 64)
    expected = np.stack([cv2.cvtColor(c, cv2.COLOR_RGB2GRAY) for c in crops]).astype(np.float32)
    inner = (slice(6, 58), slice(6, 58))  # the mask's border is black where the crop reflects the frame
    error = np.abs(masks.astype(np.float32) - expected)[:, inner[0], inner[1]].mean()
    shifted = np.abs(masks[1:].astype(np.float32) - expected[:-1])[:, inner[0], inner[1]].mean()
    assert error < 4.0 and shifted > 2 * error, (error, shifted)


def test_reals_and_broken_masks_get_no_mask(tmp_path: Path) -> None:
    table = _crop(tmp_path, CropConfig(size=64), SamplingConfig(num_frames=4))
    assert table.column("mask").null_count == table.num_rows
    assert not masks_to_array(table, 64).any()
    (tmp_path / "bad.mp4").write_text("not a video")
    broken = _crop(tmp_path, CropConfig(size=64), SamplingConfig(num_frames=4), tmp_path / "bad.mp4")
    assert broken.num_rows == 4 and broken.column("mask").null_count == 4


def test_face_mesh_landmarks_land_on_the_crop_eyes(tmp_path: Path) -> None:
    """The template puts the eye centres at fixed crop positions, so the stored mesh must put its eye
    rings there (catches x/y swapped, frame instead of crop coordinates, a missing mesh)."""
    table = _crop(tmp_path, CropConfig(size=96, face_mesh=True), SamplingConfig(num_frames=6))
    meshes = meshes_to_array(table)
    assert not np.isnan(meshes).any()
    keypoints = np.asarray(table.column("keypoints").to_pylist(), np.float32).reshape(-1, 6, 2)
    for mesh, kps in zip(meshes, keypoints):
        assert np.linalg.norm(mesh[RIGHT_EYE].mean(0) - kps[0]) < 7.0  # 7% of the crop; x/y swapped is 14 px off here
        assert np.linalg.norm(mesh[LEFT_EYE].mean(0) - kps[1]) < 7.0
    assert _crop(tmp_path, CropConfig(size=96), SamplingConfig(num_frames=2)).column("mesh").null_count == 2


def test_a_crop_without_a_mesh_reads_back_from_parquet(tmp_path: Path) -> None:
    """A null mesh beside a real one survives a Parquet round trip (a fixed-size list column did not)."""
    import pyarrow.parquet as pq

    from flowood_ray.media.facecrop import CROP_SCHEMA

    mesh = np.arange(936, dtype=np.float32)
    rows = {name: [None, None] for name in CROP_SCHEMA.names}
    rows.update(video_id=["a", "a"], frame_index=[0, 1], crop=[b"\0" * 12] * 2, mesh=[mesh.tobytes(), None],
                box=[[0.0] * 4] * 2, keypoints=[[0.0] * 12] * 2)
    pq.write_table(pa.table(rows, schema=CROP_SCHEMA), tmp_path / "crops.parquet")
    meshes = meshes_to_array(pq.read_table(tmp_path / "crops.parquet"))
    np.testing.assert_array_equal(meshes[0], mesh.reshape(468, 2))
    assert np.isnan(meshes[1]).all()
