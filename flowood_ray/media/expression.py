"""Expression measures from MediaPipe face-mesh landmarks, standing in for seed 001's action units.

Three numbers per face, all invariant to translation, rotation and scale of the landmarks:

* mouth opening (AU25, lips part): the inner-lip gap measured along the face's vertical axis,
  averaged over five upper/lower point pairs, over the face size (cheek to cheek);
* eye aspect ratio (AU45, blink; Soukupova & Cech 2016): (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|),
  averaged over both eyes; about 0.3 for an open eye, towards 0 as it closes;
* lip-corner distance (AU12/AU20, lip corner puller/depressor): mouth width over the face size.

The gap is taken along the face's own vertical axis (perpendicular to the cheek-to-cheek line) rather
than the image's y axis, so a tilted head does not read as a more closed mouth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from flowood_ray.media.landmarks import (
    CHEEKS,
    MESH_POINTS,
    MOUTH_CORNERS,
    FaceMesher,
    face_size,
)

# Inner-lip contour points of MediaPipe's mesh, paired across the mouth (same position left to right).
UPPER_INNER_LIP = np.array([81, 82, 13, 312, 311])
LOWER_INNER_LIP = np.array([178, 87, 14, 317, 402])
# p1..p6 of the eye aspect ratio: outer corner, two upper lid points, inner corner, two lower lid points.
RIGHT_EYE_CONTOUR = np.array([33, 160, 158, 133, 153, 144])
LEFT_EYE_CONTOUR = np.array([263, 387, 385, 362, 380, 373])

MEASURES = ("mouth_opening", "eye_aspect_ratio", "lip_corner_distance")
Rule = Literal["mouth-open", "eyes-closed"]
# rule -> (measure, whether a high value is the positive class)
RULES: dict[str, tuple[str, bool]] = {"mouth-open": ("mouth_opening", True), "eyes-closed": ("eye_aspect_ratio", False)}
# MediaPipe finds faces in small crops far more reliably once they are enlarged to about this side.
MESH_SIDE = 256


def _check_points(points: np.ndarray) -> None:
    if points.shape != (MESH_POINTS, 2):
        raise ValueError(f"expected ({MESH_POINTS}, 2) face-mesh landmarks, got {points.shape}")


def face_down_axis(points: np.ndarray) -> np.ndarray:
    """Unit vector from forehead towards chin: the cheek line turned by +90 degrees (image y points down)."""
    across = points[CHEEKS[1]] - points[CHEEKS[0]]
    down = np.array([-across[1], across[0]], np.float64)
    return down / np.linalg.norm(down)


def mouth_opening(points: np.ndarray) -> float:
    """Mean inner-lip gap along the face's vertical axis over the face size (0 closed, ~0.3 wide open)."""
    _check_points(points)
    gaps = (points[LOWER_INNER_LIP] - points[UPPER_INNER_LIP]).astype(np.float64) @ face_down_axis(points)
    return float(gaps.mean() / face_size(points))


def _eye_aspect_ratio(points: np.ndarray, contour: np.ndarray) -> float:
    p1, p2, p3, p4, p5, p6 = points[contour].astype(np.float64)
    return float((np.linalg.norm(p2 - p6) + np.linalg.norm(p3 - p5)) / (2.0 * np.linalg.norm(p1 - p4)))


def eye_aspect_ratio(points: np.ndarray) -> float:
    """Mean eye aspect ratio of both eyes."""
    _check_points(points)
    return 0.5 * (_eye_aspect_ratio(points, RIGHT_EYE_CONTOUR) + _eye_aspect_ratio(points, LEFT_EYE_CONTOUR))


def lip_corner_distance(points: np.ndarray) -> float:
    """Distance between the mouth corners over the face size."""
    _check_points(points)
    return float(np.linalg.norm(points[MOUTH_CORNERS[0]] - points[MOUTH_CORNERS[1]]) / face_size(points))


def expression_measures(meshes: np.ndarray) -> np.ndarray:
    """(N, 468, 2) landmarks -> (N, 3) measures in the order of MEASURES; NaN rows where a mesh is NaN."""
    if meshes.ndim != 3:
        raise ValueError(f"expected (N, {MESH_POINTS}, 2) landmarks, got {meshes.shape}")
    out = np.full((len(meshes), len(MEASURES)), np.nan)
    for i, points in enumerate(meshes):
        if np.isfinite(points).all():
            out[i] = mouth_opening(points), eye_aspect_ratio(points), lip_corner_distance(points)
    return out


def expression_error(measured: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) mean absolute difference of the three measures, frame by frame; NaN where either is missing."""
    if measured.shape != reference.shape or measured.ndim != 2 or measured.shape[1] != len(MEASURES):
        raise ValueError(f"expected two (N, {len(MEASURES)}) arrays, got {measured.shape} and {reference.shape}")
    return np.abs(measured - reference).mean(axis=1)


def rule_labels(measures: np.ndarray, rule: str, fraction: float = 1 / 3) -> np.ndarray:
    """(N,) int8: 1 for the `fraction` of faces that show the rule's attribute most, 0 for the `fraction`
    that show it least, -1 for the middle and for faces without a mesh."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(RULES)}")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    name, high_is_positive = RULES[rule]
    values = measures[:, MEASURES.index(name)]
    if not high_is_positive:
        values = -values
    found = np.isfinite(values)
    labels = np.full(len(values), -1, np.int8)
    if found.sum() < 2:
        raise ValueError(f"rule {rule!r} needs at least two meshed faces, got {int(found.sum())}")
    low, high = np.quantile(values[found], [fraction, 1 - fraction])
    if not low < high:
        raise ValueError(f"rule {rule!r}: {name} does not vary across these faces; nothing to contrast")
    labels[found & (values >= high)] = 1
    labels[found & (values <= low)] = 0
    return labels


def mesh_images(images: np.ndarray | Sequence[np.ndarray], mesher: FaceMesher) -> np.ndarray:
    """(N, 468, 2) landmarks in each image's own pixels, NaN where no face is found; small images are
    enlarged to MESH_SIDE for the mesh and the landmarks scaled back."""
    meshes = np.full((len(images), MESH_POINTS, 2), np.nan, np.float32)
    for i, image in enumerate(images):
        scale = max(1.0, MESH_SIDE / max(image.shape[:2]))
        if scale > 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        points = mesher.mesh(image)
        if points is not None:
            meshes[i] = points / scale
    return meshes
