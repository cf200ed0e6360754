"""Sharded job outputs on disk, written so that a killed job can be rerun safely.

Layout of an output directory (preprocessing writes `crops/`, scoring writes `frames/`):
  <data>/part-<id>.parquet   per-frame rows of the videos in shard <id>
  videos/part-<id>.parquet   one status row per video of shard <id>; its presence commits the shard
  _tmp/                      files being written; anything left here is from a killed run
  <job>.json                 the configuration every shard was made with

Both files are written under _tmp and renamed into place, data first. A data file without
its videos file is an interrupted commit and is deleted before a rerun, so every video ends
up in exactly one committed shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flowood_ray.media.facecrop import CROP_SCHEMA, VIDEO_SCHEMA, VideoCropper, crops_to_array, resize_crops

log = logging.getLogger(__name__)

CONFIG_FILE = "preprocess.json"


def shard_id(video_ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(video_ids)).encode()).hexdigest()[:16]


def prepare_output(
    out: Path, config: Mapping[str, object], config_file: str = CONFIG_FILE, data_dir: str = "crops",
    videos_dir: str = "videos",
) -> None:
    """Create the layout, refuse to mix configurations, and drop what a killed run left behind."""
    out = Path(out)
    for sub in (data_dir, videos_dir, "_tmp"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    config_path = out / config_file
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != json.loads(json.dumps(config)):
            raise ValueError(
                f"{out} holds results made with another configuration ({config_path}); use a new output directory"
            )
    else:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.rmtree(out / "_tmp")
    (out / "_tmp").mkdir()
    committed = {p.name for p in (out / videos_dir).glob("part-*.parquet")}
    for orphan in (out / data_dir).glob("part-*.parquet"):
        if orphan.name not in committed:
            log.info("removing uncommitted shard %s", orphan.name)
            orphan.unlink()


def temp_paths(out: Path, video_ids: Sequence[str], data_dir: str = "crops") -> tuple[str, Path, Path]:
    """(shard file name, temp data path, temp videos path) for a shard of these videos."""
    name = f"part-{shard_id(video_ids)}.parquet"
    tmp = Path(out) / "_tmp"
    return name, tmp / f"{data_dir}-{name}.{os.getpid()}", tmp / f"videos-{name}.{os.getpid()}"


def commit_shard(
    out: Path, name: str, tmp_data: Path, tmp_videos: Path, data_dir: str = "crops", videos_dir: str = "videos"
) -> None:
    """Rename data then videos into place: the videos file is the commit marker."""
    os.replace(tmp_data, Path(out) / data_dir / name)
    os.replace(tmp_videos, Path(out) / videos_dir / name)


def done_video_ids(out: Path, videos_dir: str = "videos") -> set[str]:
    files = sorted((Path(out) / videos_dir).glob("part-*.parquet"))
    if not files:
        return set()
    return set(pq.ParquetDataset(files).read(columns=["video_id"]).column("video_id").to_pylist())


def write_shard(out: Path, rows: Iterable[Mapping[str, object]], cropper: VideoCropper) -> list[dict[str, object]]:
    """Crop every row into one shard and commit it; returns the video status rows."""
    rows = list(rows)
    name, tmp_crops, tmp_videos = temp_paths(out, [str(r["video_id"]) for r in rows])
    results = []
    try:
        with pq.ParquetWriter(tmp_crops, CROP_SCHEMA, compression="zstd") as writer:
            for row in rows:
                results.append(cropper.process(row, writer.write_table))
        pq.write_table(pa.Table.from_pylist(results, schema=VIDEO_SCHEMA), tmp_videos, compression="zstd")
        commit_shard(out, name, tmp_crops, tmp_videos)
    finally:
        for leftover in (tmp_crops, tmp_videos):
            leftover.unlink(missing_ok=True)
    return results


def read_videos(out: Path) -> pa.Table:
    files = sorted((Path(out) / "videos").glob("part-*.parquet"))
    if not files:
        return VIDEO_SCHEMA.empty_table()
    return pq.ParquetDataset(files, schema=VIDEO_SCHEMA).read()


def crop_dataset(out: Path) -> pads.Dataset:
    """Lazy dataset over the committed crop shards (filter and project before reading)."""
    return pads.dataset(sorted(str(p) for p in (Path(out) / "crops").glob("part-*.parquet")), schema=CROP_SCHEMA)


def crop_size(out: Path) -> int:
    return int(json.loads((Path(out) / CONFIG_FILE).read_text())["crop"]["size"])


def real_split_ids(videos: pa.Table, split: str) -> list[str]:
    """Real videos of a split that produced crops: the only data detectors are fitted or calibrated on."""
    rows = videos.filter(
        (pc.field("label") == 0) & (pc.field("split") == split) & (pc.field("faces") > 0)
    ).column("video_id")
    return sorted(rows.to_pylist())


def labelled_split_ids(videos: pa.Table, split: str, methods: Sequence[str] | None = None) -> dict[str, int]:
    """video_id -> label (0 real, 1 fake) for a split's videos with crops: every real one, and the fakes
    of `methods` (all methods when None). Only supervised families train on this."""
    has_faces = (pc.field("split") == split) & (pc.field("faces") > 0)
    fake = pc.field("label") == 1
    if methods is not None:
        known = set(videos.filter(fake).column("method").to_pylist())
        if unknown := set(methods) - known:
            raise ValueError(f"no fakes of method(s) {sorted(unknown)} in these crops; methods present: {sorted(known)}")
        fake = fake & pc.field("method").isin(list(methods))
    rows = videos.filter(has_faces & ((pc.field("label") == 0) | fake))
    return dict(sorted(zip(rows.column("video_id").to_pylist(), rows.column("label").to_pylist())))


def read_crop_images(out: Path, video_ids: Sequence[str], size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, S, S, 3), video_ids (N,)) for the given videos, optionally resized to `size`."""
    table = crop_dataset(out).to_table(
        columns=["video_id", "frame_index", "crop"], filter=pc.field("video_id").isin(list(video_ids))
    ).sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
    images = crops_to_array(table, crop_size(out))
    if size is not None:
        images = resize_crops(images, size)
    return images, np.asarray(table.column("video_id").to_pylist())
