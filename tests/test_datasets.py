"""Dataset loaders on small trees built in the real datasets' layouts."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowood_ray.media.datasets import (
    build_manifest,
    load_celebdf,
    load_csv,
    load_dfdc,
    load_faceforensics,
    load_folder,
    manifest_summary,
)
from flowood_ray.media.decode import probe
from flowood_ray.media.image_datasets import (
    kaggle_edited_regions,
    load_cddb,
    load_dfgc21,
    load_kaggle_real_fake,
)
from flowood_ray.media.manifest import (
    MANIFEST_SCHEMA,
    read_manifest,
    video_id_for,
    write_manifest,
)


def touch(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def image(path: Path, value: int = 0) -> Path:
    """A real 16x12 image file, so decoding the loaders' rows can be checked too.

    At least 8 px a side: decode.py's header probe (IMREAD_REDUCED_COLOR_8) raises cv2.error on
    smaller PNGs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((12, 16, 3), value, np.uint8))
    return path


def by_rel(table: pa.Table, root: Path) -> dict[str, dict[str, object]]:
    """Rows keyed by root-relative POSIX path, so assertions read like the layout."""
    return {Path(row["path"]).relative_to(root).as_posix(): row for row in table.to_pylist()}


def ids_by_rel(table: pa.Table, root: Path) -> dict[str, str]:
    return {rel: str(row["video_id"]) for rel, row in by_rel(table, root).items()}


def assert_manifest(table: pa.Table, source: str, *, sorted_paths: bool = True) -> None:
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert set(table.column("source").to_pylist()) == {source}
    paths = table.column("path").to_pylist()
    assert all(os.path.isabs(p) for p in paths)
    if sorted_paths:
        assert paths == sorted(paths, key=Path)


# ----------------------------------------------------------------------- FaceForensics++


@pytest.fixture()
def ff_root(tmp_path: Path) -> Path:
    root = tmp_path / "archive" / "ff"
    for i, vid in enumerate(["000", "001", "002", "003"]):
        for quality in ("c23", "c40"):
            touch(root / f"original_sequences/youtube/{quality}/videos/{vid}.mp4", 10 + i)
    touch(root / "original_sequences/actors/c23/videos/01__walking.mp4")
    for name in ["000_001", "001_000", "002_003", "004_005"]:
        touch(root / f"manipulated_sequences/Deepfakes/c23/videos/{name}.mp4")
    touch(root / "manipulated_sequences/Deepfakes/masks/videos/000_001.mp4")
    touch(root / "manipulated_sequences/Face2Face/c40/videos/003_002.mp4")
    touch(root / "manipulated_sequences/DeepFakeDetection/c23/videos/01_02__walking__ABCDEFGH.mp4")
    (root / "splits").mkdir()
    (root / "splits/train.json").write_text(json.dumps([["000", "001"]]))
    (root / "splits/test.json").write_text(json.dumps([["003", "002"]]))
    (root / "synth_meta.json").write_text("{}")
    return root


