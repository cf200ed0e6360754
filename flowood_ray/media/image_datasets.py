"""Loaders for still-image deepfake datasets: Kaggle Real and Fake Face Detection, CDDB, DFGC-21.

They follow the conventions of datasets.py (ids relative to the dataset's own root, absolute
paths, rows sorted by path, an empty table for a tree without images) and only read still
images: decode.py turns each into a one-frame video, so preprocessing and scoring need no
image path of their own. `detect_image_layout` tells `build_manifest` which of these a
folder holds.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa

from flowood_ray.media.archive import StrPath, existing_dir, media_files
from flowood_ray.media.manifest import (
    FAKE,
    IMAGE_EXTENSIONS,
    REAL,
    SPLITS,
    manifest_row,
    manifest_table,
)

logger = logging.getLogger(__name__)

# ------------------------------------------------------- Kaggle Real and Fake Face Detection

KAGGLE_REAL_DIR, KAGGLE_FAKE_DIR = "training_real", "training_fake"
# Where the Kaggle download puts the two folders; its zip holds the same images twice, under
# the second and third of these, so only the first one found is read.
KAGGLE_BASES = (".", "real_and_fake_face", "real_and_fake_face_detection/real_and_fake_face")
# The order of the digits in a fake's 4-digit code; 1 marks an edited region.
KAGGLE_REGIONS = ("left_eye", "right_eye", "nose", "mouth")
_KAGGLE_FAKE_NAME = re.compile(r"(?P<difficulty>easy|mid|hard)_(?P<index>\d+)_(?P<code>[01]{4})")
_KAGGLE_REAL_NAME = re.compile(r"real_\d+")

# ------------------------------------------------------------------------------------ CDDB

CDDB_DIR = "CDDB"
CDDB_LABEL_DIRS = {"0_real": REAL, "1_fake": FAKE}

# ---------------------------------------------------------------------------------- DFGC-21

DFGC_REAL_DIR = "real_fulls"
DFGC_BASELINE_DIR = "fake_baseline"


def _warn_unplaced(count: int, root: Path, layout: str) -> None:
    if count:
        logger.warning("%d image(s) under %s are outside the %s layout; label, method and split left null",
                       count, root, layout)


# ------------------------------------------------------- Kaggle Real and Fake Face Detection


def _kaggle_bases(root: Path) -> list[Path]:
    return [base for rel in KAGGLE_BASES
            if ((base := root / rel) / KAGGLE_REAL_DIR).is_dir() or (base / KAGGLE_FAKE_DIR).is_dir()]


def _kaggle_difficulty_and_code(path: Path) -> tuple[str, str]:
    match = _KAGGLE_FAKE_NAME.fullmatch(Path(path).stem)
    if match is None:
        raise ValueError(
            f"{path}: a Kaggle Real and Fake Face Detection fake is named <easy|mid|hard>_<index>_<4 digits of 0/1 "
            f"flagging {', '.join(KAGGLE_REGIONS)}>, e.g. mid_1_1000.jpg; a renamed or foreign file cannot be "
            f"labelled by method (read the archive with kind 'folder' or a CSV instead)")
    return match["difficulty"], match["code"]


def kaggle_edited_regions(path: StrPath) -> dict[str, bool]:
    """Which face regions were edited in a Kaggle Real and Fake Face Detection image, from its name.

    `mid_1_1000.jpg` -> left eye only; a real (`real_00001.jpg`) has none. Any other name is a
    ValueError. The flags live in the file name rather than the manifest because no other
    dataset has them: a manifest row's `path` is enough to recover them.
    """
    if _KAGGLE_REAL_NAME.fullmatch(Path(path).stem):
        return dict.fromkeys(KAGGLE_REGIONS, False)
    _, code = _kaggle_difficulty_and_code(Path(path))
    return {region: digit == "1" for region, digit in zip(KAGGLE_REGIONS, code)}


def load_kaggle_real_fake(root: StrPath) -> pa.Table:
    """Kaggle "Real and Fake Face Detection" (Yonsei CIPLab): Photoshop-edited faces.

    `training_real/*.jpg` are real (method "real"); `training_fake/<difficulty>_<index>_<code>.jpg`
    are fake with method "photoshop_<difficulty>" (easy, mid, hard); the code's edited
    regions come from `kaggle_edited_regions`. The two folders are found at the root or under
    `real_and_fake_face/` or `real_and_fake_face_detection/real_and_fake_face/`; ids are
    relative to the folder holding them, so pointing at the zip's root or at that folder
    gives the same ids. The dataset has no splits (null).

    A fake whose name does not parse is a ValueError, not a skipped file: a test set must not
    shrink silently, and such a name means a renamed copy or another dataset.
    """
    root_dir = existing_dir(root)
    bases = _kaggle_bases(root_dir)
    if not bases:
        return manifest_table([])
    base = bases[0]
    if len(bases) > 1:
        logger.info("reading %s; ignoring the copies in %s", base, ", ".join(str(b) for b in bases[1:]))
    rows = [manifest_row(path, base, REAL, "real", None, "kaggle_real_fake")
            for path in media_files(base / KAGGLE_REAL_DIR, IMAGE_EXTENSIONS, recursive=False)]
    for path in media_files(base / KAGGLE_FAKE_DIR, IMAGE_EXTENSIONS, recursive=False):
        difficulty, _ = _kaggle_difficulty_and_code(path)
        rows.append(manifest_row(path, base, FAKE, f"photoshop_{difficulty}", None, "kaggle_real_fake"))
    return manifest_table(sorted(rows, key=lambda r: Path(str(r["path"]))))


# ------------------------------------------------------------------------------------ CDDB


def _cddb_place(parts: tuple[str, ...]) -> tuple[int, str, str] | None:
    """(label, method, split) of a file at `parts` below the CDDB folder; None outside the layout."""
    if len(parts) not in (4, 5) or parts[1] not in SPLITS or parts[-2] not in CDDB_LABEL_DIRS:
        return None
    label = CDDB_LABEL_DIRS[parts[-2]]
    return label, "real" if label == REAL else parts[0], parts[1]


def load_cddb(root: StrPath) -> pa.Table:
    """CDDB, the Continual Deepfake Detection Benchmark (Li et al. 2022).

    Layout `CDDB/<task>/{train,val,test}/[<category>/]{0_real,1_fake}/*.png|jpg`, with tasks
    such as gaugan, biggan, cyclegan, imle, deepfake, crn, wild, glow, stargan_gf, stylegan,
    whichfaceisreal and san; some tasks (cyclegan, stylegan) have the object-category level.
    `root` is the CDDB folder or the folder holding it; ids are relative to the CDDB folder.
    The split comes from the folder, method is the task for fakes and "real" for reals.
    Images elsewhere in the tree keep a row with null label, method and split (warned).
    """
    root_dir = existing_dir(root)
    base = root_dir / CDDB_DIR if (root_dir / CDDB_DIR).is_dir() else root_dir
    rows: list[dict[str, object]] = []
    unplaced = 0
    for path in media_files(base, IMAGE_EXTENSIONS, recursive=True):
        place = _cddb_place(path.relative_to(base).parts)
        unplaced += place is None
        label, method, split = place or (None, None, None)
        rows.append(manifest_row(path, base, label, method, split, "cddb"))
    _warn_unplaced(unplaced, base, "CDDB <task>/<split>/[<category>/]{0_real,1_fake}")
    return manifest_table(rows)


def _is_cddb_task(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None
               for split in SPLITS for label_dir in CDDB_LABEL_DIRS
               for pattern in (f"{split}/{label_dir}", f"{split}/*/{label_dir}"))


# ---------------------------------------------------------------------------------- DFGC-21


def load_dfgc21(root: StrPath) -> pa.Table:
    """DFGC-21, the released data of the DeepFake Game Competition (IJCB 2021).

    Assumed layout (the release's zips, each unpacked into a folder of its own name):

        <root>/real_fulls/*.png|jpg           real frames of Celeb-DF v2 test videos
        <root>/fake_baseline/*.png|jpg        Celeb-DF v2's own fakes of the same frames
        <root>/<team>_<number>/*.png|jpg      one folder per released creation submission,
                                              e.g. DFGC_SYSU_852924, miaotao_853000
        <root>/bbox&landmarks.json            face boxes and landmarks (not read)

    Images of real_fulls are real with method "real"; every other folder is a submission,
    fake, with method = its folder name (fake_baseline included). Images may sit deeper
    inside their folder, as a zip unpacked into a subfolder leaves them. All frames come
    from Celeb-DF v2's test videos and the release is meant as a held-out test set, so
    split is "test". Images directly under the root keep a row with null label (warned).
    """
    root_dir = existing_dir(root)
    rows: list[dict[str, object]] = []
    unplaced = 0
    for path in media_files(root_dir, IMAGE_EXTENSIONS, recursive=True):
        parts = path.relative_to(root_dir).parts
        if len(parts) < 2:
            unplaced += 1
            rows.append(manifest_row(path, root_dir, None, None, None, "dfgc21"))
        elif parts[0] == DFGC_REAL_DIR:
            rows.append(manifest_row(path, root_dir, REAL, "real", "test", "dfgc21"))
        else:
            rows.append(manifest_row(path, root_dir, FAKE, parts[0], "test", "dfgc21"))
    _warn_unplaced(unplaced, root_dir, "DFGC-21 <subset>/")
    return manifest_table(rows)


# ----------------------------------------------------------------------------- detection


def detect_image_layout(target: Path) -> str | None:
    """The image-dataset kind a folder holds ("kaggle_real_fake", "cddb", "dfgc21"), or None."""
    if _kaggle_bases(target):
        return "kaggle_real_fake"
    if (target / DFGC_REAL_DIR).is_dir() or (target / DFGC_BASELINE_DIR).is_dir():
        return "dfgc21"
    if (target / CDDB_DIR).is_dir() or any(
            child.is_dir() and not child.name.startswith(".") and _is_cddb_task(child) for child in target.iterdir()):
        return "cddb"
    return None
