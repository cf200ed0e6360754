"""Similarity alignment of a face to a fixed-size square crop."""

from __future__ import annotations

import cv2
import numpy as np

# The standard 112 px five-point template (eyes, nose tip, mouth corners) with the mouth corners
# merged into their centre, because MediaPipe's detector gives a mouth centre, not corners.
# Order follows MediaPipe's keypoints: subject's right eye (image left), left eye, nose tip, mouth.
_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [56.1396, 92.2848]], dtype=np.float64
)


def template(size: int, margin: float) -> np.ndarray:
    """Template points for a `size` px crop; `margin` adds that fraction of context around the face."""
    unit = _TEMPLATE_112 / 112.0
    return size * (0.5 + (unit - 0.5) / (1.0 + margin))


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping src to dst (2x3 matrix)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("source points are degenerate (all equal)")
    u, sig, vt = np.linalg.svd(d_c.T @ s_c / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d) / var_s)
    translation = mu_d - scale * rotation @ mu_s
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(frame: np.ndarray, keypoints: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Warp `frame` so that the first four MediaPipe keypoints land on the template.

    Returns the uint8 crop (size, size, 3) and the 2x3 matrix from frame to crop coordinates.
    """
    matrix = umeyama_similarity(keypoints[:4], template(size, margin))
    # Reflected borders: constant black borders would be an easy, meaningless density cue.
    crop = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return crop, matrix