def test_faceforensics_labels_methods_splits(ff_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table = load_faceforensics(ff_root)
    assert_manifest(table, "faceforensics")
    rows = by_rel(table, ff_root)
    assert set(rows) == {
        *(f"original_sequences/youtube/c23/videos/{v}.mp4" for v in ["000", "001", "002", "003"]),
        "original_sequences/actors/c23/videos/01__walking.mp4",
        *(f"manipulated_sequences/Deepfakes/c23/videos/{n}.mp4" for n in ["000_001", "001_000", "002_003", "004_005"]),
        "manipulated_sequences/DeepFakeDetection/c23/videos/01_02__walking__ABCDEFGH.mp4",
    }
    got = {rel: (r["label"], r["method"], r["split"]) for rel, r in rows.items()}
    assert got["original_sequences/youtube/c23/videos/000.mp4"] == (0, "real", "train")
    assert got["original_sequences/youtube/c23/videos/002.mp4"] == (0, "real", "test")
    assert got["original_sequences/actors/c23/videos/01__walking.mp4"] == (0, "real", None)
    assert got["manipulated_sequences/Deepfakes/c23/videos/000_001.mp4"] == (1, "Deepfakes", "train")
    assert got["manipulated_sequences/Deepfakes/c23/videos/001_000.mp4"] == (1, "Deepfakes", "train")
    # The split file lists the pair as [003, 002]; order inside a pair does not matter.
    assert got["manipulated_sequences/Deepfakes/c23/videos/002_003.mp4"] == (1, "Deepfakes", "test")
    assert got["manipulated_sequences/Deepfakes/c23/videos/004_005.mp4"] == (1, "Deepfakes", None)
    assert got["manipulated_sequences/DeepFakeDetection/c23/videos/01_02__walking__ABCDEFGH.mp4"] == (
        1, "DeepFakeDetection", None)
    assert "1 FaceForensics++ video(s)" in caplog.text  # 004_005 only; DFD ids are expected outside


def test_faceforensics_qualities(ff_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    c40 = by_rel(load_faceforensics(ff_root, qualities=("c40",)), ff_root)
    assert len(c40) == 5
    assert c40["manipulated_sequences/Face2Face/c40/videos/003_002.mp4"]["split"] == "test"
    assert len(load_faceforensics(ff_root, qualities="all")) == 5 + 10
    assert len(load_faceforensics(ff_root, qualities="c23")) == 10
    with caplog.at_level(logging.WARNING):
        assert len(load_faceforensics(ff_root, qualities="all")) == 15
        assert "no raw" not in caplog.text  # "all" asks for what is there, so nothing is absent
        assert len(load_faceforensics(ff_root, qualities=("raw",))) == 0
    assert "no raw folders" in caplog.text and "c23, c40" in caplog.text
    with pytest.raises(ValueError, match="qualities"):
        load_faceforensics(ff_root, qualities=("c30",))


def test_faceforensics_masks(ff_root: Path) -> None:
    # The fixture has Deepfakes/masks/videos/000_001.mp4. A Face2Face mask named like the
    # unmasked Deepfakes fake 001_000 must not pair with it (catches pairing by name across
    # methods); a mask without a fake and a macOS resource fork must not become rows.
    touch(ff_root / "manipulated_sequences/Face2Face/masks/videos/003_002.mp4")
    touch(ff_root / "manipulated_sequences/Face2Face/masks/videos/001_000.mp4")
    touch(ff_root / "manipulated_sequences/Deepfakes/masks/videos/999_998.mp4")
    touch(ff_root / "manipulated_sequences/Deepfakes/masks/videos/._001_000.mp4")
    table = load_faceforensics(ff_root, qualities="all")
    rows = by_rel(table, ff_root)
    masks = {rel: r["mask_path"] for rel, r in rows.items() if r["mask_path"] is not None}
    assert masks == {
        "manipulated_sequences/Deepfakes/c23/videos/000_001.mp4":
            str(ff_root / "manipulated_sequences/Deepfakes/masks/videos/000_001.mp4"),
        # one mask folder serves every quality
        "manipulated_sequences/Face2Face/c40/videos/003_002.mp4":
            str(ff_root / "manipulated_sequences/Face2Face/masks/videos/003_002.mp4"),
    }
    assert rows["manipulated_sequences/Deepfakes/c23/videos/001_000.mp4"]["mask_path"] is None
    assert not any("/masks/" in rel for rel in rows)
    assert len(rows) == 15  # as many rows as without any mask folder (test_faceforensics_qualities)
    assert manifest_summary(table)["masks"] == 2


def test_faceforensics_split_locations(ff_root: Path) -> None:
    (ff_root / "dataset").mkdir()
    shutil.move(ff_root / "splits", ff_root / "dataset" / "splits")
    rows = by_rel(load_faceforensics(ff_root), ff_root)
    assert rows["original_sequences/youtube/c23/videos/003.mp4"]["split"] == "test"
    shutil.rmtree(ff_root / "dataset")
    assert set(load_faceforensics(ff_root).column("split").to_pylist()) == {None}


def test_faceforensics_conflicting_splits(ff_root: Path) -> None:
    (ff_root / "splits/val.json").write_text(json.dumps([["001", "002"]]))
    with pytest.raises(ValueError, match="also in split"):
        load_faceforensics(ff_root)
    (ff_root / "splits/val.json").write_text(json.dumps([["001"]]))
    with pytest.raises(ValueError, match=r"val\.json.*pairs"):
        load_faceforensics(ff_root)
    (ff_root / "splits/val.json").write_text("[[")
    with pytest.raises(ValueError, match=r"val\.json: not valid JSON"):
        load_faceforensics(ff_root)


def test_ids_stable_across_calls_and_moves(ff_root: Path, tmp_path: Path) -> None:
    first = ids_by_rel(load_faceforensics(ff_root, qualities="all"), ff_root)
    assert first == ids_by_rel(load_faceforensics(ff_root, qualities="all"), ff_root)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(ff_root, moved)
    assert ids_by_rel(load_faceforensics(moved, qualities="all"), moved) == first
    # Same relative path with another size is another video (a file replaced in place).
    touch(moved / "original_sequences/youtube/c23/videos/000.mp4", 999)
    again = ids_by_rel(load_faceforensics(moved, qualities="all"), moved)
    changed = {rel for rel in first if again[rel] != first[rel]}
    assert changed == {"original_sequences/youtube/c23/videos/000.mp4"}


# ------------------------------------------------------------------------- Celeb-DF v2


@pytest.fixture()
def celeb_root(tmp_path: Path) -> Path:
    root = tmp_path / "Celeb-DF-v2"
    for rel in ["Celeb-real/id0_0000.mp4", "Celeb-real/id1_0000.mp4", "YouTube-real/00000.mp4",
                "Celeb-synthesis/id0_id1_0000.mp4", "Celeb-synthesis/id1_id0_0000.mp4"]:
        touch(root / rel)
    (root / "List_of_testing_videos.txt").write_text(
        "1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n\n1 Celeb-real/id1_0000.mp4\n")
    return root


def test_celebdf(celeb_root: Path) -> None:
    table = load_celebdf(celeb_root)
    assert_manifest(table, "celebdf")
    got = {rel: (r["label"], r["method"], r["split"]) for rel, r in by_rel(table, celeb_root).items()}
    assert got == {
        "Celeb-real/id0_0000.mp4": (0, "real", "train"),
        "Celeb-real/id1_0000.mp4": (0, "real", "test"),
        "YouTube-real/00000.mp4": (0, "real", "test"),
        "Celeb-synthesis/id0_id1_0000.mp4": (1, "Celeb-synthesis", "test"),
        "Celeb-synthesis/id1_id0_0000.mp4": (1, "Celeb-synthesis", "train"),
    }


def test_celebdf_inverted_label_is_rejected(celeb_root: Path) -> None:
    # Our convention (0 = real) written into the list by mistake must not pass silently.
    (celeb_root / "List_of_testing_videos.txt").write_text("1 YouTube-real/00000.mp4\n0 Celeb-real/id0_0000.mp4\n")
    with pytest.raises(ValueError, match=r"List_of_testing_videos\.txt:2: 'Celeb-real/id0_0000.mp4' is listed "
                                         r"with label 0 \(fake; in this file 1 = real, 0 = fake\)"):
        load_celebdf(celeb_root)


@pytest.mark.parametrize("line", ["Celeb-real/id0_0000.mp4", "2 Celeb-real/id0_0000.mp4", "1 Other/x.mp4"])
def test_celebdf_bad_list_lines(celeb_root: Path, line: str) -> None:
    (celeb_root / "List_of_testing_videos.txt").write_text(f"1 YouTube-real/00000.mp4\n{line}\n")
    with pytest.raises(ValueError, match=r"\.txt:2:"):
        load_celebdf(celeb_root)


def test_celebdf_missing_listed_video_and_missing_list(celeb_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (celeb_root / "Celeb-real/id1_0000.mp4").unlink()
    with caplog.at_level(logging.WARNING):
        rows = by_rel(load_celebdf(celeb_root), celeb_root)
    assert rows["Celeb-real/id1_0000.mp4"]["split"] == "test"
    assert "1 file(s) listed in List_of_testing_videos.txt are missing" in caplog.text
    (celeb_root / "List_of_testing_videos.txt").unlink()
    table = load_celebdf(celeb_root)
    assert len(table) == 4 and set(table.column("split").to_pylist()) == {None}


# -------------------------------------------------------------------------------- DFDC


@pytest.fixture()
def dfdc_root(tmp_path: Path) -> Path:
    root = tmp_path / "dfdc"
    part0, part1 = root / "dfdc_train_part_0", root / "dfdc_train_part_1"
    touch(part0 / "aaaa.mp4")
    touch(part0 / "bbbb.mp4")
    (part0 / "metadata.json").write_text(json.dumps({
        "aaaa.mp4": {"label": "REAL", "split": "train", "original": None},
        "bbbb.mp4": {"label": "FAKE", "split": "train", "original": "aaaa.mp4"},
        "cccc.mp4": {"label": "FAKE", "split": "train", "original": "aaaa.mp4"},
    }))
    touch(part1 / "dddd.mp4")
    touch(part1 / "eeee.mp4")
    (part1 / "metadata.json").write_text(json.dumps({"dddd.mp4": {"label": "real", "split": "public"}}))
    return root


def test_dfdc(dfdc_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table = load_dfdc(dfdc_root)
    assert_manifest(table, "dfdc")
    got = {rel: (r["label"], r["method"], r["split"]) for rel, r in by_rel(table, dfdc_root).items()}
    assert got == {
        "dfdc_train_part_0/aaaa.mp4": (0, "real", "train"),
        "dfdc_train_part_0/bbbb.mp4": (1, "dfdc", "train"),
        "dfdc_train_part_0/cccc.mp4": (1, "dfdc", "train"),  # listed, missing on disk
        "dfdc_train_part_1/dddd.mp4": (0, "real", None),
        "dfdc_train_part_1/eeee.mp4": (None, None, None),  # on disk, in no metadata.json
    }
    assert "1 file(s) listed in metadata.json are missing" in caplog.text
    assert "1 media file(s)" in caplog.text


def test_dfdc_unknown_label(dfdc_root: Path) -> None:
    (dfdc_root / "dfdc_train_part_1/metadata.json").write_text(json.dumps({"dddd.mp4": {"label": "MAYBE"}}))
    with pytest.raises(ValueError, match=r"dfdc_train_part_1/metadata\.json: unknown label 'MAYBE' for 'dddd\.mp4'"):
        load_dfdc(dfdc_root)


# ------------------------------------------------------------------------------ folder


def test_folder(tmp_path: Path) -> None:
    root = tmp_path / "loose"
    for rel in ["train/real/a.jpg", "train/Fake/Deepfakes/clip/b.mp4", "test/FAKE/c.PNG",
                "val/deepfake/FaceSwap/d.mp4", "Original/e.MOV", "misc/f.webm", "real/fake/g.mp4",
                "notes.txt", ".cache/h.mp4", "misc/._f.webm"]:
        touch(root / rel)
    table = load_folder(root)
    assert_manifest(table, "folder")
    got = {rel: (r["label"], r["method"], r["split"]) for rel, r in by_rel(table, root).items()}
    assert got == {
        "train/real/a.jpg": (0, "real", "train"),
        "train/Fake/Deepfakes/clip/b.mp4": (1, "Deepfakes", "train"),
        "test/FAKE/c.PNG": (1, None, "test"),
        "val/deepfake/FaceSwap/d.mp4": (1, None, "val"),
        "Original/e.MOV": (0, "real", None),
        "misc/f.webm": (None, None, None),
        "real/fake/g.mp4": (None, None, None),
    }


# --------------------------------------------------------------------------------- CSV


def test_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "archive"
    outside = touch(tmp_path / "outside.mp4")
    for rel in ["a.mp4", "sub/b.mp4", "c.jpg"]:
        touch(archive / rel)
    (archive / "list.csv").write_text(
        "Path,Label,method,split\n"
        "a.mp4,Real,,train\n"
        "sub/b.mp4,1,FaceSwap,TEST\n"
        "c.jpg,,,\n"
        f"{outside},fake,,\n"
        "gone.mp4,0,,val\n")
    monkeypatch.chdir(tmp_path)
    table = load_csv("archive/list.csv")
    assert_manifest(table, "csv", sorted_paths=False)  # a CSV keeps the order its author chose
    got = {Path(r["path"]).name: (r["label"], r["method"], r["split"]) for r in table.to_pylist()}
    assert got == {
        "a.mp4": (0, "real", "train"),
        "b.mp4": (1, "FaceSwap", "test"),
        "c.jpg": (None, None, None),
        "outside.mp4": (1, None, None),
        "gone.mp4": (0, "real", "val"),
    }
    assert table.column("path").to_pylist()[1] == str(archive / "sub/b.mp4")
    assert table.column("video_id").to_pylist()[0] == video_id_for(archive / "a.mp4", archive)
    # An explicit root moves where relative paths point, and what ids are relative to.
    (tmp_path / "list.csv").write_text("path,label\narchive/a.mp4,0\n")
    other = load_csv(tmp_path / "list.csv", root=tmp_path)
    assert other.column("path").to_pylist() == [str(archive / "a.mp4")]
    assert other.column("video_id").to_pylist()[0] != table.column("video_id").to_pylist()[0]


@pytest.mark.parametrize(("body", "message"), [
    ("file,label\na.mp4,0\n", r"no 'path' column \(columns: \['file', 'label'\]\)"),
    ("", "empty file"),
    ("path,label\na.mp4,0\nb.mp4,maybe\n", r"list\.csv:3: label must be 0, 1, real, fake or empty, got 'maybe'"),
    ("path,label,split\na.mp4,0,dev\n", r"list\.csv:2: split must be one of"),
    ("path,label\na.mp4,0\n,1\n", r"list\.csv:3: empty path"),
    ("path,label\na.mp4,0\n./a.mp4,1\n", r"list\.csv:3: './a\.mp4' is already listed on line 2"),
])
def test_csv_errors(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "list.csv").write_text(body)
    with pytest.raises(ValueError, match=message):
        load_csv(tmp_path / "list.csv")


# ----------------------------------------------------------------------------- entry


def test_build_manifest_detects_layouts(ff_root: Path, celeb_root: Path, dfdc_root: Path, tmp_path: Path) -> None:
    touch(tmp_path / "loose/real/x.jpg")
    (tmp_path / "loose/list.csv").write_text("path,label\nreal/x.jpg,0\n")
    assert build_manifest(ff_root).column("source")[0].as_py() == "faceforensics"
    assert build_manifest(celeb_root).column("source")[0].as_py() == "celebdf"
    assert build_manifest(dfdc_root).column("source")[0].as_py() == "dfdc"
    assert build_manifest(tmp_path / "loose").column("source")[0].as_py() == "folder"
    assert build_manifest(tmp_path / "loose/list.csv").column("source")[0].as_py() == "csv"
    assert len(build_manifest(ff_root, qualities="all")) == 15
    # kind overrides detection
    assert build_manifest(ff_root, kind="folder").column("source")[0].as_py() == "folder"


def test_build_manifest_reads_parquet_and_relative_paths(celeb_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(celeb_root.parent)
    table = build_manifest(celeb_root.name)
    assert table.column("path").to_pylist()[0].startswith(str(celeb_root))
    write_manifest(table, tmp_path / "m.parquet")
    assert build_manifest(tmp_path / "m.parquet").equals(table)


def test_build_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_manifest(tmp_path / "nowhere")
    touch(tmp_path / "empty/readme.txt")
    with pytest.raises(ValueError, match=f"no media files under {tmp_path / 'empty'}"):
        build_manifest(tmp_path / "empty")
    with pytest.raises(ValueError, match="kind must be one of"):
        build_manifest(tmp_path / "empty", kind="kinetics")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\.csv list or a \.parquet manifest"):
        build_manifest(tmp_path / "empty/readme.txt")
    with pytest.raises(NotADirectoryError):
        build_manifest(tmp_path / "empty/readme.txt", kind="folder")


def test_manifest_summary(dfdc_root: Path) -> None:
    summary = manifest_summary(load_dfdc(dfdc_root))
    assert summary == {
        "videos": 5,
        "masks": 0,
        "label": {"fake": 2, "real": 2, "unknown": 1},
        "method": {"dfdc": 2, "real": 2, "unknown": 1},
        "split": {"train": 3, "unknown": 2},
        "source": {"dfdc": 5},
    }


def test_csv_mask_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / "archive"
    for rel in ["a.mp4", "b.mp4", "c.mp4", "masks/b.mp4"]:
        touch(archive / rel)
    (archive / "list.csv").write_text(
        "path,label,mask_path\n"
        "a.mp4,0,\n"
        "b.mp4,1,masks/b.mp4\n"
        "c.mp4,1,masks/gone.png\n")
    with caplog.at_level(logging.WARNING):
        table = load_csv(archive / "list.csv")
    # Relative mask paths resolve against the root like `path` (catches a mask left relative or
    # resolved against the working directory); an empty cell is null, not "".
    assert table.column("mask_path").to_pylist() == [None, str(archive / "masks/b.mp4"),
                                                     str(archive / "masks/gone.png")]
    assert "1 mask file(s) listed" in caplog.text


def test_old_manifest_without_mask_path_reads_back_with_nulls(ff_root: Path, tmp_path: Path) -> None:
    # A manifest written before mask_path existed: the new column is filled with nulls instead of
    # the file being refused as "not a manifest"; a missing original column still is.
    current = load_faceforensics(ff_root)
    old = current.drop_columns(["mask_path"])
    pq.write_table(old, tmp_path / "old.parquet")
    table = read_manifest(tmp_path / "old.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("mask_path").to_pylist() == [None] * current.num_rows
    assert table.drop_columns(["mask_path"]).equals(old)
    assert build_manifest(tmp_path / "old.parquet").num_rows == current.num_rows
    pq.write_table(old.drop_columns(["split"]), tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match=r"not a manifest: missing columns \['split'\]"):
        read_manifest(tmp_path / "broken.parquet")


# ------------------------------------------------------- Kaggle Real and Fake Face Detection


@pytest.fixture()
def kaggle_root(tmp_path: Path) -> Path:
    """The Kaggle zip's layout: the same images twice, under two nested folders."""
    root = tmp_path / "kaggle"
    for base in ("real_and_fake_face", "real_and_fake_face_detection/real_and_fake_face"):
        for name in ["real_00001.jpg", "real_00002.jpg"]:
            image(root / base / "training_real" / name, 10)
        for name in ["easy_100_1111.jpg", "mid_1_1000.jpg", "hard_39_1101.jpg", "easy_7_0010.jpg"]:
            image(root / base / "training_fake" / name, 200)
    return root


def test_kaggle_real_fake(kaggle_root: Path) -> None:
    table = load_kaggle_real_fake(kaggle_root)
    assert_manifest(table, "kaggle_real_fake")
    base = kaggle_root / "real_and_fake_face"
    got = {rel: (r["label"], r["method"], r["split"], r["mask_path"]) for rel, r in by_rel(table, base).items()}
    # Only the first copy is read: the second would double every image under other paths.
    assert got == {
        "training_real/real_00001.jpg": (0, "real", None, None),
        "training_real/real_00002.jpg": (0, "real", None, None),
        "training_fake/easy_100_1111.jpg": (1, "photoshop_easy", None, None),
        "training_fake/mid_1_1000.jpg": (1, "photoshop_mid", None, None),
        "training_fake/hard_39_1101.jpg": (1, "photoshop_hard", None, None),
        "training_fake/easy_7_0010.jpg": (1, "photoshop_easy", None, None),
    }
    # Ids are relative to the folder holding training_real/training_fake, so pointing at it
    # directly, or at the other copy, gives the same ids as pointing at the zip's root.
    assert ids_by_rel(load_kaggle_real_fake(base), base) == ids_by_rel(table, base)
    other = kaggle_root / "real_and_fake_face_detection/real_and_fake_face"
    assert ids_by_rel(load_kaggle_real_fake(other), other) == ids_by_rel(table, base)


def test_kaggle_edited_regions() -> None:
    # Digits are left eye, right eye, nose, mouth: 1000 and 0010 read backwards would give
    # mouth and right eye (catches a reversed or shifted order).
    none = {"left_eye": False, "right_eye": False, "nose": False, "mouth": False}
    assert kaggle_edited_regions("x/training_fake/mid_1_1000.jpg") == {**none, "left_eye": True}
    assert kaggle_edited_regions(Path("easy_7_0010.jpg")) == {**none, "nose": True}
    assert kaggle_edited_regions("hard_39_1101.jpg") == {**none, "left_eye": True, "right_eye": True, "mouth": True}
    assert kaggle_edited_regions("easy_100_1111.jpg") == dict.fromkeys(none, True)
    assert kaggle_edited_regions("training_real/real_00001.jpg") == none
    for name in ["photo.jpg", "mid_1_1020.jpg", "medium_1_1000.jpg"]:
        with pytest.raises(ValueError, match="named <easy|mid|hard>_<index>_<4 digits"):
            kaggle_edited_regions(name)


@pytest.mark.parametrize("name", ["easy_1_111.jpg", "mid_1_1000 (1).jpg", "hard_x_1000.jpg", "real_00003.jpg"])
def test_kaggle_malformed_fake_name_is_an_error(tmp_path: Path, name: str) -> None:
    # Raised, not skipped: a skipped file would shrink the test set without anyone noticing.
    image(tmp_path / "training_real/real_00001.jpg")
    image(tmp_path / "training_fake/mid_1_1000.jpg")
    bad = image(tmp_path / "training_fake" / name)
    with pytest.raises(ValueError, match=rf"{bad.name.replace('(', '.').replace(')', '.')}: a Kaggle Real and "
                                         r"Fake Face Detection fake is named"):
        load_kaggle_real_fake(tmp_path)


# ------------------------------------------------------------------------------------ CDDB


@pytest.fixture()
def cddb_parent(tmp_path: Path) -> Path:
    cddb = tmp_path / "datasets" / "CDDB"
    for rel in ["gaugan/train/0_real/a.png", "gaugan/train/1_fake/b.png", "gaugan/val/1_fake/c.png",
                "gaugan/test/0_real/d.jpg", "cyclegan/train/horse/0_real/e.png", "cyclegan/train/horse/1_fake/f.png",
                "cyclegan/test/zebra/1_fake/g.png", "stylegan/extra/1_fake/h.png",
                "stylegan/train/1_fake/deeper/x/i.png", "j.png"]:
        image(cddb / rel)
    touch(cddb / "gaugan/train/1_fake/notes.txt")
    return cddb.parent


def test_cddb(cddb_parent: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table = load_cddb(cddb_parent)
    assert_manifest(table, "cddb")
    cddb = cddb_parent / "CDDB"
    got = {rel: (r["label"], r["method"], r["split"]) for rel, r in by_rel(table, cddb).items()}
    assert got == {
        "gaugan/train/0_real/a.png": (0, "real", "train"),
        "gaugan/train/1_fake/b.png": (1, "gaugan", "train"),
        "gaugan/val/1_fake/c.png": (1, "gaugan", "val"),
        "gaugan/test/0_real/d.jpg": (0, "real", "test"),
        # the object-category level of cyclegan is skipped, not read as the label folder
        "cyclegan/train/horse/0_real/e.png": (0, "real", "train"),
        "cyclegan/train/horse/1_fake/f.png": (1, "cyclegan", "train"),
        "cyclegan/test/zebra/1_fake/g.png": (1, "cyclegan", "test"),
        # outside the layout: kept, unlabelled
        "stylegan/extra/1_fake/h.png": (None, None, None),
        "stylegan/train/1_fake/deeper/x/i.png": (None, None, None),
        "j.png": (None, None, None),
    }
    assert "3 image(s)" in caplog.text
    # Ids are relative to the CDDB folder, whichever level the caller points at.
    assert ids_by_rel(load_cddb(cddb), cddb) == ids_by_rel(table, cddb)


# ---------------------------------------------------------------------------------- DFGC-21


@pytest.fixture()
def dfgc_root(tmp_path: Path) -> Path:
    root = tmp_path / "DFGC-21"
    for rel in ["real_fulls/id0_0000_00000.png", "real_fulls/id0_0000_00060.png",
                "fake_baseline/id0_id1_0000_00000.png", "DFGC_SYSU_852924/id0_id1_0000_00000.png",
                "miaotao_853000/submission/id0_id1_0000_00060.jpg", "stray.png"]:
        image(root / rel)
    (root / "bbox&landmarks.json").write_text("{}")
    return root


def test_dfgc21(dfgc_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table = load_dfgc21(dfgc_root)
    assert_manifest(table, "dfgc21")
    got = {rel: (r["label"], r["method"], r["split"]) for rel, r in by_rel(table, dfgc_root).items()}
    assert got == {
        "real_fulls/id0_0000_00000.png": (0, "real", "test"),
        "real_fulls/id0_0000_00060.png": (0, "real", "test"),
        "fake_baseline/id0_id1_0000_00000.png": (1, "fake_baseline", "test"),
        "DFGC_SYSU_852924/id0_id1_0000_00000.png": (1, "DFGC_SYSU_852924", "test"),
        # a zip unpacked into a subfolder of its own: the submission is still the top folder
        "miaotao_853000/submission/id0_id1_0000_00060.jpg": (1, "miaotao_853000", "test"),
        "stray.png": (None, None, None),
    }
    assert "1 image(s)" in caplog.text


def test_image_rows_decode_as_one_frame_images(kaggle_root: Path, cddb_parent: Path, dfgc_root: Path) -> None:
    # The rows of every image loader must reach decode.py's still-image path (catches a loader
    # listing files the decoder cannot open, or relative paths).
    tables = [load_kaggle_real_fake(kaggle_root), load_cddb(cddb_parent), load_dfgc21(dfgc_root)]
    for path in (p for table in tables for p in table.column("path").to_pylist()):
        info = probe(Path(path))
        assert (info.kind, info.frame_count, info.width, info.height) == ("image", 1, 16, 12)


def test_build_manifest_detects_image_layouts(kaggle_root: Path, cddb_parent: Path, dfgc_root: Path) -> None:
    # Each layout is recognised from the folder the user points at, including the nested Kaggle
    # folder, the CDDB folder itself and its parent; anything else is still a plain folder.
    assert set(build_manifest(kaggle_root).column("source").to_pylist()) == {"kaggle_real_fake"}
    assert set(build_manifest(kaggle_root / "real_and_fake_face").column("source").to_pylist()) == {
        "kaggle_real_fake"}
    assert set(build_manifest(cddb_parent).column("source").to_pylist()) == {"cddb"}
    assert set(build_manifest(cddb_parent / "CDDB").column("source").to_pylist()) == {"cddb"}
    assert set(build_manifest(dfgc_root).column("source").to_pylist()) == {"dfgc21"}
    assert set(build_manifest(cddb_parent / "CDDB/gaugan/train").column("source").to_pylist()) == {"folder"}
    assert len(build_manifest(dfgc_root, kind="dfgc21")) == 6
