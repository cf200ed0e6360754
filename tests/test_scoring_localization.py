"""Pixel AUROC and AUPRO against hand computations and brute-force references, and the per-method table."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from flowood_ray.scoring.localization import aupro, localization_table, pixel_auroc


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """Every distinct value as a threshold, regions labelled image by image, and the piecewise-linear
    curve integrated segment by segment, the segment crossing max_fpr cut at it."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, n_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == k) for k in range(1, n_regions + 1)]
    negatives = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        flagged = maps >= threshold
        fpr = (flagged & negatives).sum() / negatives.sum()
        pro = np.mean([(flagged[index] & region).sum() / region.sum() for index, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / max_fpr


def _random_blob_masks(rng: np.random.Generator, n_images: int, size: int) -> np.ndarray:
    """Random overlapping disks; the first image stays empty, like a real image in the pool."""
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    for mask in masks[1:]:
        for _ in range(rng.integers(1, 4)):
            centre_row, centre_col = rng.integers(0, size, 2)
            radius = rng.uniform(0.5, 4.0)
            mask |= (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius**2
    return masks


def test_pixel_auroc_by_hand() -> None:
    # Positives 0.9, 0.8 and 0.3 (B); negatives 0.2, 0.4, 0.1 (A) and 0.3, 0.1 (B): 15 pairs.
    # 0.9 and 0.8 beat all 5 negatives (10); 0.3 beats 0.2, 0.1, 0.1 (3), ties 0.3 (0.5), loses to 0.4.
    # AUROC = 13.5 / 15 = 0.9. A wrong sign gives 0.1, counting ties as losses 13/15, as wins 14/15,
    # and averaging per-image AUROCs (A: 1, B: 3.5/4) gives 0.9375 instead of pooling the pixels.
    masks = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 0]]])
    maps = np.array([[[0.9, 0.2], [0.4, 0.1]], [[0.3, 0.8], [0.3, 0.1]]])
    assert pixel_auroc(masks, maps) == pytest.approx(0.9, abs=1e-12)
    assert pixel_auroc(masks.astype(bool), -maps) == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_auroc_matches_scikit_learn(decimals: int | None) -> None:
    # scikit-learn's independent implementation; rounding makes many ties, which a threshold per pixel
    # instead of per distinct value would get wrong. float32 maps must not be upcast wrongly either.
    rng = np.random.default_rng(3)
    masks = _random_blob_masks(rng, 5, 24)
    maps = (masks + rng.normal(0.0, 1.0, masks.shape)).astype(np.float32)
    if decimals is not None:
        maps = np.round(maps, decimals)
    expected = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    # Region A = (0,0), (0,1), (1,2): its last pixel touches the others only diagonally. Region B =
    # (3,5), one pixel. 20 negatives, so each flagged negative adds 0.05 to the FPR.
    masks = np.zeros((1, 4, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = masks[0, 3, 5] = True
    maps = np.zeros((1, 4, 6))
    maps[0, 0] = [10, 10, 9, 8, 6, 5]
    maps[0, 1] = [4, 3, 7, 3, 3, 0]
    maps[0, 3, 5] = 3
    return masks, maps


def test_aupro_by_hand() -> None:
    # Curve (FPR, PRO): (0, 0); score 10 flags 2/3 of A: (0, 1/3); 9, 8: (0.10, 1/3); 7 completes A:
    # (0.10, 1/2); 6, 5, 4: (0.25, 1/2), the 0.5 plateau; 3 flags B with three tied negatives at once:
    # (0.40, 1); 0: (1, 1). At 0.30 the last segment gives 1/2 + (0.05 / 0.15) * 1/2 = 2/3.
    # Area = 0.10 * 1/3 + 0.15 * 1/2 + 0.05 * (1/2 + 2/3) / 2 = 8/240 + 18/240 + 7/240 = 11/80,
    # divided by 0.3: 11/24. Catches 4-connectivity (A splits: 61/108), pixel recall instead of the
    # region mean, stopping at the last point below 0.3 without interpolating (0.361), no
    # normalisation (0.1375), and splitting the tie at score 3 into one threshold per pixel.
    masks, maps = _two_region_case()
    assert aupro(masks, maps) == pytest.approx(11 / 24, abs=1e-12)


def test_aupro_perfect_and_inverted_maps() -> None:
    # A perfect map reaches PRO 1 at FPR 0: 1.0 at any limit, which catches dividing by the wrong
    # limit; an inverted map flags every negative before any region: exactly 0 (catches a sign flip).
    masks, _ = _two_region_case()
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, perfect, max_fpr=0.05) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, 1.0 - perfect) == pytest.approx(0.0, abs=1e-12)


def test_aupro_weighs_regions_equally() -> None:
    # A 100-pixel region found and a 1-pixel region missed (scored below all 299 negatives): PRO is
    # 1/2 from FPR 0 to 1, so AUPRO = 0.5, while pixel recall over that range and pixel AUROC are
    # 100/101. Catches weighting regions by their size.
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 2:12, 2:12] = True
    masks[0, 17, 17] = True
    maps = np.zeros((1, 20, 20))
    maps[0, 2:12, 2:12] = 1.0
    maps[0, 17, 17] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(100 / 101, abs=1e-12)


