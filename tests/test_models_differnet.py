"""DifferNet: the transforms against an independent NumPy/SciPy implementation, the multi-transform
score, the back-propagated map against finite differences, batch independence, and the flow head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import TINY_MODELS, phase_loss_before_and_after
from flowood_ray.models.catalog import build_modules, parse_configs
from flowood_ray.models.differnet import (
    SCORING_TRANSFORMS, CropTransform, DifferNetConfig, DifferNetFlow, gradient_map, multi_transform_nll,
    pooled_features, random_transforms, transform_crops, unit_float,
)
from flowood_ray.models.flow_blocks import InvConv2d1x1, MaskedAffineCoupling
from flowood_ray.registry import ModelBundle, load_bundle, save_bundle
from flowood_ray.scoring.scorers import build_scorer
from test_models_cflow import face_crops

TINY = TINY_MODELS["differnet"]
LUMA = np.array([0.299, 0.587, 0.114])


def numpy_transform(crop: np.ndarray, t: CropTransform) -> np.ndarray:
    """float (H, W, 3) in [0, 1] -> the transformed crop, written independently of the torch code: flip,
    counter-clockwise rotation about the centre by inverse-mapped bilinear sampling with replicated
    borders, brightness factor, contrast about the mean grey level, clip."""
    x = crop[:, ::-1] if t.flip else crop
    if t.degrees:
        h, w = x.shape[:2]
        cy, cx = (h - 1) / 2, (w - 1) / 2
        rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
        a = math.radians(t.degrees)
        dx, dy = cols - cx, rows - cy
        # A counter-clockwise turn (y pointing down) moves offset (dx, dy) to (dx cos + dy sin, -dx sin + dy cos);
        # each output pixel reads the input where the inverse turn takes it.
        src_cols, src_rows = cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a)
        x = np.stack([ndimage.map_coordinates(x[..., c], [src_rows, src_cols], order=1, mode="nearest")
                      for c in range(3)], axis=-1)
    x = x * t.brightness
    grey = (x @ LUMA).mean()
    return np.clip(grey + t.contrast * (x - grey), 0.0, 1.0)


def ready_modules(config: dict = TINY, crops: np.ndarray | None = None, seed: int = 0) -> dict:
    """Modules with ActNorm initialised on real crops and couplings moved off their identity init."""
    torch.manual_seed(seed)
    modules = build_modules("differnet", config)
    crops = face_crops(8, config["differnet"]["image_size"]) if crops is None else crops
    flow = modules["differnet"]
    with torch.no_grad():
        flow.train()(pooled_features(modules["encoder"], torch.from_numpy(crops)))
        generator = torch.Generator().manual_seed(seed)
        for param in flow.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    flow.eval()
    return modules


def bundle_of(modules: dict, config: dict = TINY) -> ModelBundle:
    return ModelBundle("differnet", {k: v.model_dump(mode="json") for k, v in parse_configs("differnet", config).items()},
                       modules)


def test_every_transform_matches_an_independent_implementation() -> None:
    """Catches degrees read as radians, a clockwise turn, rotation about a corner, a vertical flip,
    additive brightness, contrast about each channel's own mean, and a missing clip."""
    crops = face_crops(2, 32).astype(np.float64) / 255
    x = torch.from_numpy(crops).permute(0, 3, 1, 2)
    for t in (*SCORING_TRANSFORMS, CropTransform(degrees=90.0), CropTransform(True, -20.0, 1.3, 0.6)):
        got = transform_crops(x, *t).permute(0, 2, 3, 1).numpy()
        for i in range(2):
            np.testing.assert_allclose(got[i], numpy_transform(crops[i], t), atol=1e-9, err_msg=str(t))
    # A dot right of the centre ends up above it after +90 degrees (counter-clockwise as displayed).
    dot = torch.zeros(1, 3, 9, 9, dtype=torch.float64)
    dot[..., 4, 7] = 1.0
    assert transform_crops(dot, False, 90.0, 1.0, 1.0)[0, 0].argmax().item() == 1 * 9 + 4
    # Each crop gets its own parameters.
    both = transform_crops(x, torch.tensor([True, False]), torch.tensor([0.0, 5.0]), 1.0,
                           torch.tensor([1.0, 0.9], dtype=torch.float64))
    np.testing.assert_allclose(both[1].permute(1, 2, 0).numpy(), numpy_transform(crops[1], CropTransform(False, 5.0, 1.0, 0.9)),
                               atol=1e-9)
    np.testing.assert_allclose(both[0].permute(1, 2, 0).numpy(), crops[0][:, ::-1], atol=1e-12)


