"""Per-video aggregation equals a naive loop and ignores row order; typicality per clip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowood_ray.scoring.aggregate import aggregate_frames, typicality, typicality_by_video


def _random_frames(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, size=60)
    ids = np.repeat(np.array([f"vid{i:03d}" for i in range(sizes.size)]), sizes)
    # Rounded scores create ties, which a sort-based implementation must survive.
    scores = np.round(rng.normal(size=ids.size), 1)
    order = rng.permutation(ids.size)
    return ids[order], scores[order]


def _naive(ids: np.ndarray, scores: np.ndarray, method: str, **kw: float) -> dict[str, float]:
    out = {}
    for vid in np.unique(ids):
        frames = scores[ids == vid]
        if method == "mean":
            out[vid] = frames.mean()
        elif method == "max":
            out[vid] = frames.max()
        elif method == "topk":
            k = int(kw["k"]) if "k" in kw else max(1, math.ceil(kw.get("top_fraction", 0.25) * frames.size))
            out[vid] = np.sort(frames)[::-1][: min(k, frames.size)].mean()
        else:
            out[vid] = np.quantile(frames, kw.get("q", 0.9))
    return out


CASES = [
    ("mean", {}),
    ("max", {}),
    ("topk", {}),
    ("topk", {"top_fraction": 0.1}),
    ("topk", {"top_fraction": 1.0}),
    ("topk", {"k": 3}),
    ("quantile", {}),
    ("quantile", {"q": 0.0}),
    ("quantile", {"q": 0.37}),
    ("quantile", {"q": 1.0}),
]


@pytest.mark.parametrize(("method", "kw"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_a_naive_loop(method: str, kw: dict[str, float], seed: int) -> None:
    ids, scores = _random_frames(seed)
    unique_ids, video_scores = aggregate_frames(ids, scores, method, **kw)  # type: ignore[arg-type]
    expected = _naive(ids, scores, method, **kw)
    assert unique_ids.tolist() == sorted(expected)
    np.testing.assert_allclose(video_scores, [expected[v] for v in unique_ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("method", "kw"), CASES)
def test_invariant_to_row_order(method: str, kw: dict[str, float]) -> None:
    ids, scores = _random_frames(5)
    reference = aggregate_frames(ids, scores, method, **kw)  # type: ignore[arg-type]
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(ids.size)
        shuffled = aggregate_frames(ids[order], scores[order], method, **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(shuffled[0], reference[0])
        # Exact, not approximate: sorting first fixes the floating-point summation order.
        np.testing.assert_array_equal(shuffled[1], reference[1])


def test_integer_ids_single_frames_and_empty_input() -> None:
    ids, scores = aggregate_frames(np.array([7, 3, 7]), np.array([1.0, 5.0, 3.0]), "topk", k=10)
    assert ids.tolist() == [3, 7]
    assert scores.tolist() == [5.0, 2.0]
    empty_ids, empty_scores = aggregate_frames(np.array([], dtype=str), np.array([]), "max")
    assert empty_ids.size == 0 and empty_scores.size == 0


@pytest.mark.parametrize(
    ("ids", "scores", "kw", "message"),
    [
        (["a", "b"], [1.0, np.nan], {}, "NaN"),
        (["a", "b"], [1.0], {}, "equal length"),
        (["a"], [1.0], {"method": "median"}, "unknown aggregation"),
        (["a"], [1.0], {"method": "topk", "k": 0}, "k must be"),
        (["a"], [1.0], {"method": "quantile", "q": 1.5}, "q must"),
    ],
)
def test_refuses_bad_input(ids: list[str], scores: list[float], kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_frames(np.array(ids), np.array(scores), **kw)  # type: ignore[arg-type]


def test_typicality_flags_clips_on_either_side_of_the_entropy() -> None:
    typical, unlikely, too_likely = np.full(8, 3.0), np.full(8, 5.0), np.full(8, 1.5)
    result = typicality([typical + [0.1, -0.1] * 4, unlikely, too_likely], train_entropy=3.0)
    np.testing.assert_allclose(result, [0.0, 2.0, 1.5], atol=1e-12)
    np.testing.assert_allclose(typicality(np.array([[1.0, 3.0], [4.0, 4.0]]), 2.0), [0.0, 2.0])


def test_typicality_by_video_matches_the_per_clip_form() -> None:
    ids, nll = _random_frames(3)
    unique_ids, flat = typicality_by_video(ids, nll, train_entropy=0.05)
    clips = [nll[ids == vid] for vid in unique_ids]
    np.testing.assert_allclose(flat, typicality(clips, 0.05), rtol=1e-12, atol=1e-12)


def test_typicality_refuses_empty_or_unscored_clips() -> None:
    with pytest.raises(ValueError, match="no frames"):
        typicality([np.array([1.0]), np.array([])], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        typicality([np.array([1.0, np.nan])], 1.0)
    with pytest.raises(ValueError, match="finite"):
        typicality([np.array([1.0])], float("nan"))
