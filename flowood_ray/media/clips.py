"""Clips: windows of consecutive sampled face crops of one video, the input of clip-level models.

Training and scoring cut clips the same way: windows of `length` crops every `length // 2` crops, plus a
last window ending at the final crop so that every crop is covered. A video with fewer crops than
`length` gives one clip padded by repeating its last crop (a still tail), rather than no score at all.
"""

from __future__ import annotations

import numpy as np


def clip_starts(n_frames: int, length: int) -> list[int]:
    """Start indices of the windows over `n_frames` crops (at least one window)."""
    if n_frames < 1 or length < 1:
        raise ValueError(f"need at least one frame and a positive clip length, got {n_frames} and {length}")
    if n_frames <= length:
        return [0]
    starts = list(range(0, n_frames - length + 1, max(1, length // 2)))
    if starts[-1] != n_frames - length:
        starts.append(n_frames - length)
    return starts


def cut_clips(frames: np.ndarray, length: int) -> tuple[np.ndarray, list[int]]:
    """(clips (K, length, ...), window starts) of one video's frames in temporal order."""
    starts = clip_starts(len(frames), length)
    if len(frames) < length:
        frames = np.concatenate([frames, np.repeat(frames[-1:], length - len(frames), axis=0)])
    return np.stack([frames[s : s + length] for s in starts]), starts


def frame_means(clip_values: np.ndarray, starts: list[int], length: int, n_frames: int) -> np.ndarray:
    """Per frame, the mean value of the clips that contain it."""
    cover = np.zeros((len(starts), n_frames))
    for k, start in enumerate(starts):
        cover[k, start : start + length] = 1.0
    return (cover.T @ np.asarray(clip_values, dtype=np.float64)) / cover.sum(axis=0)
