"""Restoration anomaly maps (document 002): weighting, pooling, seeding, prior passes, both restoration
modes, localisation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from flowood_ray.models.glow import preprocess
from flowood_ray.models.vqvae import VQVAE, PixelSNAIL, PixelSNAILConfig, VQVAEConfig
from flowood_ray.scoring.restoration import (
    RestorationMode,
    image_scores,
    prior_passes_used,
    restoration_map,
    restoration_weights,
    smooth_map,
    weighted_residual_map,
)

TINY_VQ = VQVAEConfig(
    image_size=16, hidden_channels=16, res_channels=8, n_res_blocks=1, codebook_size=16, code_dim=4
)  # 16x16 crops -> 4x4 code maps
TINY_PRIOR = PixelSNAILConfig(
    num_codes=16, height=4, width=4, channels=16, n_blocks=1, n_res_blocks=1, n_heads=2, key_channels=8
)
CODE_POSITIONS = TINY_PRIOR.height * TINY_PRIOR.width


def untrained_models(seed: int = 0) -> tuple[VQVAE, PixelSNAIL]:
    torch.manual_seed(seed)
    return VQVAE(TINY_VQ).eval(), PixelSNAIL(TINY_PRIOR).eval()


def varied_code_models() -> tuple[VQVAE, PixelSNAIL]:
    """Untrained models whose codebook is made of encoder outputs, as the quantizer's dead-code restarts
    make it: the default random codebook maps every random crop to one code."""
    vqvae, prior = untrained_models()
    with torch.no_grad():
        outputs = vqvae.encoder(random_crops(8, seed=99)).permute(0, 2, 3, 1).reshape(-1, TINY_VQ.code_dim)
        picks = torch.randperm(len(outputs), generator=seeded(0))[: TINY_VQ.codebook_size]
        vqvae.quantizer.embedding.copy_(outputs[picks])
    return vqvae, prior


def random_crops(n: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return preprocess(torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=generator), 8, "center")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def prior_inputs(prior: PixelSNAIL) -> Iterator[list[Tensor]]:
    """The code maps of every prior forward made inside the block, recorded by a forward pre-hook."""
    seen: list[Tensor] = []
    handle = prior.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


MODES: tuple[RestorationMode, ...] = ("parallel", "autoregressive")


# --- pure pieces ----------------------------------------------------------------------------------


def test_weighting_matches_a_hand_computation() -> None:
    images = torch.zeros(1, 1, 2, 2)
    close = torch.full((1, 1, 2, 2), 0.1)  # total L1 distance 0.4
    far = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # total L1 distance 1.0
    restorations = torch.stack([close, far], dim=1)
    raw, weights = weighted_residual_map(images, restorations, k=0.5)
    w_close = math.exp(0.5 / 0.4) / (math.exp(0.5 / 0.4) + math.exp(0.5 / 1.0))
    torch.testing.assert_close(weights, torch.tensor([[w_close, 1.0 - w_close]]))
    expected = torch.tensor([[[w_close * 0.1 + (1.0 - w_close) * 1.0, w_close * 0.1], [w_close * 0.1] * 2]])
    torch.testing.assert_close(raw, expected)
    # The default k is the reference code's k = 3 on the mean distance per element.
    _, default = weighted_residual_map(images, restorations)
    torch.testing.assert_close(default, torch.softmax(3.0 / torch.tensor([[0.4 / 4, 1.0 / 4]]), dim=1))


def test_residuals_are_summed_over_channels_and_perfect_restorations_share_the_weight() -> None:
    images = torch.zeros(1, 3, 2, 2)
    restorations = torch.stack([images, images.clone()], dim=1)
    restorations[:, :, :, 0, 0] = torch.tensor([0.1, 0.2, 0.3])
    raw, weights = weighted_residual_map(images, restorations)
    torch.testing.assert_close(raw, torch.tensor([[[0.6, 0.0], [0.0, 0.0]]]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]]))
    assert torch.equal(restoration_weights(torch.zeros(1, 3), 3.0), torch.full((1, 3), 1 / 3))


def test_min_pool_erases_an_isolated_pixel_and_keeps_a_blob() -> None:
    spike = torch.zeros(1, 16, 16)
    spike[0, 7, 7] = 5.0
    assert torch.equal(smooth_map(spike), torch.zeros(1, 16, 16))
    blob = torch.zeros(1, 16, 16)
    blob[0, 6:10, 6:10] = 1.0
    smoothed = smooth_map(blob)
    # Min-pool leaves the blob's 2x2 core; the 7x7 mean spreads it to 4/49 around the centre.
    torch.testing.assert_close(smoothed[0, 7:9, 7:9], torch.full((2, 2), 4 / 49))
    assert float(smoothed[0, 0, 0]) == 0.0


def test_pools_use_replicate_padding_so_a_flat_map_stays_flat() -> None:
    flat = torch.full((2, 9, 9), 0.25)
    assert torch.equal(smooth_map(flat), flat)


def test_image_scores_mean_and_top_fraction() -> None:
    pixel_map = torch.arange(200, dtype=torch.float32).view(2, 10, 10)
    torch.testing.assert_close(image_scores(pixel_map, "mean"), torch.tensor([49.5, 149.5]))
    torch.testing.assert_close(image_scores(pixel_map, "top", 0.01), torch.tensor([99.0, 199.0]))
    torch.testing.assert_close(image_scores(pixel_map, "top", 0.05), torch.tensor([97.0, 197.0]))
    with pytest.raises(ValueError):
        image_scores(pixel_map, "top", 0.0)


# --- restoration_map with untrained models ---------------------------------------------------------


def test_map_shapes_ranges_and_weights() -> None:
    vqvae, prior = untrained_models()
    images = random_crops(3)
    result = restoration_map(vqvae, prior, images, lambda_p=0.0, generator=seeded(0), keep_restorations=True)
    assert result.pixel_map.shape == (3, 16, 16) and result.pixel_map.dtype == torch.float32
    assert bool(torch.isfinite(result.pixel_map).all()) and float(result.pixel_map.min()) >= 0.0
    assert result.image_score.shape == (3,)
    assert result.restorations is not None and result.restorations.shape == (3, 5, 3, 16, 16)
    assert result.codes.shape == (3, 4, 4) and result.restored_codes.shape == (3, 5, 4, 4)
    torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(3))
    # lambda_p = 0 resamples every code, and an untrained prior rarely redraws the same one.
    assert bool((result.resampled_fraction > 0.5).all()) and bool((result.resampled_fraction <= 1.0).all())
    assert restoration_map(vqvae, prior, images, 0.0, generator=seeded(0)).restorations is None


@pytest.mark.parametrize("mode", MODES)
def test_nothing_above_lambda_p_gives_the_pooled_reconstruction_residual(mode: RestorationMode) -> None:
    vqvae, prior = untrained_models()
    images = random_crops(3)
    with prior_inputs(prior) as passes:
        result = restoration_map(vqvae, prior, images, math.inf, generator=seeded(0), keep_restorations=True,
                                 mode=mode)
    assert torch.equal(result.restored_codes, result.codes[:, None].expand(-1, 5, -1, -1))
    assert torch.equal(result.resampled_fraction, torch.zeros(3))
    assert len(passes) == 3  # only the initial forward of each crop's restorer call
    with torch.no_grad():
        reconstruction = vqvae.decode_codes(vqvae.encode(images))
    assert result.restorations is not None
    torch.testing.assert_close(result.restorations, reconstruction[:, None].expand(-1, 5, -1, -1, -1))
    expected = smooth_map((reconstruction - images).abs().sum(dim=1))
    torch.testing.assert_close(result.pixel_map, expected)


@pytest.mark.parametrize("batch_independent", [True, False])
@pytest.mark.parametrize("nll_quantile", [0.0, 0.5, 0.9])
def test_prior_passes_are_what_restore_promises(batch_independent: bool, nll_quantile: float) -> None:
    vqvae, prior = untrained_models()
    images = random_crops(4, seed=1)
    with torch.no_grad():
        lambda_p = float(prior.nll_map(vqvae.encode(images)).flatten().quantile(nll_quantile)) - 1e-6
    with prior_inputs(prior) as passes:
        result = restoration_map(vqvae, prior, images, lambda_p, 5, generator=seeded(3),
                                 batch_independent=batch_independent, mode="autoregressive")
    calls = 4 if batch_independent else 1
    assert len(passes) == prior_passes_used(result.codes, result.restored_codes, batch_independent)
    # At most one forward per code position and restore call, against 5 per position per crop naively.
    assert calls <= len(passes) <= calls * CODE_POSITIONS < 4 * 5 * CODE_POSITIONS


@pytest.mark.parametrize("batch_independent", [True, False])
def test_parallel_mode_makes_one_teacher_forced_prior_pass_per_call(batch_independent: bool) -> None:
    """Catches a per-position fallback and a pass over anything but the crops' own full code maps."""
    vqvae, prior = untrained_models()
    images = random_crops(3, seed=1)
    with prior_inputs(prior) as passes:
        result = restoration_map(vqvae, prior, images, 0.0, generator=seeded(3), batch_independent=batch_independent)
    expected = list(result.codes.split(1)) if batch_independent else [result.codes]
    assert len(passes) == len(expected)
    assert all(torch.equal(seen, codes) for seen, codes in zip(passes, expected, strict=True))
    assert bool((result.resampled_fraction > 0.5).all())  # lambda_p = 0: the pass did drive the draws