def test_training_transforms_follow_the_generator_and_switch_off() -> None:
    """Catches transforms drawn from the global RNG (runs would not repeat) and a disabled transform still applied."""
    images = torch.from_numpy(face_crops(4, 32))
    config = DifferNetConfig(image_size=32)
    first = random_transforms(images, config, torch.Generator().manual_seed(3))
    assert torch.equal(first, random_transforms(images, config, torch.Generator().manual_seed(3)))
    assert not torch.allclose(first, random_transforms(images, config, torch.Generator().manual_seed(4)))
    assert not torch.allclose(first, unit_float(images))
    off = DifferNetConfig(image_size=32, train_flip=False, train_degrees=0.0, train_brightness=0.0, train_contrast=0.0)
    # Contrast 1 about the grey mean is the identity up to rounding.
    torch.testing.assert_close(random_transforms(images, off, torch.Generator().manual_seed(3)), unit_float(images),
                               atol=1e-6, rtol=0)


def test_score_is_the_mean_nll_of_the_individually_transformed_crops() -> None:
    """Catches a transform left out or repeated, a sum instead of a mean, a score per whole vector
    instead of per dimension, and a transform set that changes between calls."""
    modules = ready_modules()
    scorer = build_scorer(bundle_of(modules))
    crops = face_crops(3, 32)
    encoder, flow = modules["encoder"], modules["differnet"]
    expected = np.zeros(3)
    with torch.no_grad():
        for t in SCORING_TRANSFORMS:
            x = torch.from_numpy(np.stack([numpy_transform(c / 255.0, t) for c in crops])).permute(0, 3, 1, 2).float()
            maps = encoder.features(x)
            pooled = torch.cat([maps[8].mean((2, 3)), maps[16].mean((2, 3)), maps[32].mean((2, 3))], dim=1)
            assert pooled.shape[1] == 40 + 112 + 320
            expected -= flow.flow.log_prob(pooled).double().numpy() / pooled.shape[1] / len(SCORING_TRANSFORMS)
    scores = scorer.score(crops)["differnet_nll"]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert np.array_equal(scores, scorer.score(crops)["differnet_nll"])  # fixed transforms: same crop, same score
    with torch.no_grad():
        identity_only = -flow(torch.cat([m.mean((2, 3)) for m in encoder.features(torch.from_numpy(crops)).values()], 1))
    assert np.abs(scores - identity_only.numpy()).max() > 1e-3  # the transforms do change the score


