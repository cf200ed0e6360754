"""The patch-texture density: high-pass patches, their log-densities, and its scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_MODELS, phase_loss_before_and_after
from flowood_ray.models.catalog import build_modules, parse_configs
from flowood_ray.models.patch_density import PatchDensity, PatchDensityConfig
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.scorers import build_scorer


@pytest.fixture
def density() -> PatchDensity:
    torch.manual_seed(0)
    return PatchDensity(PatchDensityConfig(image_size=16, patch=4, stride=3, n_layers=2, hidden=16)).eval()


def test_highpass_ignores_brightness_and_keeps_edges(density: PatchDensity) -> None:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(40, 200, (2, 16, 16, 3), dtype=np.uint8))
    brighter = image + 30
    torch.testing.assert_close(density.highpass(image), density.highpass(brighter), atol=1e-5, rtol=0)
    flat = torch.full((1, 16, 16, 3), 90, dtype=torch.uint8)
    assert density.highpass(flat).abs().max() < 1e-5
    edge = flat.clone()
    edge[:, :, 8:] = 180
    assert density.highpass(edge).abs().max() > 0.1


def test_patches_are_the_strided_windows_of_the_residual(density: PatchDensity) -> None:
    image = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    residual = density.highpass(image)[:, 0]
    patches = density.patches(image)
    assert density.grid == 5 and patches.shape == (2, 25, 16)
    for row in range(density.grid):
        for col in range(density.grid):
            window = residual[:, row * 3 : row * 3 + 4, col * 3 : col * 3 + 4].reshape(2, 16)
            torch.testing.assert_close(patches[:, row * density.grid + col], window)


def test_log_density_map_is_the_flow_of_each_patch(density: PatchDensity) -> None:
    image = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        maps = density(image)
        patches = density.patches(image)
        expected = torch.stack([density.flow.log_prob(patches[i]) for i in range(3)])
    assert maps.shape == (3, 5, 5)
    torch.testing.assert_close(maps.flatten(1), expected)


def test_inner_mask_is_the_central_half(density: PatchDensity) -> None:
    mask = density.inner_mask()
    # Patch centres 2, 5, 8, 11, 14: those within 4 px of the image centre (8) are 5, 8 and 11.
    expected = torch.tensor([False, True, True, True, False])
    assert torch.equal(mask, expected[:, None] & expected[None, :])


def test_training_lowers_the_patch_nll_and_the_scorer_is_batch_independent() -> None:
    torch.manual_seed(0)
    configs = TINY_MODELS["patch"]
    modules = build_modules("patch", configs)
    generator = torch.Generator().manual_seed(0)
    # Stripes of random phase: patches on a low-dimensional manifold that a trained flow concentrates on.
    phase_shift = torch.rand(24, 1, 1, 1, generator=generator) * 6.3
    columns = torch.arange(32).view(1, 1, 32, 1)
    stripes = 128 + 60 * torch.sin(columns * 1.3 + phase_shift) + 3 * torch.randn(24, 32, 32, 3, generator=generator)
    images = stripes.clamp(0, 255).to(torch.uint8)
    before, after = phase_loss_before_and_after("patch", 0, modules, {"image": images}, steps=40)
    assert after < before - 0.3

    parsed = {k: v.model_dump() for k, v in parse_configs("patch", configs).items()}
    bundle = ModelBundle(family="patch", configs=parsed, modules=modules, code_version="test",
                         extra={"entropy_patch_nll": 0.0})
    scorer = build_scorer(bundle)
    crops = images.numpy()
    together = scorer.score(crops)
    alone = [scorer.score(crops[i : i + 1]) for i in range(len(crops))]
    for name in ("patch_nll", "patch_nll_all", "patch_typicality"):
        np.testing.assert_allclose(together[name], np.concatenate([a[name] for a in alone]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together["patch_typicality"], np.abs(together["patch_nll"]))
    ids, video = scorer.aggregate(np.zeros(len(crops), dtype=np.int64), together)
    assert video["patch_typicality"][0] == pytest.approx(abs(together["patch_nll"].mean()))
