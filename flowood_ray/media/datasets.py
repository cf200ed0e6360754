"""Dataset loaders: turn an archive on disk into the Arrow manifest of manifest.py.

One loader per video layout we know (FaceForensics++, Celeb-DF v2, DFDC; the still-image
datasets are in image_datasets.py), a folder walker that guesses labels from directory names,
a CSV reader for everything else, and `build_manifest` to pick one. Every loader

- keys rows by `video_id_for(path, root)`, so ids survive moving the archive;
- writes absolute paths and `source` = the loader's kind;
- returns rows sorted by path (a CSV keeps its own order), so two runs give identical tables;
- keeps files that a dataset's own index lists but that are missing on disk, with a warning:
  the preprocessing job turns them into decode_error rows, so a test set never shrinks
  silently and a later download of the file is picked up as a new video_id (size changes).

Loaders return an empty table for a tree without media; `build_manifest` is where an empty
archive becomes an error, so a caller combining several loaders can still do so.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, get_args

import pyarrow as pa

from flowood_ray.media.archive import (
    StrPath,
    absolute_path,
    existing_dir,
    media_files,
    walk_files,
)
from flowood_ray.media.image_datasets import (
    detect_image_layout,
    load_cddb,
    load_dfgc21,
    load_kaggle_real_fake,
)
from flowood_ray.media.manifest import (
    FAKE,
    MEDIA_EXTENSIONS,
    REAL,
    SPLITS,
    VIDEO_EXTENSIONS,
    manifest_row,
    manifest_table,
    read_manifest,
)

logger = logging.getLogger(__name__)

Kind = Literal["auto", "faceforensics", "celebdf", "dfdc", "kaggle_real_fake", "cddb", "dfgc21", "folder", "csv",
               "manifest"]
KINDS: tuple[str, ...] = get_args(Kind)
Row = dict[str, object]

FF_QUALITIES = ("raw", "c0", "c23", "c40")
CELEBDF_FOLDERS: dict[str, tuple[int, str]] = {
    "Celeb-real": (REAL, "real"),
    "YouTube-real": (REAL, "real"),
    "Celeb-synthesis": (FAKE, "Celeb-synthesis"),
}
CELEBDF_TEST_LIST = "List_of_testing_videos.txt"
# Celeb-DF's own test list uses the opposite convention to ours: 1 = real, 0 = fake.
_CELEBDF_LIST_LABELS = {"1": REAL, "0": FAKE}
DFDC_METADATA = "metadata.json"
_DFDC_LABELS = {"REAL": REAL, "FAKE": FAKE}

# Folder names that announce a label in ad-hoc archives; plurals are as common as singulars.
_REAL_WORDS = frozenset({"real", "reals", "original", "originals", "pristine"})
_FAKE_WORDS = frozenset({"fake", "fakes", "manipulated", "synthesis", "deepfake", "deepfakes"})
# Only these are read as "the next folder names the method": under "deepfake/" or "synthesis/"
# the next folder is as likely to be an identity or a date as a method.
_METHOD_PARENTS = frozenset({"fake", "fakes", "manipulated"})
_CSV_LABELS = {"0": REAL, "1": FAKE, "real": REAL, "fake": FAKE}
_UNKNOWN = "unknown"


class ManifestSummary(TypedDict):
    """Counts per value; null values are counted under "unknown"."""

    videos: int
    masks: int  # rows with a mask_path
    label: dict[str, int]
    method: dict[str, int]
    split: dict[str, int]
    source: dict[str, int]


# ----------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # json's own message does not say which file
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _warn_missing(missing: int, root: Path, index: str) -> None:
    if missing:
        logger.warning(
            "%d file(s) listed in %s are missing under %s; they keep their rows and will be "
            "reported as decode_error by preprocessing", missing, index, root)


# ----------------------------------------------------------------------- FaceForensics++


@dataclass(frozen=True)
class _FFSplits:
    by_id: dict[str, str]
    by_pair: dict[frozenset[str], str]


def _ff_qualities(qualities: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(qualities, str):
        wanted: tuple[str, ...] = FF_QUALITIES if qualities == "all" else (qualities,)
    else:
        wanted = tuple(qualities)
    unknown = [q for q in wanted if q not in FF_QUALITIES]
    if unknown or not wanted:
        raise ValueError(f"qualities must be 'all' or a non-empty subset of {FF_QUALITIES}, got {qualities!r}")
    return wanted


def _ff_splits(root: Path) -> _FFSplits | None:
    """Official split files map [target, source] pairs to splits; None when there are none."""
    for candidate in (root / "splits", root / "dataset" / "splits"):
        files = [(split, candidate / f"{split}.json") for split in SPLITS if (candidate / f"{split}.json").is_file()]
        if files:
            break
    else:
        return None
    by_id: dict[str, str] = {}
    by_pair: dict[frozenset[str], str] = {}
    for split, file in files:
        pairs = _read_json(file)
        if not isinstance(pairs, list):
            raise ValueError(f"{file}: expected a JSON list of [target, source] pairs")
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"{file}: expected [target, source] pairs, got {pair!r}")
            ids = [str(i) for i in pair]
            key = frozenset(ids)
            # A video in two splits would leak test identities into training; refuse it.
            if by_pair.get(key, split) != split:
                raise ValueError(f"{file}: pair {pair} is also in split {by_pair[key]!r}")
            by_pair[key] = split
            for video in ids:
                if by_id.get(video, split) != split:
                    raise ValueError(f"{file}: id {video!r} is also in split {by_id[video]!r}")
                by_id[video] = split
    logger.info("FaceForensics++ splits from %s (%d pairs)", files[0][1].parent, len(by_pair))
    return _FFSplits(by_id, by_pair)


def _ff_split(stem: str, label: int, splits: _FFSplits) -> str | None:
    if "__" in stem:  # DeepFakeDetection actor videos are outside the official splits
        return None
    if label == REAL:
        return splits.by_id.get(stem)
    ids = stem.split("_")
    return splits.by_pair.get(frozenset(ids)) if len(ids) == 2 else None


def load_faceforensics(root: StrPath, qualities: str | Sequence[str] = ("c23",)) -> pa.Table:
    """FaceForensics++ (and DeepFakeDetection) in the layout of its download script.

    Originals (`original_sequences/<source>/<quality>/videos`) are real with method "real";
    `manipulated_sequences/<Method>/<quality>/videos` are fakes with method = folder name.
    `qualities` is "all" or a subset of raw/c0/c23/c40. Splits come from the official
    `splits/{train,val,test}.json` (at root or root/dataset); without them split is null.

    A fake's `mask_path` is `manipulated_sequences/<Method>/masks/videos/<same file name>`
    when that file exists (FF++ ships masks for Deepfakes, Face2Face, FaceSwap and
    NeuralTextures; one mask serves every quality), null otherwise. Mask videos are never
    rows of their own: they are not footage to classify.
    """
    root_dir = existing_dir(root)
    wanted = _ff_qualities(qualities)
    splits = _ff_splits(root_dir)
    rows: list[Row] = []
    present: set[str] = set()
    unsplit = 0

    def add(folder: Path, label: int, method: str, masks: dict[str, Path]) -> None:
        nonlocal unsplit
        for path in media_files(folder / "videos", VIDEO_EXTENSIONS, recursive=False):
            split = None if splits is None else _ff_split(path.stem, label, splits)
            unsplit += splits is not None and split is None and "__" not in path.stem
            rows.append(manifest_row(path, root_dir, label, method, split, "faceforensics", masks.get(path.name)))

    for top, label in (("original_sequences", REAL), ("manipulated_sequences", FAKE)):
        top_dir = root_dir / top
        groups = sorted(p for p in top_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if top_dir.is_dir() else []
        for group in groups:
            method = "real" if label == REAL else group.name
            masks = {path.name: path for path in media_files(group / "masks" / "videos", VIDEO_EXTENSIONS,
                                                             recursive=False)} if label == FAKE else {}
            for quality in FF_QUALITIES:
                if (group / quality).is_dir():
                    present.add(quality)
                    if quality in wanted:
                        add(group / quality, label, method, masks)

    # "all" asks for whatever is there, so only explicitly named qualities can be absent.
    absent: list[str] = [] if qualities == "all" else [q for q in wanted if q not in present]
    if absent:
        logger.warning("no %s folders under %s (qualities present: %s)", "/".join(absent), root_dir,
                       ", ".join(q for q in FF_QUALITIES if q in present) or "none")
    if unsplit:
        logger.warning("%d FaceForensics++ video(s) under %s are in no split file; split left null", unsplit, root_dir)
    return manifest_table(sorted(rows, key=lambda r: Path(str(r["path"]))))


# ------------------------------------------------------------------------- Celeb-DF v2


def _celebdf_test_list(list_file: Path) -> set[str]:
    """Root-relative POSIX paths of the test videos, checked against their folders' labels."""
    listed: set[str] = set()
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or parts[0] not in _CELEBDF_LIST_LABELS:
            raise ValueError(f"{list_file}:{lineno}: expected '<1|0> <folder>/<file>.mp4', got {line!r}")
        rel = posixpath.normpath(parts[1].strip().replace("\\", "/"))
        folder = rel.split("/", 1)[0]
        if folder not in CELEBDF_FOLDERS:
            raise ValueError(f"{list_file}:{lineno}: {rel!r} is not in one of {sorted(CELEBDF_FOLDERS)}")
        listed_label = _CELEBDF_LIST_LABELS[parts[0]]
        folder_label = CELEBDF_FOLDERS[folder][0]
        if listed_label != folder_label:
            names = {REAL: "real", FAKE: "fake"}
            raise ValueError(
                f"{list_file}:{lineno}: {rel!r} is listed with label {parts[0]} ({names[listed_label]}; "
                f"in this file 1 = real, 0 = fake) but {folder}/ holds {names[folder_label]} videos")
        listed.add(rel)
    return listed


