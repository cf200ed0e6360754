"""Clip-level detection: clip windows, the clip family's phases and its scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_MODELS, phase_loss_before_and_after
from flowood_ray.media.clips import clip_starts, cut_clips, frame_means
from flowood_ray.models.catalog import build_modules, family, parse_configs
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.scorers import build_scorer, score_videos


@pytest.mark.parametrize("n_frames", range(1, 20))
@pytest.mark.parametrize("length", [1, 3, 4, 8])
def test_clip_windows_cover_every_frame_and_stay_inside_the_video(n_frames: int, length: int) -> None:
    starts = clip_starts(n_frames, length)
    covered = np.zeros(max(n_frames, length), bool)
    for start in starts:
        covered[start : start + length] = True
    assert covered[:n_frames].all()
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert max(starts) + length <= max(n_frames, length)


def test_short_videos_are_padded_with_their_last_frame_and_frame_means_average_the_windows() -> None:
    frames = np.arange(3)[:, None] * np.ones((1, 2))
    clips, starts = cut_clips(frames, 5)
    assert starts == [0] and clips.shape == (1, 5, 2)
    np.testing.assert_array_equal(clips[0, :, 0], [0, 1, 2, 2, 2])
    values = frame_means(np.array([1.0, 3.0, 5.0]), [0, 2, 3], 3, 6)
    np.testing.assert_allclose(values, [1, 1, 2, 4, 4, 5])
    with pytest.raises(ValueError):
        clip_starts(0, 4)


def test_the_clip_flow_takes_its_dimension_from_the_encoder() -> None:
    parsed = parse_configs("clip", {"encoder": {"encoder": {"embed_dim": 24}}, "flow": {"dim": 3, "n_layers": 2}})
    assert parsed["flow"].dim == 24 and parsed["flow"].n_layers == 2


@pytest.fixture
def clip_scorer():
    torch.manual_seed(0)
    modules = build_modules("clip", TINY_MODELS["clip"])
    clips = torch.randint(0, 256, (6, 4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        family("clip").phases[-1].loss(modules, {"image": clips}, None)  # ActNorm's data-dependent init
    configs = {k: v.model_dump() for k, v in parse_configs("clip", TINY_MODELS["clip"]).items()}
    return build_scorer(ModelBundle(family="clip", configs=configs, modules=modules, code_version="test", extra={}))


def test_a_videos_clip_scores_do_not_depend_on_the_other_videos_or_the_batch_size(clip_scorer) -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (17, 40, 40, 3), dtype=np.uint8)
    ids = np.array(["a"] * 9 + ["b"] * 2 + ["c"] * 6)
    together = score_videos(clip_scorer, crops, ids, batch_size=2)
    for vid in np.unique(ids):
        alone = clip_scorer.score(crops[ids == vid])
        for name in ("clip_nll", "clip_recon"):
            np.testing.assert_allclose(together[name][ids == vid], alone[name], rtol=1e-5, atol=1e-5)
    assert np.isfinite(together["clip_nll"]).all()


def test_clip_scores_follow_temporal_order(clip_scorer) -> None:
    rng = np.random.default_rng(1)
    still = np.repeat(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), 8, axis=0)
    moving = still.copy()
    moving[4:] = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = clip_scorer.score(still)["clip_nll"], clip_scorer.score(moving)["clip_nll"]
    # Frames 0-1 belong only to the first window (frames 0-3), which is the same in both videos.
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-5)
    assert not np.allclose(a[4:], b[4:])


def test_video_ids_must_be_contiguous(clip_scorer) -> None:
    crops = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="contiguous"):
        score_videos(clip_scorer, crops, np.array(["a", "b", "a"]), batch_size=4)


def test_the_clip_flow_phase_lowers_the_embedding_nll() -> None:
    torch.manual_seed(0)
    modules = build_modules("clip", TINY_MODELS["clip"])
    generator = torch.Generator().manual_seed(0)
    # Real-like clips: a fixed face pattern drifting slowly, plus noise.
    base = torch.randint(60, 200, (1, 1, 32, 32, 3), generator=generator)
    clips = (base + torch.randint(-20, 20, (32, 4, 1, 1, 1), generator=generator)).clamp(0, 255).to(torch.uint8)
    before, after = phase_loss_before_and_after("clip", -1, modules, {"image": clips}, steps=60)
    assert after < before - 0.5


def test_difference_input_ignores_a_clips_constant_appearance() -> None:
    configs = {**TINY_MODELS["clip"], "encoder": {**TINY_MODELS["clip"]["encoder"], "input": "differences"}}
    autoencoder = build_modules("clip", configs)["encoder"]
    rng = np.random.default_rng(2)
    motion = torch.from_numpy(rng.integers(0, 100, (2, 4, 32, 32, 3), dtype=np.uint8))
    shifted = motion + torch.from_numpy(rng.integers(0, 100, (2, 1, 32, 32, 3), dtype=np.uint8))
    x, y = autoencoder.prepare(motion), autoencoder.prepare(shifted)
    assert x.shape == (2, 3, 4, 32, 32)
    torch.testing.assert_close(x, y)
    assert (x[:, :, 0] == 0).all()