def test_parallel_mode_changes_only_codes_above_lambda_p() -> None:
    """Catches the threshold compared the wrong way, an NLL of the wrong position or of the restored
    codes, and a threshold that is not applied at all."""
    vqvae, prior = varied_code_models()
    images = random_crops(4, seed=6)
    with torch.no_grad():
        codes = vqvae.encode(images)
        nll = torch.cat([prior.nll_map(crop) for crop in codes.split(1)])  # the sample score's NLL map
    assert codes.unique().numel() > 8
    lambda_p = float(nll.flatten().quantile(0.7))
    result = restoration_map(vqvae, prior, images, lambda_p, 8, generator=seeded(2))
    above = (nll > lambda_p)[:, None].expand_as(result.restored_codes)
    changed = result.restored_codes != result.codes[:, None]
    assert torch.equal(result.codes, codes)
    assert not bool(changed[~above].any())
    # An untrained prior redraws another code most of the time: most codes above lambda_p did change.
    assert float(changed[above].float().mean()) > 0.6


def test_parallel_and_autoregressive_maps_agree_when_one_code_is_above_lambda_p() -> None:
    """Both modes draw that code from the same conditional with the crop's same uniforms. Catches a
    mode that seeds its crops differently or draws differently, and a parallel mode that is not the
    autoregressive one's approximation."""
    vqvae, prior = varied_code_models()
    crops = random_crops(8, seed=7)
    with torch.no_grad():
        nll = prior.nll_map(vqvae.encode(crops)).flatten(1)
    # A crop whose least likely code is its last one: the autoregressive mode then has no later code to
    # re-judge in a restored context, and with lambda_p between its two largest NLLs only that code is
    # above lambda_p in either mode.
    last = torch.nonzero(nll.argmax(dim=1) == CODE_POSITIONS - 1).flatten()
    assert last.numel() > 0
    image = crops[int(last[0]) : int(last[0]) + 1]
    lambda_p = float(nll[int(last[0])].topk(2).values.mean())
    results = [restoration_map(vqvae, prior, image, lambda_p, 8, generator=seeded(4), mode=mode,
                               keep_restorations=True) for mode in MODES]
    parallel, exact = results
    changed = parallel.restored_codes != parallel.codes[:, None]
    assert bool(changed.flatten(2).any(dim=1)[0, -1]) and int(changed.flatten(2).any(dim=1).sum()) == 1
    assert torch.equal(parallel.restored_codes, exact.restored_codes)
    assert torch.equal(parallel.pixel_map, exact.pixel_map) and torch.equal(parallel.weights, exact.weights)
    # Where codes above lambda_p follow each other the modes differ, but only after the first of them.
    lower = [restoration_map(vqvae, prior, image, 0.0, 8, generator=seeded(4), mode=mode) for mode in MODES]
    assert torch.equal(lower[0].restored_codes[..., 0, 0], lower[1].restored_codes[..., 0, 0])
    assert not torch.equal(lower[0].restored_codes, lower[1].restored_codes)


