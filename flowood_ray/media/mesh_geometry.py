"""Geometry on face meshes: Delaunay triangulation, piecewise-affine warps between meshes, hull masks
and expression transfer with the head pose removed."""

from __future__ import annotations

import cv2
import numpy as np

from flowood_ray.media.align import umeyama_similarity
from flowood_ray.media.landmarks import STABLE


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles (T, 3) as landmark indices, from cv2.Subdiv2D."""
    x0, y0 = np.floor(points.min(axis=0)) - 1
    x1, y1 = np.ceil(points.max(axis=0)) + 1
    subdiv = cv2.Subdiv2D((int(x0), int(y0), int(x1 - x0) + 1, int(y1 - y0) + 1))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    corners = subdiv.getTriangleList().reshape(-1, 3, 2)
    # Subdiv2D merges coincident points and adds virtual outer vertices; map back by nearest landmark.
    dist = np.linalg.norm(corners[:, :, None, :] - points[None, None], axis=-1)
    index = dist.argmin(axis=-1)
    ok = (dist.min(axis=-1) < 0.5).all(axis=1) & (index[:, 0] != index[:, 1]) & (index[:, 1] != index[:, 2]) \
        & (index[:, 0] != index[:, 2])
    return index[ok]


def piecewise_affine(src: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray,
                     shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warp src so every triangle of src_pts lands on the same triangle of dst_pts.

    Equivalent to one cv2.warpAffine per triangle, done as a single remap: each destination pixel is
    labelled with its triangle and mapped back through that triangle's affine. Returns the warped
    image (float32) and its coverage mask (float32 0/1) of the given (height, width).
    """
    h, w = shape
    dst = dst_pts[triangles].astype(np.float64)
    src_tri = src_pts[triangles].astype(np.float64)
    # Closed-form 2x2 inverses: batched np.linalg.solve is slow for thousands of tiny systems.
    edges = np.stack([dst[:, 1] - dst[:, 0], dst[:, 2] - dst[:, 0]], axis=2)  # (T, 2, 2), columns are edges
    det = edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]
    keep = np.abs(det) > 1e-3
    edges, det, dst, src_tri = edges[keep], det[keep], dst[keep], src_tri[keep]
    inverse = np.stack([np.stack([edges[:, 1, 1], -edges[:, 0, 1]], 1),
                        np.stack([-edges[:, 1, 0], edges[:, 0, 0]], 1)], 1) / det[:, None, None]
    linear = np.stack([src_tri[:, 1] - src_tri[:, 0], src_tri[:, 2] - src_tri[:, 0]], axis=2) @ inverse
    offset = src_tri[:, 0] - np.einsum("tij,tj->ti", linear, dst[:, 0])
    x0, y0 = np.clip(np.floor(dst.reshape(-1, 2).min(axis=0)).astype(int), 0, [w, h])
    x1, y1 = np.clip(np.ceil(dst.reshape(-1, 2).max(axis=0)).astype(int) + 1, 0, [w, h])
    warped = np.zeros((h, w, src.shape[2]), np.float32)
    mask = np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:
        return warped, mask
    label = np.full((y1 - y0, x1 - x0), -1, np.int32)
    for k, tri in enumerate(np.round((dst - (x0, y0)) * 16).astype(np.int32)):
        cv2.fillConvexPoly(label, tri, k, cv2.LINE_8, 4)
    ys, xs = np.nonzero(label >= 0)
    tri = label[ys, xs]
    lin, off = linear[tri], offset[tri]
    gx, gy = (xs + x0).astype(np.float64), (ys + y0).astype(np.float64)
    map_x = np.full(label.shape, -1, np.float32)
    map_y = np.full(label.shape, -1, np.float32)
    map_x[ys, xs] = lin[:, 0, 0] * gx + lin[:, 0, 1] * gy + off[:, 0]
    map_y[ys, xs] = lin[:, 1, 0] * gx + lin[:, 1, 1] * gy + off[:, 1]
    warped[y0:y1, x0:x1] = cv2.remap(src.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT)
    mask[y0:y1, x0:x1] = label >= 0
    return warped, mask


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (..., 2) through a 2x3 affine matrix."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def hull_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 0/1 mask of the convex hull of `points` in an image of `shape` (height, width)."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    return mask


def pose_normalised(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pose-normalised landmarks (N, 468, 2) in frame 0's coordinates, and each frame's map back."""
    to_first = [umeyama_similarity(p[STABLE], points[0][STABLE]) for p in points]
    normalised = np.stack([apply_affine(m, p) for m, p in zip(to_first, points)])
    back = np.stack([cv2.invertAffineTransform(m) for m in to_first])
    return normalised, back


def transfer_expression(target: np.ndarray, driver: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Target landmarks with the driver's expression on the `moved` landmarks, frame by frame.

    Each video's first frame is its neutral reference: the driver's displacement from its neutral
    (with head pose removed) is rescaled/rotated into the target's neutral frame and replaces the
    target's own displacement, then mapped back to the target's head pose in that frame.
    """
    moved = np.setdiff1d(moved, STABLE)  # the pose anchors (eye corners among them) stay the target's
    target_n, target_back = pose_normalised(target)
    driver_n, _ = pose_normalised(driver)
    linear = umeyama_similarity(driver[0][STABLE], target[0][STABLE])[:, :2]
    result_n = target_n.copy()
    result_n[:, moved] = target[0][moved] + (driver_n[:, moved] - driver[0][moved]) @ linear.T
    return np.stack([apply_affine(m, p) for m, p in zip(target_back, result_n)]).astype(np.float32)
