"""Finding the files of a dataset archive on disk: what the video and image dataset loaders share."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

StrPath = str | os.PathLike[str]


def absolute_path(path: StrPath) -> Path:
    # abspath, not resolve: a symlinked archive root keeps the name the user gave it.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def existing_dir(root: StrPath) -> Path:
    directory = absolute_path(root)
    if not directory.exists():
        raise FileNotFoundError(errno.ENOENT, "archive root does not exist", str(directory))
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "archive root is not a directory", str(directory))
    return directory


def walk_files(directory: Path, keep: Callable[[str], bool], *, recursive: bool) -> list[Path]:
    """Files below `directory` whose name passes `keep`, sorted.

    Hidden entries are skipped because archives copied from macOS carry '._name.mp4'
    resource forks that are not videos. Symlinked folders are followed (archives are often
    assembled from links), and a folder reached twice is read once so a link cycle ends.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        found.extend(Path(dirpath, name) for name in filenames if not name.startswith(".") and keep(name))
    return sorted(found)


def media_files(directory: Path, extensions: frozenset[str], *, recursive: bool) -> list[Path]:
    """Files below `directory` with one of `extensions` (any case); none when it is not a folder."""
    if not directory.is_dir():
        return []
    return walk_files(directory, lambda name: os.path.splitext(name)[1].lower() in extensions, recursive=recursive)