def test_unknown_mode_is_refused() -> None:
    vqvae, prior = untrained_models()
    with pytest.raises(ValueError, match="mode"):
        restoration_map(vqvae, prior, random_crops(1), 0.0, mode="greedy")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_a_crops_map_does_not_depend_on_its_batch_or_position(mode: RestorationMode) -> None:
    vqvae, prior = untrained_models()
    crops = random_crops(3, seed=2)
    alone = [restoration_map(vqvae, prior, crops[i : i + 1], 0.0, generator=seeded(5), mode=mode) for i in range(3)]
    together = restoration_map(vqvae, prior, crops, 0.0, generator=seeded(5), mode=mode)
    shuffled = restoration_map(vqvae, prior, crops[[2, 0, 1]], 0.0, generator=seeded(5), mode=mode)
    for i, single in enumerate(alone):
        assert torch.equal(together.restored_codes[i], single.restored_codes[0])
        assert torch.equal(together.pixel_map[i], single.pixel_map[0])
        assert torch.equal(shuffled.pixel_map[[1, 2, 0][i]], single.pixel_map[0])
        assert torch.equal(together.image_score[i], single.image_score[0])
    # The hazard this guards against: a shared generator gives the second crop other draws in a batch.
    shared = restoration_map(vqvae, prior, crops, 0.0, generator=seeded(5), batch_independent=False, mode=mode)
    shared_alone = restoration_map(vqvae, prior, crops[1:2], 0.0, generator=seeded(5), batch_independent=False,
                                   mode=mode)
    assert not torch.equal(shared.restored_codes[1], shared_alone.restored_codes[0])


