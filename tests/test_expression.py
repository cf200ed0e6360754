"""Expression measures from face-mesh landmarks: a real face, exact synthetic edits, invariances, rules."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from flowood_ray.media.expression import (
    MEASURES,
    expression_error,
    expression_measures,
    eye_aspect_ratio,
    lip_corner_distance,
    mesh_images,
    mouth_opening,
    rule_labels,
)
from flowood_ray.media.landmarks import FaceMesher

# MediaPipe's whole lower lip (outer and inner contour, corners excluded), listed independently of the
# module's pairs: moving all of it moves whichever lower-lip points the measure uses.
LOWER_LIP = [146, 91, 181, 84, 17, 314, 405, 321, 375, 95, 88, 178, 87, 14, 317, 402, 318, 324]


@pytest.fixture(scope="module")
def astronaut_mesh() -> np.ndarray:
    with FaceMesher() as mesher:
        points = mesher.mesh(skimage.data.astronaut())
    assert points is not None
    return points.astype(np.float64)


def upright(points: np.ndarray) -> np.ndarray:
    """The mesh rotated about its centre so that the cheek-to-cheek line (234 -> 454) is horizontal."""
    dx, dy = points[454] - points[234]
    angle = -np.arctan2(dy, dx)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = points.mean(axis=0)
    return (points - centre) @ rotation.T + centre


def test_real_face_measures_are_plausible(astronaut_mesh: np.ndarray) -> None:
    """Catches a wrong index set or normalisation: the astronaut smiles with lips barely apart and open eyes."""
    assert 0.0 < mouth_opening(astronaut_mesh) < 0.15
    assert 0.15 < eye_aspect_ratio(astronaut_mesh) < 0.45
    # A mouth is roughly 0.35-0.6 of the cheek-to-cheek width.
    assert 0.3 < lip_corner_distance(astronaut_mesh) < 0.65


def test_lowering_the_lower_lip_opens_the_mouth_by_d_over_face_size(astronaut_mesh: np.ndarray) -> None:
    """Catches a gap measured on the wrong points, with the wrong sign or over the wrong length scale."""
    points = upright(astronaut_mesh)
    face = np.linalg.norm(points[454] - points[234])
    moved = points.copy()
    moved[LOWER_LIP, 1] += 7.0
    assert mouth_opening(moved) - mouth_opening(points) == pytest.approx(7.0 / face, rel=1e-9)


def test_measures_ignore_head_roll_scale_and_position(astronaut_mesh: np.ndarray) -> None:
    """Catches a gap taken along the image's y axis: a tilted head must not read as a closed mouth."""
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 2.5 * astronaut_mesh @ rotation.T + np.array([40.0, -13.0])
    np.testing.assert_allclose(expression_measures(moved[None]), expression_measures(astronaut_mesh[None]), rtol=1e-9)


def test_closed_lids_give_zero_eye_aspect_ratio(astronaut_mesh: np.ndarray) -> None:
    """Catches mis-paired lid points: upper lids laid on the lower lids they face close both eyes exactly."""
    closed = astronaut_mesh.copy()
    for upper, lower in ((160, 144), (158, 153), (385, 380), (387, 373)):
        closed[upper] = closed[lower]
    assert eye_aspect_ratio(closed) == pytest.approx(0.0, abs=1e-12)


def test_widening_the_mouth_grows_lip_corner_distance(astronaut_mesh: np.ndarray) -> None:
    points = astronaut_mesh.copy()
    before = lip_corner_distance(points)
    direction = (points[291] - points[61]) / np.linalg.norm(points[291] - points[61])
    points[291] += 5.0 * direction
    face = np.linalg.norm(points[454] - points[234])
    assert lip_corner_distance(points) - before == pytest.approx(5.0 / face, rel=1e-9)


def test_missing_meshes_give_nan_rows_and_nan_errors(astronaut_mesh: np.ndarray) -> None:
    meshes = np.stack([astronaut_mesh, np.full_like(astronaut_mesh, np.nan)])
    measures = expression_measures(meshes)
    assert measures.shape == (2, len(MEASURES))
    assert np.isfinite(measures[0]).all() and np.isnan(measures[1]).all()
    # Mean absolute difference, by hand: |0.1| + |0.2| + |0.3| over three.
    error = expression_error(measures + np.array([0.1, -0.2, 0.3]), measures)
    assert error[0] == pytest.approx(0.2) and np.isnan(error[1])


def test_rules_take_top_and_bottom_thirds() -> None:
    """Catches reversed rules: eyes-closed must pick the *lowest* eye aspect ratios as positives."""
    measures = np.zeros((10, 3))
    measures[:9, 0] = np.arange(9)  # mouth opening 0..8
    measures[:9, 1] = np.arange(9)[::-1]  # eye aspect ratio 8..0
    measures[9] = np.nan  # a face without a mesh is never labelled
    expected = np.array([0, 0, 0, -1, -1, -1, 1, 1, 1, -1])
    np.testing.assert_array_equal(rule_labels(measures, "mouth-open"), expected)
    np.testing.assert_array_equal(rule_labels(measures, "eyes-closed"), expected)
    with pytest.raises(ValueError, match="does not vary"):
        rule_labels(np.ones((6, 3)), "mouth-open")
    with pytest.raises(ValueError, match="unknown rule"):
        rule_labels(measures, "smile")


def test_mesh_images_returns_landmarks_in_the_small_images_pixels(astronaut_mesh: np.ndarray) -> None:
    """Catches landmarks left in the enlarged image's pixels: a 128 px face is meshed at 256 px."""
    import cv2

    photo = skimage.data.astronaut()  # 512 px
    small = cv2.resize(photo, (128, 128), interpolation=cv2.INTER_AREA)
    with FaceMesher() as mesher:
        meshes = mesh_images(np.stack([small, np.zeros_like(small)]), mesher)
    assert np.isnan(meshes[1]).all()
    # Same face at a quarter of the size: landmarks a quarter of the full-size ones, within a few pixels.
    assert np.abs(meshes[0] - astronaut_mesh / 4).mean() < 1.5
