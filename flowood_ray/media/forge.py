"""`flowood forge`: the four manipulation families applied to a user's own real footage.

Every usable video of the archive is re-encoded as an original and becomes the target of one fake
per method; its donor or driver is a video of another person in the same split. The output is the
FaceForensics++ layout with a mask video per fake and splits by person, so every loader, trainer and
scorer reads it like FF++.

Two phases, each parallel over videos: (1) decode the first `clip_seconds` of each video (short side
at most `max_side`), mesh every frame, write the original and its landmarks; (2) per target, make the
fakes. A file only appears under its final name once complete and the landmarks file is written last,
so a rerun skips everything finished and redoes only what a kill interrupted. A broken file, a still
image or a video without a usable face gets a summary row with its reason and is skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowood_ray.media.decode import DecodeOutcome, MediaError, iter_frames, probe
from flowood_ray.media.ffpp_layout import MASK_CRF, QUALITY_CRF, encode_video, fake_path, mask_path, real_path, write_splits
from flowood_ray.media.landmarks import FaceMesher, borrow_nearest
from flowood_ray.media.manifest import VIDEO_EXTENSIONS, video_id_for
from flowood_ray.media.manipulations import MANIPULATIONS, METHODS
from flowood_ray.media.workers import run_all, video_pool

logger = logging.getLogger(__name__)

SUMMARY_FILE = "forge_summary.csv"
META_FILE = "forge_meta.json"
_SALT_SPLIT, _SALT_PAIR, _SALT_FAKE = 23, 29, 31
MIN_PEOPLE = 6  # train, val and test each need two people so that every fake pairs two people


class ForgeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    methods: tuple[str, ...] = METHODS
    seed: int = Field(0, ge=0)
    clip_seconds: float = Field(4.0, gt=0.0, le=600.0, description="how much of each video is used")
    crf: int = Field(23, description="x264 CRF of originals and fakes alike: 0 (c0), 23 (c23) or 40 (c40)")
    max_side: int = Field(720, ge=64, description="the short side is scaled down to at most this (720p)")
    min_face_rate: float = Field(0.5, gt=0.0, le=1.0, description="fraction of frames with a face mesh")
    workers: int = Field(2, ge=1)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not set(value) <= set(METHODS) or len(set(value)) != len(value):
            raise ValueError(f"methods must be distinct names from {METHODS}, got {value!r}")
        return value

    @field_validator("crf")
    @classmethod
    def _crf_with_a_folder(cls, value: int) -> int:
        if value not in (0, 23, 40):
            raise ValueError(f"crf must be 0, 23 or 40 (the FF++ folders c0, c23, c40), got {value}")
        return value

    @property
    def quality(self) -> str:
        return next(q for q, crf in QUALITY_CRF.items() if crf == self.crf and q != "raw")


@dataclass(frozen=True)
class Footage:
    vid: str  # short stable id: the FF++ file stem, without "_"
    path: str
    person: str


def list_footage(archive: Path, people: Path | None) -> tuple[list[Footage], list[dict[str, Any]]]:
    """The archive's videos with their people, and summary rows for files forge cannot use."""
    archive = Path(archive).resolve()
    if not archive.is_dir():
        raise ValueError(f"{archive} is not a directory of real videos")
    files = sorted(p for p in archive.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
    by_path = _read_people(archive, people) if people else {}
    footage, skipped, unlisted = [], [], 0
    for path in files:
        rel = path.relative_to(archive).as_posix()
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            skipped.append({"kind": "real", "path": rel, "status": "unsupported", "reason": "not a video file"})
            continue
        if people and rel not in by_path:
            unlisted += 1
        footage.append(Footage(video_id_for(path, archive)[:12], str(path), by_path.get(rel, f"file:{rel}")))
    if unlisted:
        logger.warning("%d videos are not in %s; each counts as a person of its own", unlisted, people)
    if not people:
        logger.warning("no --people CSV: every video counts as its own person, so a donor may show the same "
                       "person under another file name")
    return footage, skipped


def _read_people(archive: Path, people: Path) -> dict[str, str]:
    with open(people, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "person"} <= set(reader.fieldnames):
            raise ValueError(f"{people} must be a CSV with columns path,person; got {reader.fieldnames}")
        rows = list(reader)
    mapping: dict[str, str] = {}
    for row in rows:
        rel = Path(row["path"])
        rel = rel.resolve().relative_to(archive) if rel.is_absolute() else rel
        mapping[rel.as_posix()] = row["person"]
    return mapping


def assign_splits(people: Sequence[str], seed: int) -> dict[str, str]:
    """person -> train/val/test, about 60/20/20 and at least two people in each of val and test."""
    unique = sorted(set(people))
    if len(unique) < MIN_PEOPLE:
        raise ValueError(f"forging needs videos of at least {MIN_PEOPLE} people with usable faces (two per "
                         f"split, so that donors and drivers are other people); got {len(unique)}")
    order = np.random.default_rng([seed, _SALT_SPLIT]).permutation(len(unique))
    n_held = max(2, round(0.2 * len(unique)))
    return {unique[i]: "val" if k < n_held else "test" if k < 2 * n_held else "train" for k, i in enumerate(order)}


def pair_with_other_people(videos: Sequence[Footage], seed: int) -> list[tuple[Footage, Footage]]:
    """Each video is a target once; its source is a video of another person, reused as evenly as possible.

    Real archives hold people with one clip and people with dozens, so FF++'s one-pair-per-video
    scheme would leave most of a prolific person's clips unpaired.
    """
    rank = {v.vid: r for r, v in zip(np.random.default_rng([seed, _SALT_PAIR]).permutation(len(videos)), videos)}
    uses: Counter[str] = Counter()
    pairs = []
    for target in sorted(videos, key=lambda v: rank[v.vid]):
        others = [v for v in videos if v.person != target.person]
        if others:
            source = min(others, key=lambda v: (uses[v.vid], rank[v.vid]))
            uses[source.vid] += 1
            pairs.append((target, source))
    return sorted(pairs, key=lambda p: p[0].vid)


def read_clip(path: Path, config: ForgeConfig) -> tuple[np.ndarray, float]:
    """(frames (N, H, W, 3) uint8, fps) of the clip forge uses; raises MediaError for unusable files."""
    info = probe(path)
    if info.kind != "video":
        raise MediaError("unsupported", "still image: forging needs video")
    fps = info.fps if info.fps > 0 else 25.0
    count = min(info.frame_count, max(1, int(np.ceil(config.clip_seconds * fps))))
    outcome = DecodeOutcome()
    frames = [rgb for _, _, rgb in iter_frames(path, info, range(count), outcome, threads=1)]
    if outcome.error or not frames:
        raise MediaError("decode_error", outcome.error or "no frame could be decoded")
    h, w = frames[0].shape[:2]
    scale = min(1.0, config.max_side / min(h, w))
    size = (2 * round(w * scale / 2), 2 * round(h * scale / 2))  # even sides for yuv420p
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, size, interpolation=interp) if (f.shape[1], f.shape[0]) != size else f
                     for f in frames]), fps


