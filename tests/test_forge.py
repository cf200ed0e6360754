"""`flowood forge`: real footage in, FF++ layout with masks and splits by person out; broken inputs get
rows, a killed run resumes without writing anything twice, and the same seed gives the same bytes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from flowood_ray.media.datasets import load_faceforensics
from flowood_ray.media.ffpp_layout import encode_video
from flowood_ray.media.forge import SUMMARY_FILE, ForgeConfig, Footage, assign_splits, forge_archive, pair_with_other_people
from flowood_ray.media.heads import render_real
from flowood_ray.media.landmarks import FaceMesher
from flowood_ray.media.manipulations import METHODS
from flowood_ray.media.mesh_geometry import hull_mask
from flowood_ray.media.synth_plan import SynthConfig, Video

# Drawn talking heads stand in for a user's real archive: 7 people, one of them with two clips.
HEADS = SynthConfig(identities=7, videos_per_identity=1, frames=16, size=192, seed=3)
CONFIG = ForgeConfig(clip_seconds=0.5, workers=2, seed=1)  # 13 of the 16 frames at 25 fps


def build_real_archive(root: Path) -> Path:
    people = [("alice/a.mp4", "alice"), ("alice/b.mp4", "alice")]
    people += [(f"p{i}/clip.mp4", f"person{i}") for i in range(1, 7)]
    for k, (rel, _) in enumerate(people):
        identity = 0 if rel.startswith("alice") else int(rel[1])
        frames = render_real(HEADS, Video(f"{k:03d}", identity, "train"))
        encode_video(frames, root / rel, 23, 25)
    (root / "broken").mkdir()
    (root / "broken/notes.mp4").write_text("not a video\n" * 50)
    noise = np.random.default_rng(0).integers(0, 255, (16, 96, 96, 3), dtype=np.uint8)
    encode_video(np.stack([cv2.GaussianBlur(f, (0, 0), 3) for f in noise]), root / "broken/noface.mp4", 23, 25)
    cv2.imwrite(str(root / "broken/still.jpg"), np.zeros((64, 64, 3), np.uint8))
    with open(root.parent / "people.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "person"])
        writer.writerows(people)
    return root.parent / "people.csv"


def read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / SUMMARY_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def forged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:
    base = tmp_path_factory.mktemp("forge")
    archive = base / "archive"
    people = build_real_archive(archive)
    out = base / "out"
    return archive, people, out, forge_archive(archive, out, CONFIG, people)


def test_loader_reads_forgery_with_labels_methods_person_splits_and_masks(forged) -> None:
    """Catches fakes the FF++ loader cannot name or split, donors of the same person, people in two
    splits, and fakes without their mask video."""
    archive, _, out, summary = forged
    assert summary["originals"] == 8 and summary["fakes"] == 8 * len(METHODS)
    table = load_faceforensics(out, qualities=("c23",)).to_pylist()
    reals = [r for r in table if r["label"] == 0]
    fakes = [r for r in table if r["label"] == 1]
    assert len(reals) == 8 and len(fakes) == 32
    assert {r["method"] for r in fakes} == set(METHODS)
    assert all(r["split"] in ("train", "val", "test") for r in table)
    rows = {r["id"]: r for r in read_summary(out) if r["kind"] == "real" and r["status"] == "ok"}
    person_split = {}
    for row in rows.values():
        assert person_split.setdefault(row["person"], row["split"]) == row["split"]
    assert len(set(person_split.values())) == 3
    split_of_id = {Path(r["path"]).stem: r["split"] for r in reals}
    for fake in fakes:
        target, source = Path(fake["path"]).stem.split("_")
        assert rows[target]["person"] != rows[source]["person"]
        assert fake["split"] == split_of_id[target] == split_of_id[source]
        assert fake["mask_path"] and Path(fake["mask_path"]).is_file()
    assert all(r["mask_path"] is None for r in reals)


def test_masks_lie_on_the_target_face_and_cover_what_changed(forged) -> None:
    """Catches empty masks, masks on the wrong person or frame, and manipulations that leak outside
    their mask."""
    _, _, out, _ = forged
    fakes = [r for r in load_faceforensics(out, qualities=("c23",)).to_pylist() if r["label"] == 1]
    with FaceMesher() as mesher:
        for fake in fakes[::3]:
            target = Path(fake["path"]).stem.split("_")[0]
            real = read_video(out / "original_sequences/youtube/c23/videos" / f"{target}.mp4")
            frames, masks = read_video(Path(fake["path"])), read_video(Path(fake["mask_path"]))[..., 0] >= 128
            assert frames.shape == real.shape and masks.shape == real.shape[:3]
            assert masks.reshape(len(masks), -1).any(axis=1).all(), f"{fake['path']}: a frame without mask"
            points, found = mesher.mesh_frames(real[::4])
            for k in np.flatnonzero(found):
                face = cv2.dilate(hull_mask(points[k], masks.shape[1:]), np.ones((9, 9), np.uint8)) > 0
                assert (masks[4 * k] & face).sum() > 0.97 * masks[4 * k].sum()
            diff = np.abs(frames.astype(np.float32) - real).mean(axis=3)
            far = cv2.dilate(masks.any(axis=0).astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
            assert diff[:, far].mean() < 0.5 * diff[masks].mean()


def test_broken_inputs_get_rows_and_the_job_finishes(forged) -> None:
    _, _, out, summary = forged
    rows = {r["path"].split("archive/")[-1]: r for r in read_summary(out) if r["kind"] == "real"}
    assert rows["broken/notes.mp4"]["status"] == "decode_error" and rows["broken/notes.mp4"]["reason"]
    assert rows["broken/noface.mp4"]["status"] == "no_face" and "face mesh in 0%" in rows["broken/noface.mp4"]["reason"]
    assert rows["broken/still.jpg"]["status"] == "unsupported"
    assert summary["skipped"] == {"real:decode_error": 1, "real:no_face": 1, "real:unsupported": 1}


def test_a_killed_run_resumes_without_rewriting_and_gives_the_same_bytes(forged, tmp_path: Path) -> None:
    """Catches a rerun that redoes finished videos, one that leaves a half-written file, and any
    dependence of the output on scheduling (the uninterrupted run is the reference)."""
    archive, people, reference, _ = forged
    out = tmp_path / "out"
    script = ("import sys; from pathlib import Path; from flowood_ray.media.forge import ForgeConfig, forge_archive; "
              f"forge_archive(Path(sys.argv[1]), Path(sys.argv[2]), ForgeConfig.model_validate_json({CONFIG.model_dump_json()!r}), "
              "Path(sys.argv[3]))")
    job = subprocess.Popen([sys.executable, "-c", script, str(archive), str(out), str(people)],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((out / "manipulated_sequences").glob("*/c23/videos/*.mp4")) and time.monotonic() < deadline:
        assert job.poll() is None, "forge ended before any fake was written"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.mp4")}
    assert 0 < len([p for p in before if "manipulated_sequences" in str(p)]) < 64
    forge_archive(archive, out, CONFIG, people)
    for path, stamp in before.items():
        if not path.name.startswith("."):
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{path} was written twice"
    produced = sorted(p.relative_to(out) for p in out.rglob("*.mp4"))
    assert produced == sorted(p.relative_to(reference) for p in reference.rglob("*.mp4"))
    assert not list(out.rglob(".*.tmp*"))
    for rel in produced:
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert {r["id"] for r in read_summary(out) if r.get("resumed") == "True"}


def test_splits_need_people_and_donors_come_from_other_people() -> None:
    with pytest.raises(ValueError, match="at least 6 people"):
        assign_splits(["a", "b", "c", "d", "e"], seed=0)
    splits = assign_splits([f"p{i}" for i in range(10)], seed=0)
    assert sorted(splits.values()).count("val") == 2 and sorted(splits.values()).count("test") == 2
    videos = [Footage(f"{i:02x}", f"{i}.mp4", "many" if i < 5 else f"solo{i}") for i in range(8)]
    pairs = pair_with_other_people(videos, seed=0)
    assert len(pairs) == 8 and all(t.person != s.person for t, s in pairs)
    assert pair_with_other_people([v for v in videos if v.person == "many"], seed=0) == []
    with pytest.raises(ValueError, match="crf"):
        ForgeConfig(crf=30)
    with pytest.raises(ValueError, match="methods"):
        ForgeConfig(methods=("FaceSwap", "Morph"))
