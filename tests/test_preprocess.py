"""End to end: manifest -> Ray Data cropping -> committed shards, with bad input and a killed run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from conftest import face_frames, kill_after_commits, write_video
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.manifest import manifest_table, video_id_for
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import crop_dataset, read_videos

pytestmark = pytest.mark.e2e


def _manifest(root: Path, names: list[str]):
    rows = [
        {"video_id": video_id_for(root / n, root), "path": str(root / n), "label": 0, "method": "real", "source": "test"}
        for n in names
    ]
    return manifest_table(rows)


def test_bad_inputs_get_status_rows_and_the_job_finishes(mixed_archive, tmp_path: Path) -> None:
    from flowood_ray.cluster.preprocess import run_preprocess

    root, expected = mixed_archive
    names = sorted(expected) + ["real/missing.mp4"]
    expected = {**expected, "real/missing.mp4": "decode_error"}
    manifest = _manifest(root, names)
    videos = run_preprocess(
        manifest, tmp_path / "out", SamplingConfig(num_frames=8), CropConfig(size=64), workers=2, videos_per_shard=3
    )
    assert sorted(videos.column("video_id").to_pylist()) == sorted(manifest.column("video_id").to_pylist())
    by_path = {Path(r["path"]).relative_to(root).as_posix(): r for r in videos.to_pylist()}
    for name, status in expected.items():
        assert by_path[name]["status"] == status, (name, by_path[name]["reason"])
        if status != "ok":
            assert by_path[name]["reason"], name
    assert "frames" in by_path["real/midway.avi"]["reason"]
    assert by_path["real/midway.avi"]["faces"] > 0  # crops before the failure are kept
    crops = crop_dataset(tmp_path / "out").to_table(columns=["video_id", "frame_index"])
    for name in ("real/clip0.mp4", "real/still.jpg", "real/still.webp"):
        vid = by_path[name]["video_id"]
        assert pc.sum(pc.equal(crops.column("video_id"), vid)).as_py() == by_path[name]["faces"] > 0
    # A rerun finds everything done and changes nothing.
    again = run_preprocess(
        manifest, tmp_path / "out", SamplingConfig(num_frames=8), CropConfig(size=64), workers=2, videos_per_shard=3
    )
    assert again.num_rows == videos.num_rows
    with pytest.raises(ValueError, match="another configuration"):
        run_preprocess(manifest, tmp_path / "out", SamplingConfig(num_frames=8), CropConfig(size=96), workers=1)


def test_killed_run_resumes_with_every_video_exactly_once(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    for i in range(12):
        write_video(archive / "real" / f"v{i:02d}.mp4", face_frames(60, seed=i))
    out = tmp_path / "crops"
    cmd = [
        sys.executable, "-m", "flowood_ray.cli", "preprocess", str(archive), "--out", str(out), "--kind", "folder",
        "--sampling", "all", "--size", "64", "--workers", "2", "--videos-per-shard", "1",
    ]
    committed = kill_after_commits(cmd, out / "videos", 2)
    assert 2 <= committed < 12, committed
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    videos = read_videos(out)
    ids = videos.column("video_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert set(videos.column("status").to_pylist()) == {"ok"}
    crops = crop_dataset(out).to_table(columns=["video_id", "frame_index"]).to_pylist()
    keys = [(c["video_id"], c["frame_index"]) for c in crops]
    assert len(keys) == len(set(keys)) == 12 * 60
    assert not list((out / "_tmp").iterdir())