def load_celebdf(root: StrPath) -> pa.Table:
    """Celeb-DF (v1/v2): Celeb-real and YouTube-real are real, Celeb-synthesis is fake.

    Videos in `List_of_testing_videos.txt` get split "test" and all others "train"; without
    the list split is null, since calling everything "train" would hide the missing list.
    """
    root_dir = existing_dir(root)
    on_disk = {
        path.relative_to(root_dir).as_posix()
        for folder in CELEBDF_FOLDERS
        for path in media_files(root_dir / folder, VIDEO_EXTENSIONS, recursive=False)
    }
    list_file = root_dir / CELEBDF_TEST_LIST
    test: set[str] | None = _celebdf_test_list(list_file) if list_file.is_file() else None
    if test is None:
        logger.warning("%s has no %s; Celeb-DF split left null", root_dir, CELEBDF_TEST_LIST)
    else:
        _warn_missing(len(test - on_disk), root_dir, CELEBDF_TEST_LIST)
    rows: list[Row] = []
    for rel in sorted(on_disk | (test or set())):
        label, method = CELEBDF_FOLDERS[rel.split("/", 1)[0]]
        split = None if test is None else ("test" if rel in test else "train")
        rows.append(manifest_row(root_dir / rel, root_dir, label, method, split, "celebdf"))
    return manifest_table(rows)


