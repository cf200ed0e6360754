"""Latent arithmetic on Glow latents: invertibility on real crops, means, attribute vectors, edits and both
expression transfers, each against values computed by hand on flattened latents."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from flowood_ray.models import glow_latent as gl
from flowood_ray.models.glow import Glow, GlowConfig, postprocess, preprocess

CONFIG = GlowConfig(image_size=16, levels=2, steps_per_level=2, hidden_channels=16)


def face_crops(n: int) -> torch.Tensor:
    """uint8 (n, 16, 16, 3) crops of the astronaut's face, shifted a few pixels each."""
    photo = skimage.data.astronaut()
    crops = [cv2.resize(photo[20 + 4 * i : 260 + 4 * i, 140 + 3 * i : 380 + 3 * i], (16, 16), interpolation=cv2.INTER_AREA)
             for i in range(n)]
    return torch.from_numpy(np.stack(crops))


@pytest.fixture(scope="module")
def glow() -> Glow:
    """A random-init Glow whose ActNorm layers were initialised by one training-mode forward on crops."""
    torch.manual_seed(0)
    model = Glow(CONFIG).train()
    with torch.no_grad():
        model(preprocess(face_crops(8), dequantize="center"))
        # Zero-initialised priors and couplings would make parts of the flow the identity; perturb them.
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def random_latents(n: int, seed: int) -> gl.Latents:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=generator) for shape in Glow(CONFIG).latent_shapes]


def flat(latents: gl.Latents) -> np.ndarray:
    """Flattened by hand (not through the module), finest level first."""
    return np.concatenate([z.reshape(len(z), -1).numpy() for z in latents], axis=1).astype(np.float64)


@torch.no_grad()
def test_encode_then_decode_reproduces_crops(glow: Glow) -> None:
    """The flow is a bijection: decode(encode(x)) = x to float round-off, and exactly in grey levels."""
    crops = face_crops(6)
    x = preprocess(crops, dequantize="center")
    latents = glow.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == glow.latent_shapes
    x_back = glow.inverse(latents)
    assert (x_back - x).abs().max() < 1e-4
    assert torch.equal(postprocess(x_back), crops)


def test_flatten_and_unflatten_round_trip_in_level_order() -> None:
    """Catches levels concatenated in the wrong order or reshaped with a wrong stride."""
    latents = random_latents(3, 1)
    flattened = gl.flatten_latents(latents)
    np.testing.assert_array_equal(flattened.numpy(), flat(latents))
    for back, original in zip(gl.unflatten_latents(flattened, Glow(CONFIG).latent_shapes), latents, strict=True):
        assert torch.equal(back, original)
    with pytest.raises(ValueError, match="expected"):
        gl.unflatten_latents(flattened[:, 1:], Glow(CONFIG).latent_shapes)


def test_mean_of_two_latents_is_their_average_at_every_level() -> None:
    a, b = random_latents(1, 2), random_latents(1, 3)
    mean = gl.mean_latent(gl.concat_latents([a, b]))
    for level, za, zb in zip(mean, a, b, strict=True):
        assert level.shape == za.shape  # batch axis of 1: decodes and broadcasts as is
        torch.testing.assert_close(level, (za + zb) / 2, rtol=0, atol=1e-7)