def test_gradient_map_is_the_finite_difference_sensitivity_of_the_score() -> None:
    """In float64 with (almost) no smoothing, the map at a pixel is sum_c |d score / d x_c|: checked
    against central differences, and the pixel with the largest map value is the one whose change
    raises the score most. Catches a gradient of the identity transform only, a flipped or rotated
    map, a signed map, and a channel mean instead of a sum."""
    config = {"differnet": {**TINY["differnet"], "strides": [8], "map_sigma": 0.1}}  # off-centre taps: exp(-50)
    modules = ready_modules(config)
    encoder, flow = modules["encoder"].double(), modules["differnet"].double()
    crop = torch.from_numpy(face_crops(1, 32)).permute(0, 3, 1, 2).double() / 255 * 0.9 + 0.05
    score, grad_map = gradient_map(encoder, flow, crop)
    with torch.no_grad():
        torch.testing.assert_close(score, multi_transform_nll(encoder, flow, crop))
    order = grad_map[0].flatten().argsort()
    pixels = [divmod(order[i].item(), 32) for i in (-1, len(order) // 2, len(order) // 10)]
    h = 1e-6  # small enough that no ReLU6 kink lies within +-h of the crop (1e-5 crosses one here)
    # Every crop's score is its own, so all perturbed copies go through in one batch.
    steps = torch.zeros(len(pixels) * 6, *crop.shape[1:], dtype=torch.float64)
    for i, (r, c) in enumerate(pixels):
        for channel in range(3):
            steps[6 * i + 2 * channel, channel, r, c] = h
            steps[6 * i + 2 * channel + 1, channel, r, c] = -h
    with torch.no_grad():
        shifted = multi_transform_nll(encoder, flow, crop + steps).view(len(pixels), 3, 2)
    partials = (shifted[..., 0] - shifted[..., 1]) / (2 * h)  # (pixel, channel)
    expected = partials.abs().sum(dim=1)
    got = torch.stack([grad_map[0, r, c] for r, c in pixels])
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0)
    pushes = torch.zeros(len(pixels), *crop.shape[1:], dtype=torch.float64)
    for i, (r, c) in enumerate(pixels):
        pushes[i, :, r, c] = 10 * h * partials[i].sign()
    with torch.no_grad():
        rises = (multi_transform_nll(encoder, flow, crop + pushes) - score).tolist()
    assert rises[0] > rises[1] > rises[2] > 0


def test_a_crops_map_and_score_do_not_depend_on_its_batch_and_the_bundle_keeps_no_imagenet_copy(tmp_path) -> None:
    """Catches a batch statistic anywhere (an encoder left in train mode), gradients mixed between crops,
    a negative map, a map not resized to the crops, and ImageNet weights copied into the bundle."""
    modules = ready_modules()
    bundle = bundle_of(modules)
    scorer = build_scorer(bundle)
    crops = face_crops(6, 48)  # scored at 32 px, mapped back to 48
    alone_scores, alone_map = scorer.score_and_map(crops[:1])
    batch_scores, batch_map = scorer.score_and_map(crops[[3, 0, 5]])
    assert alone_map.shape == (1, 48, 48) and alone_map.min() >= 0 and alone_map.max() > 0
    np.testing.assert_allclose(batch_map[1], alone_map[0], rtol=1e-4, atol=1e-7 * alone_map.max())
    np.testing.assert_allclose(batch_scores["differnet_nll"][1], alone_scores["differnet_nll"][0], rtol=1e-5)
    np.testing.assert_allclose(scorer.score(crops[[3, 0, 5]])["differnet_nll"], batch_scores["differnet_nll"], rtol=1e-5)
    assert not any(p.grad is not None for p in modules["differnet"].parameters())  # scoring leaves no gradients

    save_bundle(bundle, tmp_path / "bundle")
    assert set(torch.load(tmp_path / "bundle" / "weights.pt", weights_only=True)) == {"differnet"}
    reloaded = build_scorer(load_bundle(tmp_path / "bundle"))
    np.testing.assert_allclose(reloaded.score(crops[:1])["differnet_nll"], alone_scores["differnet_nll"], rtol=1e-6)


def test_flow_head_log_prob_is_base_density_plus_autograd_logdet() -> None:
    """The head is the LU-mixing, soft-clamped RealNVP and its density is exact (the RealNVP test's check)."""
    torch.manual_seed(0)
    head = DifferNetFlow(DifferNetConfig(strides=(8,), coupling_layers=2, hidden=16)).double()
    blocks = list(head.flow.flow.blocks)
    assert any(isinstance(b, InvConv2d1x1) for b in blocks)
    assert all(b.clamp == 3.0 and b.scale == "tanh" for b in blocks if isinstance(b, MaskedAffineCoupling))
    head.train()(torch.randn(64, 40, dtype=torch.float64) * 2 + 1)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.1 * torch.randn_like(param))
    head.eval()
    x = torch.randn(2, 40, dtype=torch.float64)
    per_dim = head(x)
    for i in range(2):
        z = head.flow(x[i : i + 1])[0][0]
        jac = torch.autograd.functional.jacobian(lambda v: head.flow(v[None])[0][0], x[i])
        expected = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum() + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(per_dim[i] * 40, expected, atol=1e-9, rtol=1e-10)


def test_training_lowers_the_nll_of_real_crops() -> None:
    torch.manual_seed(0)
    modules = build_modules("differnet", TINY)
    batch = {"image": torch.from_numpy(face_crops(8, 32)), "label": torch.zeros(8)}
    before, after = phase_loss_before_and_after("differnet", 0, modules, batch, steps=20, lr=2e-4, seed=0)
    assert after < before - 0.3, (before, after)


def test_config_refuses_strides_the_encoder_cannot_give() -> None:
    with pytest.raises(ValueError, match="strides"):
        DifferNetConfig(strides=(8, 12))