# -------------------------------------------------------------------------------- DFDC


def _dfdc_entries(meta: Path) -> dict[Path, tuple[int, str | None]]:
    """File path -> (label, split) from one DFDC metadata.json."""
    data = _read_json(meta)
    if not isinstance(data, dict):
        raise ValueError(f"{meta}: expected a JSON object mapping file names to entries")
    entries: dict[Path, tuple[int, str | None]] = {}
    for name, entry in data.items():
        raw_label = entry.get("label") if isinstance(entry, dict) else None
        label = _DFDC_LABELS.get(raw_label.upper()) if isinstance(raw_label, str) else None
        if label is None:
            raise ValueError(f"{meta}: unknown label {raw_label!r} for {name!r}; expected REAL or FAKE")
        raw_split = entry.get("split")
        # DFDC parts say "train"; anything that is not one of our splits is unknown to us.
        split = raw_split.lower() if isinstance(raw_split, str) and raw_split.lower() in SPLITS else None
        entries[meta.parent / name] = (label, split)
    return entries


def load_dfdc(root: StrPath) -> pa.Table:
    """DFDC: every `metadata.json` below root labels the videos in its own folder.

    Listed files missing on disk keep their row (see the module docstring). Media files that
    no metadata.json lists still get a row with null label, method and split, so scoring
    the archive covers every file; both cases are logged with a count.
    """
    root_dir = existing_dir(root)
    labelled: dict[Path, tuple[int, str | None]] = {}
    for meta in walk_files(root_dir, lambda name: name == DFDC_METADATA, recursive=True):
        labelled.update(_dfdc_entries(meta))
    on_disk = set(media_files(root_dir, MEDIA_EXTENSIONS, recursive=True))
    _warn_missing(sum(not os.path.lexists(p) for p in labelled), root_dir, DFDC_METADATA)
    unlisted = on_disk - labelled.keys()
    if unlisted:
        logger.warning("%d media file(s) under %s are in no %s; label left null", len(unlisted), root_dir,
                       DFDC_METADATA)
    rows: list[Row] = []
    for path in sorted(on_disk | labelled.keys()):
        if path in labelled:
            label, split = labelled[path]
            rows.append(manifest_row(path, root_dir, label, "real" if label == REAL else "dfdc", split, "dfdc"))
        else:
            rows.append(manifest_row(path, root_dir, None, None, None, "dfdc"))
    return manifest_table(rows)


