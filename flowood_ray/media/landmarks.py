"""MediaPipe face-mesh landmarks: the 468-point geometry the manipulations and the self-blends use.

Index sets name regions of the mesh (lips, eyes, brows, face oval) and the points that expression
hardly moves, which carry the head pose.
"""

from __future__ import annotations

import mediapipe as mp
import numpy as np
from mediapipe.python.solutions import face_mesh_connections as mesh_sets

MESH_POINTS = 468


def _indices(connections: frozenset[tuple[int, int]]) -> np.ndarray:
    return np.array(sorted({i for edge in connections for i in edge}), dtype=np.int64)


LIPS = _indices(mesh_sets.FACEMESH_LIPS)
RIGHT_EYE = _indices(mesh_sets.FACEMESH_RIGHT_EYE)  # subject's right: the eye on the image's left
LEFT_EYE = _indices(mesh_sets.FACEMESH_LEFT_EYE)
EYES = np.concatenate([RIGHT_EYE, LEFT_EYE])
BROWS = np.concatenate([_indices(mesh_sets.FACEMESH_RIGHT_EYEBROW), _indices(mesh_sets.FACEMESH_LEFT_EYEBROW)])
OVAL = _indices(mesh_sets.FACEMESH_FACE_OVAL)
# Expression hardly moves these (eye corners, nose, forehead, upper face outline), so they carry the head pose.
STABLE = np.array([33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 10, 151, 9, 338, 297, 332, 284, 251, 389,
                   356, 454, 234, 127, 162, 21, 54, 103, 67, 109])
NOSE_TIP = 1
MOUTH_CORNERS = (61, 291)
CHEEKS = (234, 454)  # the widest points of the face oval


def face_size(points: np.ndarray) -> float:
    """Cheek-to-cheek width of one face's landmarks, the length scale of every manipulation."""
    return float(np.linalg.norm(points[CHEEKS[0]] - points[CHEEKS[1]]))


class FaceMesher:
    """One MediaPipe face-mesh graph; not picklable, so each process builds its own.

    `video=True` tracks the mesh from frame to frame (faster, steadier on footage); `video=False`
    meshes every image on its own, so a result never depends on the images before it.
    """

    def __init__(self, video: bool = False) -> None:
        self._graph = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.5
        )

    def mesh(self, rgb: np.ndarray) -> np.ndarray | None:
        """(468, 2) landmarks in pixels of one RGB image, or None when no face is found."""
        h, w = rgb.shape[:2]
        result = self._graph.process(np.ascontiguousarray(rgb))
        if not result.multi_face_landmarks:
            return None
        return np.array([(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark], np.float32)

    def mesh_frames(self, frames: np.ndarray | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Landmarks (N, 468, 2) of a sequence of frames and a (N,) found flag (zeros where not found)."""
        points = np.zeros((len(frames), MESH_POINTS, 2), np.float32)
        found = np.zeros(len(frames), bool)
        for i, frame in enumerate(frames):
            mesh = self.mesh(frame)
            if mesh is not None:
                points[i], found[i] = mesh, True
        return points, found

    def close(self) -> None:
        self._graph.close()

    def __enter__(self) -> FaceMesher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def borrow_nearest(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Landmarks where every frame without a mesh takes the nearest meshed frame's (needs one)."""
    hits = np.flatnonzero(found)
    if not len(hits):
        raise ValueError("no frame has a face mesh to borrow from")
    filled = points.copy()
    for i in np.flatnonzero(~found):
        filled[i] = points[hits[np.argmin(np.abs(hits - i))]]
    return filled
