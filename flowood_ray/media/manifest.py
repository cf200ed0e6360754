"""The Arrow manifest every job consumes: one row per input video or image.

Columns (ARCHITECTURE.md contract):
  video_id   stable hash of the path relative to the archive root and the file size
  path       absolute path of the file
  label      0 real, 1 fake, null when unknown
  method     manipulation method for fakes ("real" for originals), null when unknown
  split      train / val / test, null when unknown
  source     the dataset layout the row came from (faceforensics, celebdf, dfdc, kaggle_real_fake,
             cddb, dfgc21, folder, csv)
  mask_path  absolute path of the per-frame manipulation-mask video (or image) of a fake, when the
             dataset ships one (FaceForensics++, a CSV's mask_path column); null otherwise.
             Older manifests without this column read back with it null.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("method", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("mask_path", pa.string()),
    ]
)
# Columns added after manifests were first written: an older manifest reads back with them null.
_LATER_COLUMNS = ("mask_path",)

REAL, FAKE = 0, 1
SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS


def video_id_for(path: Path, root: Path) -> str:
    """Hash of the root-relative POSIX path and the size, so ids survive moving the archive.

    The size is part of the key so that a file replaced in place is scored again; an
    unreadable file hashes with size -1 and still gets a stable id for its error row.
    """
    # abspath, not resolve: an archive of symlinks keeps its ids when the link targets move.
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    return hashlib.sha256(f"{rel}\0{size}".encode()).hexdigest()[:20]


def manifest_row(path: Path, root: Path, label: int | None, method: str | None, split: str | None, source: str,
                 mask_path: Path | None = None) -> dict[str, object]:
    """One manifest row for the file at `path`, keyed by its id relative to the archive `root`."""
    return {
        "video_id": video_id_for(path, root),
        "path": str(path),
        "label": label,
        "method": method,
        "split": split,
        "source": source,
        "mask_path": None if mask_path is None else str(mask_path),
    }


def manifest_table(rows: Iterable[Mapping[str, object]]) -> pa.Table:
    """Validate rows against the schema; duplicate video ids are an error, never silently merged."""
    rows = list(rows)
    for row in rows:
        label = row.get("label")
        if label not in (None, REAL, FAKE):
            raise ValueError(f"label must be 0 (real), 1 (fake) or null, got {label!r} for {row.get('path')}")
        split = row.get("split")
        if split not in (None, *SPLITS):
            raise ValueError(f"split must be one of {SPLITS} or null, got {split!r} for {row.get('path')}")
    table = pa.Table.from_pylist([{name: row.get(name) for name in MANIFEST_SCHEMA.names} for row in rows],
                                 schema=MANIFEST_SCHEMA)
    ids = table.column("video_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate video_id {dup} in manifest")
    return table


def write_manifest(table: pa.Table, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table.cast(MANIFEST_SCHEMA), tmp)
    os.replace(tmp, path)


def read_manifest(path: Path) -> pa.Table:
    table = pq.read_table(path)
    for name in _LATER_COLUMNS:
        if name not in table.column_names:
            field = MANIFEST_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is not a manifest: missing columns {sorted(missing)}")
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