# ------------------------------------------------------------------------------ folder


def _folder_labels(dirs: Sequence[str]) -> tuple[int | None, str | None, str | None, bool]:
    """(label, method, split, ambiguous) from the folder names between the root and a file."""
    lowered = [d.lower() for d in dirs]
    is_real = any(d in _REAL_WORDS for d in lowered)
    is_fake = any(d in _FAKE_WORDS for d in lowered)
    label = REAL if is_real and not is_fake else FAKE if is_fake and not is_real else None
    method: str | None = None
    if label == REAL:
        method = "real"
    elif label == FAKE:
        method = next((dirs[i + 1] for i in range(len(dirs) - 2, -1, -1) if lowered[i] in _METHOD_PARENTS), None)
    split = next((d for d in reversed(lowered) if d in SPLITS), None)
    return label, method, split, is_real and is_fake


def load_folder(root: StrPath) -> pa.Table:
    """Any tree of media files; labels, methods and splits are guessed from folder names.

    A folder named real/original/pristine marks real, fake/manipulated/synthesis/deepfake
    marks fake (plurals too, any case); a path with both is left unlabelled rather than
    guessed. The deepest folder after fake/manipulated names the method; reals get "real"
    as in every other loader. The deepest train/val/test folder gives the split.
    """
    root_dir = existing_dir(root)
    rows: list[Row] = []
    ambiguous = 0
    for path in media_files(root_dir, MEDIA_EXTENSIONS, recursive=True):
        label, method, split, unclear = _folder_labels(path.relative_to(root_dir).parts[:-1])
        ambiguous += unclear
        rows.append(manifest_row(path, root_dir, label, method, split, "folder"))
    if ambiguous:
        logger.warning("%d file(s) under %s sit below both real and fake folders; label left null", ambiguous,
                       root_dir)
    return manifest_table(rows)


# --------------------------------------------------------------------------------- CSV


def _csv_path(root_dir: Path, raw: str) -> Path:
    return Path(os.path.normpath(root_dir / os.path.expanduser(raw)))


def load_csv(csv_path: StrPath, root: StrPath | None = None) -> pa.Table:
    """A CSV with columns path[,label,method,split,mask_path]; paths are relative to `root`.

    `root` defaults to the CSV's folder, so a list shipped inside an archive keeps working
    when the archive moves. Labels are 0/1/real/fake (any case) or empty; a real row
    without a method gets "real" like every other loader. Duplicate paths are an error.
    mask_path (optional, empty for none) is resolved like path; a listed mask missing on
    disk is kept and counted in a warning, like a missing video.
    """
    csv_file = absolute_path(csv_path)
    if not csv_file.is_file():
        raise FileNotFoundError(errno.ENOENT, "CSV file does not exist", str(csv_file))
    root_dir = absolute_path(root) if root is not None else csv_file.parent
    rows: list[Row] = []
    first_line: dict[str, int] = {}
    missing = missing_masks = 0
    # utf-8-sig: spreadsheets write a byte-order mark that would otherwise rename column one.
    with csv_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ValueError(f"{csv_file}: empty file, expected a header with a 'path' column")
        reader.fieldnames = [(name or "").strip().lower() for name in reader.fieldnames]
        if "path" not in reader.fieldnames:
            raise ValueError(f"{csv_file}: no 'path' column (columns: {reader.fieldnames})")
        for record in reader:
            line = reader.line_num
            where = f"{csv_file}:{line}"
            raw_path = (record.get("path") or "").strip()
            if not raw_path:
                raise ValueError(f"{where}: empty path")
            path = _csv_path(root_dir, raw_path)
            if str(path) in first_line:
                raise ValueError(f"{where}: {raw_path!r} is already listed on line {first_line[str(path)]}")
            first_line[str(path)] = line
            raw_label = (record.get("label") or "").strip().lower()
            if raw_label and raw_label not in _CSV_LABELS:
                raise ValueError(f"{where}: label must be 0, 1, real, fake or empty, got {raw_label!r}")
            label = _CSV_LABELS.get(raw_label)
            raw_split = (record.get("split") or "").strip().lower()
            if raw_split and raw_split not in SPLITS:
                raise ValueError(f"{where}: split must be one of {SPLITS} or empty, got {raw_split!r}")
            method = (record.get("method") or "").strip() or ("real" if label == REAL else None)
            raw_mask = (record.get("mask_path") or "").strip()
            mask = _csv_path(root_dir, raw_mask) if raw_mask else None
            missing += not os.path.lexists(path)
            missing_masks += mask is not None and not os.path.lexists(mask)
            rows.append(manifest_row(path, root_dir, label, method, raw_split or None, "csv", mask))
    _warn_missing(missing, root_dir, str(csv_file))
    if missing_masks:
        logger.warning("%d mask file(s) listed in %s are missing under %s", missing_masks, csv_file, root_dir)
    return manifest_table(rows)


