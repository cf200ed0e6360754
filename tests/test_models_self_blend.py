"""Self-blended images on a real face: where a blend may differ from its target, what its mask covers,
seeding, the blend formula against hand-computed sources, and JPEG augmentation."""

from __future__ import annotations

import cv2
import mediapipe as mp
import numpy as np
import pytest
import skimage.data
from scipy.spatial import Delaunay

from flowood_ray.models.self_blend import FOREHEAD_TOP, MESH_POINTS, SelfBlendConfig, jpeg_augment, self_blend

SIZE = 128
BATCH = 12

# Every alteration off, the target untouched and the whole-face mask opaque: each test below switches on
# one thing.
IDENTITY = dict(
    lower_face_probability=0.0,
    alter_target_probability=0.0, blend_ratios=(1.0,), rgb_shift=(0.0, 0.0), hue_shift_deg=(0.0, 0.0),
    saturation_scale=(1.0, 1.0), brightness=(0.0, 0.0), contrast=(1.0, 1.0), sharpen_probability=1.0,
    sharpen_amount=(0.0, 0.0), source_shift=(0.0, 0.0), source_scale=(1.0, 1.0),
)
# A mask with no random deformation: the lifted hull, barely feathered.
RIGID_MASK = dict(
    lower_face_probability=0.0,
    elastic_amplitude=(0.0, 0.0), mask_rotation_deg=(0.0, 0.0), mask_scale=(1.0, 1.0), mask_shift=(0.0, 0.0),
    mask_morph_radius=(0.0, 0.0), mask_blur_sigma=(0.01, 0.01), blend_ratios=(1.0,),
)


