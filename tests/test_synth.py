"""The synthetic FF++-style benchmark: layout, splits, face realism, determinism, and fakes that are
neither trivially separable nor no-ops."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import cv2
import mediapipe as mp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flowood_ray.media.ffpp_layout import mask_path
from flowood_ray.media.heads import render_real
from flowood_ray.media.landmarks import BROWS, EYES, LIPS, FaceMesher
from flowood_ray.media.manipulations import METHODS
from flowood_ray.media.mesh_geometry import hull_mask, piecewise_affine, triangulate
from flowood_ray.media.synth import WORK_DIR, generate_benchmark
from flowood_ray.media.synth_plan import SynthConfig, Video, plan_benchmark

# The smallest benchmark the split rules allow (6 identities); 16 frames at 192 px keeps it fast.
TINY = SynthConfig(identities=6, videos_per_identity=1, frames=16, size=192, workers=2, seed=0)
QUALITIES = ("c23", "c40")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate_benchmark(out, TINY)


def read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def real_path(out: Path, quality: str, vid: str) -> Path:
    return out / "original_sequences" / "youtube" / quality / "videos" / f"{vid}.mp4"


def fake_path(out: Path, method: str, quality: str, name: str) -> Path:
    return out / "manipulated_sequences" / method / quality / "videos" / f"{name}.mp4"


def split_pairs(out: Path) -> dict[str, list[list[str]]]:
    return {split: json.loads((out / "splits" / f"{split}.json").read_text()) for split in ("train", "val", "test")}


def all_fakes(out: Path) -> list[tuple[str, str, str]]:
    """(method, target, source) for both directions of every split pair, as an FF++ loader builds them."""
    return [(method, t, s) for pairs in split_pairs(out).values() for a, b in pairs
            for t, s in ((a, b), (b, a)) for method in METHODS]


def test_layout_and_splits_by_identity(bench: tuple[Path, dict]) -> None:
    out, summary = bench
    meta = json.loads((out / "synth_meta.json").read_text())
    videos = meta["videos"]
    assert sorted(videos) == [f"{i:03d}" for i in range(6)]
    assert summary["reals"] == 6 and summary["fakes"] == 24 and summary["files"] == 60
    assert meta["config"] == TINY.model_dump(mode="json")
    assert not (out / WORK_DIR).exists()

    pairs = split_pairs(out)
    identities = {split: {videos[v]["identity"] for p in ps for v in p} for split, ps in pairs.items()}
    assert not identities["train"] & identities["val"] and not identities["train"] & identities["test"]
    assert not identities["val"] & identities["test"]
    assert len(identities["val"]) >= 2 and len(identities["test"]) >= 2
    for split, ps in pairs.items():
        for a, b in ps:
            assert videos[a]["split"] == videos[b]["split"] == split
            assert videos[a]["identity"] != videos[b]["identity"]
    assert sorted(v for ps in pairs.values() for p in ps for v in p) == sorted(videos)

    fakes = all_fakes(out)
    for method in METHODS:  # every real video is the target exactly once per method
        assert Counter(t for m, t, _ in fakes if m == method) == Counter(list(videos))
    for quality in QUALITIES:
        assert sorted(p.stem for p in real_path(out, quality, "x").parent.glob("*.mp4")) == sorted(videos)
        for method in METHODS:
            on_disk = sorted(p.stem for p in fake_path(out, method, quality, "x").parent.glob("*.mp4"))
            assert on_disk == sorted(f"{t}_{s}" for m, t, s in fakes if m == method)


def test_ff_loader_reads_the_benchmark(bench: tuple[Path, dict]) -> None:
    from flowood_ray.media.datasets import load_faceforensics

    out, _ = bench
    table = load_faceforensics(out, qualities=QUALITIES)
    assert table.num_rows == 60
    assert Counter(table.column("label").to_pylist()) == {0: 12, 1: 48}
    assert None not in table.column("split").to_pylist()


def test_odd_splits_and_impossible_configs() -> None:
    for identities, per_identity in ((7, 1), (7, 3), (9, 1)):
        plan = plan_benchmark(SynthConfig(identities=identities, videos_per_identity=per_identity))
        identity = {v.vid: v.identity for v in plan.videos}
        in_pairs = [v for pairs in plan.pairs.values() for p in pairs for v in p]
        assert set(in_pairs) == set(identity)
        assert all(identity[a] != identity[b] for pairs in plan.pairs.values() for a, b in pairs)
        targets = Counter(job.target for job in plan.fakes() if job.method == "FaceSwap")
        assert set(targets) == set(identity) and set(targets.values()) <= {1, 2}  # 2 only inside the triple
    with pytest.raises(ValueError, match="identities must be >= 6"):
        SynthConfig(identities=5)
    with pytest.raises(ValueError, match="qualities"):
        SynthConfig(qualities=("c30",))
    with pytest.raises(ValueError, match="even"):
        SynthConfig(size=255)


def test_mediapipe_finds_faces_in_reals_and_fakes(bench: tuple[Path, dict]) -> None:
    out, _ = bench
    vids = [f"{i:03d}" for i in range(6)]
    groups = {"real": [real_path(out, q, v) for q in QUALITIES for v in vids]}
    for method, target, source in all_fakes(out):
        groups.setdefault(method, []).extend(fake_path(out, method, q, f"{target}_{source}") for q in QUALITIES)
    detector = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False)
    with detector, mesh:
        for group, paths in groups.items():
            frames = [f for p in paths for f in read_video(p)[::3]]
            detected = np.mean([bool(detector.process(f).detections) for f in frames])
            meshed = np.mean([bool(mesh.process(f).multi_face_landmarks) for f in frames])
            assert detected >= 0.9, f"{group}: face detected in {detected:.0%} of frames"
            assert meshed >= 0.9, f"{group}: face mesh found in {meshed:.0%} of frames"


def test_same_seed_same_bytes_at_any_worker_count(bench: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = bench
    again = tmp_path / "again"
    generate_benchmark(again, TINY.model_copy(update={"workers": 1}))
    files = sorted(p.relative_to(out) for p in out.rglob("*.mp4"))
    assert len(files) == 60 + 24  # videos at two qualities and one mask video per fake
    assert sorted(p.relative_to(again) for p in again.rglob("*.mp4")) == files
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    for split in ("train", "val", "test"):
        assert (out / "splits" / f"{split}.json").read_text() == (again / "splits" / f"{split}.json").read_text()

    video = Video("000", 0, "train")
    assert np.array_equal(render_real(TINY, video), render_real(TINY, video))
    other = render_real(TINY.model_copy(update={"seed": 1}), video)
    assert np.abs(other.astype(int) - render_real(TINY, video)).mean() > 10


def test_trivial_statistics_do_not_separate_real_from_fake(bench: tuple[Path, dict]) -> None:
    out, _ = bench
    for quality in QUALITIES:
        paths = [real_path(out, quality, f"{i:03d}") for i in range(6)]
        labels = [0] * len(paths)
        for method, target, source in all_fakes(out):
            paths.append(fake_path(out, method, quality, f"{target}_{source}"))
            labels.append(1)
        stats = []
        for path in paths:
            grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in read_video(path)]
            sharpness = np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in grey])
            stats.append((np.mean(grey), path.stat().st_size, sharpness))
        for name, column in zip(("brightness", "file size", "laplacian variance"), np.array(stats).T):
            auroc = roc_auc_score(labels, column)
            assert 0.25 <= auroc <= 0.75, f"{quality} {name} separates real from fake: AUROC {auroc:.2f}"


def _band(image: np.ndarray) -> np.ndarray:
    """Band-pass: facial features and texture, without the low-frequency tone Poisson blending adapts."""
    image = image.astype(np.float32)
    return cv2.GaussianBlur(image, (0, 0), 1.5) - cv2.GaussianBlur(image, (0, 0), 6)


def test_each_method_changes_the_face_the_way_its_family_does(bench: tuple[Path, dict]) -> None:
    """Every fake differs from its target inside the face and not around it; FaceSwap and Deepfakes
    carry the source's facial features, Face2Face and NeuralTextures keep the target's."""
    out, _ = bench
    frames_used = (2, 9, 14)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def real(vid: str) -> tuple[np.ndarray, np.ndarray]:
        if vid not in cache:
            frames = read_video(real_path(out, "c23", vid))[list(frames_used)]
            with FaceMesher() as mesher:
                cache[vid] = (frames, mesher.mesh_frames(frames)[0])
        return cache[vid]

    for method, target, source in all_fakes(out):
        fake = read_video(fake_path(out, method, "c23", f"{target}_{source}"))[list(frames_used)]
        (target_frames, target_pts), (source_frames, source_pts) = real(target), real(source)
        inside, outside, to_target, to_source = [], [], [], []
        for k in range(len(frames_used)):
            shape = fake.shape[1:3]
            face = np.zeros(shape, np.uint8)
            cv2.fillConvexPoly(face, cv2.convexHull(np.round(target_pts[k]).astype(np.int32)), 1)
            far = cv2.dilate(face, np.ones((25, 25), np.uint8)) == 0
            if method == "NeuralTextures":  # it re-renders the mouth only
                face[:] = 0
                cv2.fillConvexPoly(face, cv2.convexHull(np.round(target_pts[k][LIPS]).astype(np.int32)), 1)
            diff = np.abs(fake[k].astype(np.float32) - target_frames[k]).mean(axis=2)
            inside.append(diff[face > 0].mean())
            outside.append(diff[far].mean())
            # Compare features at the target's geometry: the source face is warped onto it first.
            source_warped, covered = piecewise_affine(source_frames[k], source_pts[k], target_pts[k],
                                                      triangulate(target_pts[k]), shape)
            features = np.zeros(shape, np.uint8)
            cv2.fillConvexPoly(features, cv2.convexHull(np.round(target_pts[k][np.r_[LIPS, EYES, BROWS]])
                                                        .astype(np.int32)), 1)
            region = (features > 0) & (covered > 0)
            fake_band = _band(fake[k])
            to_target.append(np.abs(fake_band - _band(target_frames[k]))[region].mean())
            to_source.append(np.abs(fake_band - _band(source_warped))[region].mean())
        assert np.mean(inside) > 1.5 and np.mean(inside) > 2 * np.mean(outside), \
            f"{method} {target}_{source}: face diff {np.mean(inside):.2f}, background diff {np.mean(outside):.2f}"
        carries_source = np.mean(to_source) < np.mean(to_target)
        assert carries_source == (method in ("FaceSwap", "Deepfakes")), \
            f"{method} {target}_{source}: feature distance to target {np.mean(to_target):.2f}, " \
            f"to source {np.mean(to_source):.2f}"


def test_every_fake_has_a_mask_inside_the_face_where_it_changed(bench: tuple[Path, dict]) -> None:
    """Catches masks that are empty, misplaced (not on the target's face), of the wrong length, or that
    do not cover what the manipulation changed."""
    out, _ = bench
    for method, target, source in all_fakes(out):
        name = f"{target}_{source}"
        masks = read_video(mask_path(out, method, name))[..., 0]
        fake = read_video(fake_path(out, method, "c23", name))
        reals = read_video(real_path(out, "c23", target))
        assert masks.shape == fake.shape[:3], f"{method} {name}: {masks.shape} masks for {fake.shape} frames"
        binary = masks >= 128
        assert binary.reshape(len(binary), -1).any(axis=1).all(), f"{method} {name}: a frame without mask"
        with FaceMesher() as mesher:
            points, found = mesher.mesh_frames(reals[::5])
        for k, pts in zip(np.flatnonzero(found), points[found]):
            face = cv2.dilate(hull_mask(pts, binary.shape[1:]), np.ones((9, 9), np.uint8)) > 0
            inside = (binary[5 * k] & face).sum() / binary[5 * k].sum()
            assert inside > 0.97, f"{method} {name} frame {5 * k}: {inside:.1%} of the mask on the face"
        diff = np.abs(fake.astype(np.float32) - reals).mean(axis=3)
        untouched = cv2.dilate(binary.any(axis=0).astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
        assert diff[:, untouched].mean() < 0.5 * diff[binary].mean(), f"{method} {name}: changes outside the mask"