# ----------------------------------------------------------------------------- entry


def _detect_kind(target: Path) -> str:
    if target.is_file():
        suffix = target.suffix.lower()
        if suffix == ".csv":
            return "csv"
        if suffix == ".parquet":
            return "manifest"
        raise ValueError(f"cannot read {target}: a file must be a .csv list or a .parquet manifest")
    names = {entry.name for entry in target.iterdir()}
    if names & {"original_sequences", "manipulated_sequences"}:
        return "faceforensics"
    if names & {"Celeb-real", "Celeb-synthesis"}:
        return "celebdf"
    if (target / DFDC_METADATA).is_file() or any((target / name / DFDC_METADATA).is_file() for name in names):
        return "dfdc"
    return detect_image_layout(target) or "folder"


def build_manifest(path: StrPath, kind: Kind = "auto", *, qualities: str | Sequence[str] = ("c23",)) -> pa.Table:
    """The manifest of an archive, a CSV list or an existing .parquet manifest.

    kind "auto" picks the layout from what `path` holds; `qualities` only applies to
    FaceForensics++. An archive without a single media file is a ValueError, since scoring
    nothing is always a mistake in the path.
    """
    target = absolute_path(path)
    if not target.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(target))
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    chosen = _detect_kind(target) if kind == "auto" else kind
    logger.info("building a %s manifest from %s", chosen, target)
    loaders: dict[str, Callable[[], pa.Table]] = {
        "faceforensics": lambda: load_faceforensics(target, qualities),
        "celebdf": lambda: load_celebdf(target),
        "dfdc": lambda: load_dfdc(target),
        "kaggle_real_fake": lambda: load_kaggle_real_fake(target),
        "cddb": lambda: load_cddb(target),
        "dfgc21": lambda: load_dfgc21(target),
        "folder": lambda: load_folder(target),
        "csv": lambda: load_csv(target),
        "manifest": lambda: read_manifest(target),
    }
    table = loaders[chosen]()
    if table.num_rows == 0:
        raise ValueError(f"no media files under {target} (read as {chosen})")
    logger.info("%d videos in the manifest of %s", table.num_rows, target)
    return table


def _counts(values: Iterable[object], name: Callable[[object], str] = str) -> dict[str, int]:
    counter = Counter(_UNKNOWN if value is None else name(value) for value in values)
    return dict(sorted(counter.items()))


def manifest_summary(table: pa.Table) -> ManifestSummary:
    """Row counts by label, method, split and source, keys sorted, nulls as "unknown"."""
    return ManifestSummary(
        videos=table.num_rows,
        masks=table.num_rows - table.column("mask_path").null_count,
        label=_counts(table.column("label").to_pylist(),
                      lambda v: "real" if v == REAL else "fake" if v == FAKE else str(v)),
        method=_counts(table.column("method").to_pylist()),
        split=_counts(table.column("split").to_pylist()),
        source=_counts(table.column("source").to_pylist()),
    )