@pytest.fixture(scope="module")
def face() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's face as a 128 px crop and its FaceMesh landmarks in crop pixels."""
    photo = skimage.data.astronaut()
    crop = cv2.resize(np.ascontiguousarray(photo[10:240, 110:340]), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        result = mesh.process(crop)
    assert result.multi_face_landmarks, "FaceMesh found no face in the astronaut crop"
    points = np.array([(p.x * SIZE, p.y * SIZE) for p in result.multi_face_landmarks[0].landmark], np.float32)
    assert points.shape == (MESH_POINTS, 2)
    return crop, points


def _batch(face: tuple[np.ndarray, np.ndarray], n: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    crop, points = face
    return np.repeat(crop[None], n, axis=0), np.repeat(points[None], n, axis=0)


def _hull(points: np.ndarray) -> np.ndarray:
    """Pixels inside the landmarks' convex hull, by Delaunay point location rather than polygon filling."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float64)
    return (Delaunay(points).find_simplex(centres) >= 0).reshape(SIZE, SIZE)


def test_blend_differs_from_the_target_only_inside_its_mask(face: tuple[np.ndarray, np.ndarray]) -> None:
    # Catches an inverted mask, a blur tail not cut to 0, an alteration applied to the
    # output rather than to one copy, and a blend that forgets the source (nothing changes inside).
    crops, points = _batch(face)
    blends, masks = self_blend(crops, points, np.random.default_rng(0), SelfBlendConfig(alter_target_probability=0.0))
    assert blends.shape == crops.shape and blends.dtype == np.uint8
    assert masks.shape == crops.shape[:3] and masks.dtype == np.float32
    assert masks.min() >= 0 and masks.max() <= 1
    # The feather's tail is cut at epsilon (times the ratio, the mask's peak), so "outside" is exact.
    epsilon = SelfBlendConfig().mask_epsilon
    for mask in masks:
        assert mask[mask > 0].min() >= epsilon * mask.max() * (1 - 1e-6)
    outside = masks == 0
    assert outside.mean() > 0.4
    np.testing.assert_array_equal(blends[outside], crops[outside])
    for blend, mask, crop in zip(blends, masks, crops):
        core = mask >= 0.5 * mask.max()
        assert np.abs(blend.astype(int) - crop)[core].mean() > 2


def test_an_altered_target_changes_the_whole_crop(face: tuple[np.ndarray, np.ndarray]) -> None:
    # Catches alter_target_probability being ignored (the altered copy always used as the source).
    crops, points = _batch(face)
    blends, masks = self_blend(crops, points, np.random.default_rng(0), SelfBlendConfig(alter_target_probability=1.0))
    for blend, mask, crop in zip(blends, masks, crops):
        assert np.abs(blend.astype(int) - crop)[mask == 0].mean() > 2


def test_mask_covers_the_face_and_forehead_but_not_the_corners(face: tuple[np.ndarray, np.ndarray]) -> None:
    # Catches a mask drawn from the wrong landmarks or axes (x, y swapped), a deformation that throws the
    # mask off the face, a forehead extension pushed down instead of up, and a blur that never reaches 0.
    crops, points = _batch(face, 32)
    _, masks = self_blend(crops, points, np.random.default_rng(1), SelfBlendConfig(lower_face_probability=0.0))
    hull = _hull(face[1])
    coverage = np.array([(mask >= 0.5 * mask.max())[hull].mean() for mask in masks])
    assert coverage.min() > 0.75 and coverage.mean() > 0.9
    highest_landmark = face[1][:, 1].min()
    assert all(np.flatnonzero(mask.any(axis=1)).min() < highest_landmark for mask in masks)
    np.testing.assert_array_equal(masks[:, [0, 0, -1, -1], [0, -1, 0, -1]], 0)
    # The peak is the blend ratio, drawn per crop: catches a ratio ignored or undone by the normalisation.
    peaks = set(masks.max(axis=(1, 2)).tolist())
    assert peaks <= {0.25, 0.5, 0.75, 1.0} and len(peaks) > 1


def test_forehead_lift_raises_the_top_and_leaves_the_chin(face: tuple[np.ndarray, np.ndarray]) -> None:
    # A lift of 0.3 moves the mesh top up by 0.3 half face heights = 0.15 face heights; the push fades to
    # nothing below the face centre. Catches a missing or inverted lift and one that moves the whole hull.
    crops, points = _batch(face, 2)
    top, chin = face[1][FOREHEAD_TOP], face[1][152]
    height = float(np.linalg.norm(top - chin))
    config = SelfBlendConfig(forehead_lift=(0.3, 0.3), **RIGID_MASK)
    _, masks = self_blend(crops, points, np.random.default_rng(2), config)
    x = round(float(top[0]))
    assert (masks[:, round(float(top[1]) - 0.1 * height), x] == 1).all()
    assert (masks[:, round(float(top[1]) - 0.2 * height), x] == 0).all()
    assert (masks[:, round(float(chin[1]) + 0.05 * height), round(float(chin[0]))] == 0).all()


def test_lower_face_mask_covers_the_mouth_and_chin_but_not_the_nose_tip_or_eyes(face: tuple[np.ndarray, np.ndarray]) -> None:
    # On the astronaut, in face heights above the face centre: eyes +0.19, nose tip -0.08, upper lip -0.17,
    # lower lip -0.30. A cut at -0.12 keeps the mouth and chin and nothing above. Catches the cut's sign or
    # axis (the upper face kept), the cut ignored (the whole hull), and the probability ignored (below).
    crops, points = _batch(face, 2)
    config = SelfBlendConfig(**{**RIGID_MASK, "lower_face_probability": 1.0, "lower_face_cut": (-0.12, -0.12)})
    _, masks = self_blend(crops, points, np.random.default_rng(5), config)

    def at(index: int) -> np.ndarray:
        x, y = face[1][index]
        return masks[:, round(float(y)), round(float(x))]

    for inside in (61, 291, 17, 200):  # mouth corners, lower lip, under the lower lip
        assert (at(inside) == 1).all(), inside
    for outside in (1, 33, 263, FOREHEAD_TOP):  # nose tip, eye corners, mesh top
        assert (at(outside) == 0).all(), outside
    # The default mixes both kinds: some masks leave the eyes out, others cover them.
    crops, points = _batch(face, 40)
    _, masks = self_blend(crops, points, np.random.default_rng(6), SelfBlendConfig())
    x, y = face[1][33]
    eye_covered = masks[:, round(float(y)), round(float(x))] > 0
    assert 0 < (~eye_covered).sum() < 25


def test_same_seed_same_blends_and_different_seed_different(face: tuple[np.ndarray, np.ndarray]) -> None:
    # Catches draws from a global RNG instead of the caller's generator (unreproducible, or seed ignored).
    crops, points = _batch(face, 4)
    config = SelfBlendConfig()
    first = self_blend(crops, points, np.random.default_rng(7), config)
    again = self_blend(crops, points, np.random.default_rng(7), config)
    other = self_blend(crops, points, np.random.default_rng(8), config)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    # Crops of one batch get their own draws, not one draw shared by the batch.
    assert not np.array_equal(first[1][0], first[1][1])


def _rgb_shift_and_move(crop: np.ndarray) -> np.ndarray:
    """+20 on every channel, clipped, then the content moved 3 px right and 3 px down."""
    shifted = np.clip(crop.astype(int) + 20, 0, 255)
    out = np.zeros_like(shifted)
    out[3:, 3:] = shifted[:-3, :-3]
    return out


def _hue_plus_120(crop: np.ndarray) -> np.ndarray:
    """A 120 degree hue rotation moves red to green, green to blue, blue to red: R' = B, G' = R, B' = G."""
    return crop[..., [2, 0, 1]].astype(int)


def _contrast_and_brightness(crop: np.ndarray) -> np.ndarray:
    mean = crop.astype(np.float64).mean()
    return np.clip(np.round((crop - mean) * 1.5 + mean + 10), 0, 255).astype(int)


@pytest.mark.parametrize(
    ("alteration", "expected_source", "tolerance"),
    [
        (dict(rgb_shift=(20.0, 20.0), source_shift=(3 / SIZE, 3 / SIZE)), _rgb_shift_and_move, 0),
        (dict(hue_shift_deg=(120.0, 120.0)), _hue_plus_120, 1),
        (dict(contrast=(1.5, 1.5), brightness=(10.0, 10.0)), _contrast_and_brightness, 1),
    ],
    ids=["rgb-shift-and-move", "hue", "contrast-brightness"],
)
def test_opaque_mask_shows_the_altered_source(face: tuple[np.ndarray, np.ndarray], alteration: dict,
                                              expected_source: object, tolerance: int) -> None:
    # With the target unaltered and ratio 1, out = source where mask == 1. Catches the shift's sign or
    # axis, the source and target swapped, hue in OpenCV's half-degrees or channels in BGR, and contrast
    # taken about 0 instead of the mean.
    crops, points = _batch(face, 3)
    blends, masks = self_blend(crops, points, np.random.default_rng(3), SelfBlendConfig(**{**IDENTITY, **alteration}))
    expected = expected_source(face[0])
    for blend, mask in zip(blends, masks):
        opaque = mask == 1
        assert opaque.sum() > 1000
        assert np.abs(blend.astype(int) - expected)[opaque].max() <= tolerance


def _detail_energy(image: np.ndarray, region: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of the grey image over `region`."""
    grey = image.astype(np.float64).mean(axis=-1)
    laplacian = np.zeros_like(grey)
    laplacian[1:-1, 1:-1] = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float((laplacian[region] ** 2).mean())


@pytest.mark.parametrize(
    ("alteration", "low", "high"),
    [
        (dict(sharpen_amount=(1.0, 1.0)), 1.5, np.inf),
        (dict(sharpen_probability=0.0, downscale_factor=(0.5, 0.5)), 0.0, 0.7),
    ],
    ids=["sharpen", "downscale"],
)
def test_frequency_alteration_moves_detail_the_right_way(face: tuple[np.ndarray, np.ndarray], alteration: dict,
                                                         low: float, high: float) -> None:
    # Catches an unsharp mask with the wrong sign (a blur), and a downscale that is never applied.
    crops, points = _batch(face, 2)
    blends, masks = self_blend(crops, points, np.random.default_rng(4), SelfBlendConfig(**{**IDENTITY, **alteration}))
    for blend, mask in zip(blends, masks):
        opaque = mask == 1
        ratio = _detail_energy(blend, opaque) / _detail_energy(face[0], opaque)
        assert low < ratio < high


def test_jpeg_augment_compresses_without_moving_colours(face: tuple[np.ndarray, np.ndarray]) -> None:
    # Catches a swapped RGB/BGR round trip (large errors at quality 100), a quality range read backwards
    # or ignored (no loss at 40), an inverted probability, and compression written into the input.
    crops, _ = _batch(face, 4)
    before = crops.copy()
    low = jpeg_augment(crops, np.random.default_rng(0), quality=(40, 40), p=1.0)
    high = jpeg_augment(crops, np.random.default_rng(0), quality=(100, 100), p=1.0)
    np.testing.assert_array_equal(crops, before)
    for out in (low, high):
        assert out.shape == crops.shape and out.dtype == np.uint8
    error_low = np.abs(low.astype(int) - crops)
    error_high = np.abs(high.astype(int) - crops)
    assert error_low.mean() > 2
    assert error_high.mean() < 1.5
    # Luma is near-lossless at quality 100; chroma is still subsampled 2x2, as in compressed video.
    grey = np.array([0.299, 0.587, 0.114])
    assert np.abs((high.astype(float) - crops) @ grey).max() <= 5
    np.testing.assert_array_equal(jpeg_augment(crops, np.random.default_rng(0), p=0.0), crops)


@pytest.mark.parametrize(
    "change",
    ["float crops", "grey crops", "four channels", "68 landmarks", "batch mismatch", "nan landmark", "int landmarks"],
)
def test_bad_inputs_raise_value_error(face: tuple[np.ndarray, np.ndarray], change: str) -> None:
    # Catches inputs that would otherwise fail deep in OpenCV or silently blend the wrong region.
    crops, points = _batch(face, 2)
    if change == "float crops":
        crops = crops.astype(np.float32)
    elif change == "grey crops":
        crops = crops[..., 0]
    elif change == "four channels":
        crops = np.concatenate([crops, crops[..., :1]], axis=-1)
    elif change == "68 landmarks":
        points = points[:, :68]
    elif change == "batch mismatch":
        points = points[:1]
    elif change == "nan landmark":
        points = points.copy()
        points[1, 5, 0] = np.nan
    else:
        points = points.astype(np.int32)
    with pytest.raises(ValueError):
        self_blend(crops, points, np.random.default_rng(0), SelfBlendConfig())


def test_bad_jpeg_settings_and_config_ranges_raise_value_error(face: tuple[np.ndarray, np.ndarray]) -> None:
    # Catches silent acceptance of settings that would draw nothing sensible.
    crops, _ = _batch(face, 1)
    for kwargs in (dict(quality=(90, 40)), dict(quality=(0, 50)), dict(p=1.5)):
        with pytest.raises(ValueError):
            jpeg_augment(crops, np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError):
        jpeg_augment(crops.astype(np.float32), np.random.default_rng(0))
    for kwargs in (dict(rgb_shift=(10.0, -10.0)), dict(source_scale=(0.0, 1.0)), dict(blend_ratios=()),
                   dict(downscale_factor=(0.5, 1.5))):
        with pytest.raises(ValueError):
            SelfBlendConfig(**kwargs)