def test_std_latent_is_the_bessel_corrected_spread() -> None:
    """Catches a population std (divides by n): the variance transfer's ratio depends on the convention
    only when identities have different numbers of frames, so it must be the documented one."""
    latents = random_latents(5, 4)
    np.testing.assert_allclose(flat(gl.std_latent(latents))[0], flat(latents).std(axis=0, ddof=1), rtol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        gl.std_latent(random_latents(1, 5))


def test_attribute_vector_is_positive_mean_minus_negative_mean() -> None:
    """Catches a reversed sign: the vector must point from the negatives to the positives."""
    positives, negatives = random_latents(3, 6), random_latents(2, 7)
    expected = flat(positives).mean(axis=0) - flat(negatives).mean(axis=0)
    np.testing.assert_allclose(flat(gl.attribute_vector(positives, negatives))[0], expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_edit_with_alpha_zero_is_the_identity(glow: Glow) -> None:
    x = preprocess(face_crops(3), dequantize="center")
    latents = glow.encode(x)
    vector = random_latents(1, 8)
    unchanged = gl.edit(latents, vector, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(unchanged, latents, strict=True))
    assert (glow.inverse(unchanged) - x).abs().max() < 1e-4
    np.testing.assert_allclose(flat(gl.edit(latents, vector, -1.5)), flat(latents) - 1.5 * flat(vector), atol=1e-5)


def test_transfer_with_alpha_zero_returns_the_target_mean() -> None:
    source, target = random_latents(4, 9), random_latents(3, 10)
    target_mean = gl.mean_latent(target)
    for out in (
        gl.transfer_linear(source, gl.mean_latent(source), target_mean, 0.0),
        gl.transfer_variance(source, gl.mean_latent(source), gl.std_latent(source), target_mean,
                             gl.std_latent(target), 0.0),
    ):
        assert gl.batch_size(out) == 4  # one output per source frame
        np.testing.assert_allclose(flat(out), np.repeat(flat(target_mean), 4, axis=0), atol=1e-6)


def test_linear_transfer_of_the_source_mean_gives_the_target_mean() -> None:
    """A neutral source frame carries no expression: any alpha lands on the target's neutral face."""
    source, target = random_latents(4, 11), random_latents(3, 12)
    source_mean, target_mean = gl.mean_latent(source), gl.mean_latent(target)
    out = gl.transfer_linear(source_mean, source_mean, target_mean, 1.3)
    np.testing.assert_allclose(flat(out), flat(target_mean), atol=1e-6)


def test_linear_transfer_matches_the_formula_full_and_halved() -> None:
    """Catches a missing or misplaced halving: z_OT = alpha (z_OS - z_MS) / 2 + z_MT."""
    source, target = random_latents(4, 13), random_latents(3, 14)
    zs, ms, mt = flat(source), flat(source).mean(axis=0), flat(target).mean(axis=0)
    source_mean, target_mean = gl.mean_latent(source), gl.mean_latent(target)
    full = gl.transfer_linear(source, source_mean, target_mean, 0.8)
    halved = gl.transfer_linear(source, source_mean, target_mean, 0.8, half=True)
    np.testing.assert_allclose(flat(full), 0.8 * (zs - ms) + mt, atol=1e-5)
    np.testing.assert_allclose(flat(halved), 0.8 * (zs - ms) / 2 + mt, atol=1e-5)


def test_variance_transfer_with_equal_spreads_equals_linear() -> None:
    source, target = random_latents(4, 15), random_latents(3, 16)
    source_mean, target_mean, spread = gl.mean_latent(source), gl.mean_latent(target), gl.std_latent(source)
    np.testing.assert_allclose(
        flat(gl.transfer_variance(source, source_mean, spread, target_mean, spread, 1.2)),
        flat(gl.transfer_linear(source, source_mean, target_mean, 1.2)), atol=1e-6,
    )


def test_variance_transfer_rescales_by_the_std_ratio() -> None:
    """Catches an inverted ratio or variances in place of standard deviations."""
    source, target = random_latents(5, 17), random_latents(4, 18)
    zs, zt = flat(source), flat(target)
    ms, mt = zs.mean(axis=0), zt.mean(axis=0)
    ss, st = zs.std(axis=0, ddof=1), zt.std(axis=0, ddof=1)
    eps = 0.05
    out = gl.transfer_variance(source, gl.mean_latent(source), gl.std_latent(source), gl.mean_latent(target),
                               gl.std_latent(target), 0.7, eps=eps)
    np.testing.assert_allclose(flat(out), 0.7 * (zs - ms) * (st + eps) / (ss + eps) + mt, rtol=1e-4, atol=1e-5)


def test_mismatched_latents_are_rejected() -> None:
    a = random_latents(2, 19)
    with pytest.raises(ValueError, match="number of levels"):
        gl.attribute_vector(a, a[:1])
    with pytest.raises(ValueError, match="shape"):
        gl.edit(a, [a[1], a[0]], 1.0)
    with pytest.raises(ValueError, match="eps"):
        gl.transfer_variance(a, a, a, a, a, 1.0, eps=0.0)