def test_maps_are_deterministic_per_seed() -> None:
    vqvae, prior = untrained_models()
    images = random_crops(2, seed=4)
    first = restoration_map(vqvae, prior, images, 0.0, generator=seeded(9))
    again = restoration_map(vqvae, prior, images, 0.0, generator=seeded(9))
    other = restoration_map(vqvae, prior, images, 0.0, generator=seeded(10))
    assert torch.equal(first.pixel_map, again.pixel_map) and torch.equal(first.restored_codes, again.restored_codes)
    assert not torch.equal(first.restored_codes, other.restored_codes)


@pytest.mark.parametrize("mode", MODES)
def test_prior_in_training_mode_is_refused(mode: RestorationMode) -> None:
    vqvae, prior = untrained_models()
    with pytest.raises(ValueError, match="eval"):
        restoration_map(vqvae, prior.train(), random_crops(1), 0.0, mode=mode)


# --- localisation after brief training --------------------------------------------------------------


def gradient_crops(n: int, generator: torch.Generator) -> Tensor:
    """uint8 (N, 16, 16, 3): grey ramps, each running along rows or columns, up or down, from one of 3 levels."""
    ramp = torch.linspace(0.0, 60.0, 16)
    start = torch.tensor([50.0, 100.0, 150.0])[torch.randint(0, 3, (n,), generator=generator)]
    sign = torch.randint(0, 2, (n,), generator=generator) * 2.0 - 1.0
    images = start[:, None, None] + sign[:, None, None] * ramp[None, :, None].expand(n, 16, 16)
    along_columns = torch.rand(n, generator=generator) < 0.5
    images[along_columns] = images[along_columns].transpose(1, 2)
    return images.round().to(torch.uint8)[..., None].expand(n, 16, 16, 3).contiguous()


@pytest.fixture(scope="module")
def ramp_world() -> tuple[VQVAE, PixelSNAIL, Tensor, float]:
    """Models briefly trained on grey ramps, 4 unseen clean ramps (uint8) and lambda_p."""
    generator = torch.Generator().manual_seed(0)
    data = preprocess(gradient_crops(256, generator), 8, "center")
    # Module fixtures run outside conftest's one_torch_thread; two threads on the busy shared cores made
    # this training 20 times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vqvae, prior = train_briefly(data, generator)
    finally:
        torch.set_num_threads(previous)
    # Above every clean code's NLL: in a toy of 6 ramp kinds the first codes' marginal NLL alone tops
    # the 90th percentile the reference uses, which would resample whole crops, clean ones included.
    with torch.no_grad():
        lambda_p = float(prior.nll_map(vqvae.encode(data)).max())
    return vqvae, prior, gradient_crops(4, generator), lambda_p


def train_briefly(data: Tensor, generator: torch.Generator) -> tuple[VQVAE, PixelSNAIL]:
    torch.manual_seed(0)
    vqvae = VQVAE(TINY_VQ.model_copy(update={"dead_code_threshold": 0.5}))
    optimizer = torch.optim.Adam(vqvae.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _, _ = vqvae.loss(data[torch.randint(0, len(data), (32,), generator=generator)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vqvae.eval()
    with torch.no_grad():
        codes = vqvae.encode(data)
    prior = PixelSNAIL(TINY_PRIOR.model_copy(update={"dropout": 0.0}))
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(150):
        batch = codes[torch.randint(0, len(codes), (32,), generator=generator)]
        loss = F.cross_entropy(prior(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vqvae, prior.eval()


@pytest.mark.parametrize("mode", MODES)
def test_a_pasted_foreign_patch_lights_up_inside_and_not_outside(
    ramp_world: tuple[VQVAE, PixelSNAIL, Tensor, float], mode: RestorationMode
) -> None:
    vqvae, prior, clean, lambda_p = ramp_world
    patched = clean.clone()
    patched[:, 5:11, 5:11] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # a red square in a grey world
    result = restoration_map(vqvae, prior, preprocess(patched, 8, "center"), lambda_p, generator=seeded(0), mode=mode)
    reference = restoration_map(vqvae, prior, preprocess(clean, 8, "center"), lambda_p, generator=seeded(0),
                                mode=mode)

    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[5:11, 5:11] = True
    far = torch.ones(16, 16, dtype=torch.bool)
    far[2:14, 2:14] = False  # beyond the 7x7 mean pool's reach from the patch
    for pixel_map in result.pixel_map:
        assert float(pixel_map[inside].mean()) > 2.0 * float(pixel_map[far].mean())
    assert bool((result.resampled_fraction > 0).any())  # some patches' codes were restored
    assert torch.equal(reference.resampled_fraction, torch.zeros(4))  # clean crops keep their codes
    assert bool((result.image_score > reference.image_score).all())