def _landmarks_path(out: Path, vid: str) -> Path:
    return out / "landmarks" / f"{vid}.npz"


def _prepare_real(out: Path, config: ForgeConfig, video: Footage) -> dict[str, Any]:
    start = time.perf_counter()
    cv2.setNumThreads(1)
    row: dict[str, Any] = {"kind": "real", "id": video.vid, "path": video.path, "person": video.person}
    landmarks = _landmarks_path(out, video.vid)
    if landmarks.exists():
        with np.load(landmarks) as saved:
            return row | {"status": "ok", "frames": len(saved["found"]), "face_rate": float(saved["found"].mean()),
                          "fps": float(saved["fps"]), "resumed": True, "seconds": time.perf_counter() - start}
    try:
        frames, fps = read_clip(Path(video.path), config)
    except MediaError as exc:
        return row | {"status": exc.status, "reason": exc.reason, "seconds": time.perf_counter() - start}
    with FaceMesher(video=True) as mesher:
        points, found = mesher.mesh_frames(frames)
    row.update(frames=len(frames), face_rate=float(found.mean()), fps=fps)
    if found.mean() < config.min_face_rate:
        return row | {"status": "no_face", "reason": f"face mesh in {found.mean():.0%} of {len(frames)} frames "
                      f"(needs {config.min_face_rate:.0%})", "seconds": time.perf_counter() - start}
    original = real_path(out, config.quality, video.vid)
    # Files appear under their final name only once complete: a run killed between the original and its
    # landmarks left a finished original, which this (deterministic) encode would only write again.
    if not original.exists():
        encode_video(frames, original, config.crf, fps)
    landmarks.parent.mkdir(parents=True, exist_ok=True)
    tmp = landmarks.with_name(f".{landmarks.stem}.tmp.npz")
    np.savez(tmp, points=points, found=found, fps=fps)
    os.replace(tmp, landmarks)  # last: its presence says the original is complete
    return row | {"status": "ok", "seconds": time.perf_counter() - start}


def _cycle(length: int, available: int) -> np.ndarray:
    """Indices of a source clip played forwards and backwards to cover `length` target frames."""
    period = np.r_[np.arange(available), np.arange(available - 2, 0, -1)] if available > 1 else np.zeros(1, int)
    return period[np.arange(length) % len(period)]