@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("decimals", [None, 1])
def test_aupro_matches_brute_force(max_fpr: float, decimals: int | None) -> None:
    # Blobs overlap across images at the same positions, so labelling the stack as one 3-D volume
    # would merge regions of different images; rounding makes ties, which must switch together.
    rng = np.random.default_rng(7)
    masks = _random_blob_masks(rng, 5, 20)
    maps = masks * 1.0 + rng.normal(0.0, 0.8, masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    assert aupro(masks, maps, max_fpr) == pytest.approx(_brute_force_aupro(masks, maps, max_fpr), abs=1e-9)


def test_infinite_scores_keep_their_order() -> None:
    # +inf ties a mask pixel with a background pixel: a tie test based on differences (inf - inf =
    # NaN) would split the tie into two thresholds and change both areas.
    masks, maps = _two_region_case()
    maps[0, 0, 0] = maps[0, 0, 2] = np.inf
    maps[0, 2, 0] = -np.inf
    finite = np.nan_to_num(maps, posinf=1e6, neginf=-1e6)
    assert pixel_auroc(masks, maps) == pytest.approx(pixel_auroc(masks, finite), abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(aupro(masks, finite), abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(_brute_force_aupro(masks, maps, 0.3), abs=1e-12)


def test_table_per_method_includes_all_reals() -> None:
    # 2x2 images; each fake has its top-left pixel manipulated. "good" scores it 1, "bad" only 0.5,
    # below the 0.6 that a real image scores one of its pixels. Negatives: 3 per fake, 4 per real.
    # good (11 negatives): 1.0 and 1.0. bad (11 negatives, 0.6 above the positive): AUROC 10/11;
    # curve (0,0), (1/11, 0), (1/11, 1), (1, 1): AUPRO (0.3 - 1/11) / 0.3 = 23/33.
    # all (14 negatives): AUROC (14 + 13) / 28 = 27/28; curve (0, 1/2), (1/14, 1/2), (1/14, 1):
    # AUPRO (0.5/14 + 0.3 - 1/14) / 0.3 = 37/42. Without the reals "bad" would score 1.0.
    masks = np.zeros((4, 2, 2), dtype=bool)
    masks[[0, 2], 0, 0] = True
    maps = np.zeros((4, 2, 2))
    maps[0, 0, 0], maps[1, 0, 0], maps[2, 0, 0] = 0.5, 0.6, 1.0
    table = localization_table(masks, maps, ["bad", "real", "good", "real"])
    assert list(table) == ["all", "bad", "good"]
    expected = {"all": (27 / 28, 37 / 42, 4), "bad": (10 / 11, 23 / 33, 3), "good": (1.0, 1.0, 3)}
    for subset, (auroc_value, aupro_value, images) in expected.items():
        row = table[subset]
        assert row["pixel_auroc"] == pytest.approx(auroc_value, abs=1e-12), subset
        assert row["aupro"] == pytest.approx(aupro_value, abs=1e-12), subset
        assert (row["images"], row["reason"]) == (images, None), subset


def test_table_method_without_manipulated_pixels_is_nan() -> None:
    # Same convention as metrics.evaluate_table: a subset without positives is NaN with a reason
    # instead of an exception, so the other methods still get their values.
    masks = np.zeros((3, 2, 2), dtype=bool)
    masks[2, 0, 0] = True
    maps = np.zeros((3, 2, 2))
    maps[2, 0, 0] = 1.0
    table = localization_table(masks, maps, ["real", "blank", "found"])
    assert math.isnan(table["blank"]["pixel_auroc"]) and math.isnan(table["blank"]["aupro"])
    assert table["blank"]["reason"] == "no fake samples"
    assert table["found"]["pixel_auroc"] == table["found"]["aupro"] == 1.0


def test_table_rejects_inconsistent_labels() -> None:
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[1, 0, 0] = True
    maps = np.zeros((2, 2, 2))
    with pytest.raises(ValueError, match="must have empty masks"):
        localization_table(masks, maps, ["real", "real"])
    with pytest.raises(ValueError, match="3 method labels for 2 images"):
        localization_table(masks, maps, ["real", "x", "y"])
    with pytest.raises(ValueError, match="max_fpr"):
        localization_table(masks, maps, ["real", "x"], max_fpr=0.0)


_GOOD_MASKS = np.array([[[1, 0], [0, 0]]])
_GOOD_MAPS = np.array([[[0.9, 0.1], [0.2, 0.3]]])


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.zeros((1, 2, 2)), _GOOD_MAPS, "no fake samples"),
        (np.ones((1, 2, 2)), _GOOD_MAPS, "no real samples"),
        (np.zeros((0, 2, 2)), np.zeros((0, 2, 2)), "no samples"),
        (_GOOD_MASKS, np.zeros((1, 2, 3)), "of one shape"),
        (_GOOD_MASKS[0], _GOOD_MAPS[0], r"\(N, H, W\)"),
        (_GOOD_MASKS, np.where(_GOOD_MASKS == 1, np.nan, _GOOD_MAPS), "NaN"),
        (_GOOD_MASKS * 2, _GOOD_MAPS, "binary"),
        (_GOOD_MASKS * 0.5, _GOOD_MAPS, "binary"),
        (_GOOD_MASKS, _GOOD_MAPS.astype(str), "real numbers"),
    ],
)
def test_bad_inputs_raise(
    metric: Callable[[np.ndarray, np.ndarray], float], masks: np.ndarray, maps: np.ndarray, message: str
) -> None:
    # Single-class pixels have no curve: unlike a table subset, a direct call gets an error, not NaN.
    with pytest.raises(ValueError, match=message):
        metric(masks, maps)


@pytest.mark.parametrize("max_fpr", [0.0, -0.1, 1.5, float("nan")])
def test_aupro_rejects_max_fpr_outside_unit_interval(max_fpr: float) -> None:
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(_GOOD_MASKS, _GOOD_MAPS, max_fpr)
