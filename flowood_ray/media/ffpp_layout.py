"""Writing archives in the FaceForensics++ layout: originals, fakes, their mask videos and splits.

  original_sequences/youtube/<quality>/videos/<id>.mp4
  manipulated_sequences/<Method>/<quality>/videos/<target>_<source>.mp4
  manipulated_sequences/<Method>/masks/videos/<target>_<source>.mp4
  splits/{train,val,test}.json        [[target, source], ...]

The synthetic benchmark and `flowood forge` both write through here, so the FF++ loader in
`datasets.py` reads either unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# FF++ quality folder -> x264 CRF; raw/c0 are lossless like the dataset's own "raw" originals.
QUALITY_CRF = {"raw": 0, "c0": 0, "c23": 23, "c40": 40}
MASK_CRF = 0  # masks are stored losslessly so that their 0/255 edges survive


def real_path(out: Path, quality: str, vid: str) -> Path:
    return Path(out) / "original_sequences" / "youtube" / quality / "videos" / f"{vid}.mp4"


def fake_path(out: Path, method: str, quality: str, name: str) -> Path:
    return Path(out) / "manipulated_sequences" / method / quality / "videos" / f"{name}.mp4"


def mask_path(out: Path, method: str, name: str) -> Path:
    return Path(out) / "manipulated_sequences" / method / "masks" / "videos" / f"{name}.mp4"


def encode_video(frames: np.ndarray, path: Path, crf: int, fps: float) -> int:
    """H.264 in MP4 at a CRF, single-threaded so the bytes are reproducible; returns the file size.

    Frames are (N, H, W, 3) RGB, or (N, H, W) grey for masks. The file appears under its name only
    once complete, so a file that exists is a finished one (what resuming relies on).
    """
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected uint8 frames (N, H, W, 3) or (N, H, W), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {frames.shape[2]}x{frames.shape[1]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Macroblock-tree rate control made the bitstream differ between runs of the same frames with
        # the x264 builds in PyAV's wheels (16.x and 18.x, single-threaded; asm=0 also cures it), so
        # the output would not be reproducible; CRF without mbtree is.
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        stream.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path.stat().st_size


def write_splits(out: Path, pairs: Mapping[str, Sequence[tuple[str, str]]]) -> None:
    """The official-style split files: each split's [target, source] pairs."""
    splits_dir = Path(out) / "splits"
    splits_dir.mkdir(parents=True, exist_ok=True)
    for split, split_pairs in pairs.items():
        (splits_dir / f"{split}.json").write_text(json.dumps([list(p) for p in split_pairs]) + "\n")