def _forge_target(out: Path, config: ForgeConfig, target: Footage, source: Footage, split: str) -> dict[str, Any]:
    start = time.perf_counter()
    cv2.setNumThreads(1)
    name = f"{target.vid}_{source.vid}"
    todo = [m for m in config.methods
            if not (fake_path(out, m, config.quality, name).exists() and mask_path(out, m, name).exists())]
    rows = {m: {"kind": "fake", "id": name, "method": m, "target": target.vid, "source": source.vid,
                "split": split, "status": "ok", "resumed": m not in todo} for m in config.methods}
    if todo:
        (target_frames, fps), (source_frames, _) = read_clip(Path(target.path), config), read_clip(Path(source.path), config)
        clips = []
        for video, frames in ((target, target_frames), (source, source_frames)):
            with np.load(_landmarks_path(out, video.vid)) as saved:
                points, found = saved["points"], saved["found"]
            if len(found) != len(frames):
                raise RuntimeError(f"{video.path} decodes to {len(frames)} frames now but {len(found)} when its "
                                   "landmarks were made: the file changed; forge into a new output directory")
            clips.append((frames, borrow_nearest(points, found), found))
        (t_frames, t_points, t_found), (s_frames, s_points, _) = clips
        order = _cycle(len(t_frames), len(s_frames))
        for method in todo:
            rng = np.random.default_rng([config.seed, _SALT_FAKE, METHODS.index(method), int(target.vid, 16),
                                         int(source.vid, 16)])
            fake, masks = MANIPULATIONS[method](t_frames, t_points, s_frames[order], s_points[order], rng)
            # Frames where the target's face was not meshed stay real: borrowed geometry would misplace it.
            fake[~t_found], masks[~t_found] = t_frames[~t_found], 0
            manipulated = int((masks >= 128).reshape(len(masks), -1).any(axis=1).sum())
            rows[method]["frames_manipulated"] = manipulated
            if not manipulated:
                rows[method].update(status="no_face", reason=f"{method} found no face region to change")
                continue
            # A run killed between the two files left one of them finished; it is not written again.
            for frames_out, path, crf in ((masks, mask_path(out, method, name), MASK_CRF),
                                          (fake, fake_path(out, method, config.quality, name), config.crf)):
                if not path.exists():
                    encode_video(frames_out, path, crf, fps)
    seconds = time.perf_counter() - start
    return {"rows": [r | {"seconds": seconds / len(rows)} for r in rows.values()], "seconds": seconds}


def _clear_partial_writes(out: Path) -> None:
    for leftover in out.rglob(".*.tmp*"):
        leftover.unlink()


def forge_archive(archive: Path, out: Path, config: ForgeConfig, people: Path | None = None) -> dict[str, Any]:
    """Forge every usable video of `archive` into `out`; returns counts, and writes the summary and meta."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    # The worker count does not change a byte of the output, so a rerun may use another one.
    identity = config.model_dump(mode="json", exclude={"workers"})
    if meta_path.exists() and json.loads(meta_path.read_text())["config"] != identity:
        raise ValueError(f"{out} was forged with another configuration ({meta_path}); use a new output directory")
    meta_path.write_text(json.dumps({"config": identity}, indent=1) + "\n")
    _clear_partial_writes(out)
    start = time.perf_counter()
    footage, skipped = list_footage(archive, people)
    logger.info("forging %d videos of %s into %s with %d workers", len(footage), archive, out, config.workers)
    with video_pool(config.workers) as pool:
        reals = run_all(pool, {v.vid: pool.submit(_prepare_real, out, config, v) for v in footage}, "original",
                        lambda r: f"{r['status']} in {r['seconds']:.1f}s")
        usable = [v for v in footage if reals[v.vid]["status"] == "ok"]
        split_of = assign_splits([v.person for v in usable], config.seed)
        pairs = {split: pair_with_other_people([v for v in usable if split_of[v.person] == split], config.seed)
                 for split in ("train", "val", "test")}
        fakes = run_all(pool, {f"{t.vid}_{s.vid}": pool.submit(_forge_target, out, config, t, s, split)
                               for split, split_pairs in pairs.items() for t, s in split_pairs}, "target",
                        lambda r: f"{len(r['rows'])} fakes in {r['seconds']:.1f}s")
    paired = {t.vid for split_pairs in pairs.values() for t, _ in split_pairs}
    rows = list(skipped)
    for video in footage:
        row = reals[video.vid] | {"split": split_of.get(video.person)}
        if row["status"] == "ok" and video.vid not in paired:
            row.update(status="unpaired", reason="no video of another person in its split")
        rows.append(row)
    rows += [r for result in fakes.values() for r in result["rows"]]
    write_splits(out, {split: [(t.vid, s.vid) for t, s in split_pairs] for split, split_pairs in pairs.items()})
    _write_summary(out / SUMMARY_FILE, rows)
    meta = {"config": identity, "archive": str(Path(archive).resolve()),
            "videos": {v.vid: asdict(v) | {"split": split_of.get(v.person), "status": reals[v.vid]["status"]}
                       for v in footage}}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    counts = Counter((r["kind"], r["status"]) for r in rows)
    summary = {"files": len(footage) + len(skipped), "originals": len(usable),
               "fakes": counts[("fake", "ok")], "skipped": {f"{k}:{s}": n for (k, s), n in counts.items() if s != "ok"},
               "people": {s: sorted({p for p, sp in split_of.items() if sp == s}) for s in ("train", "val", "test")},
               "seconds": round(time.perf_counter() - start, 1)}
    logger.info("forge done: %d originals, %d fakes, skipped %s", summary["originals"], summary["fakes"], summary["skipped"])
    return summary


_SUMMARY_COLUMNS = ("kind", "id", "path", "person", "split", "method", "target", "source", "status", "reason",
                    "frames", "fps", "face_rate", "frames_manipulated", "resumed", "seconds")


def _write_summary(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, _SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()
                             if k in _SUMMARY_COLUMNS})
    os.replace(tmp, path)
