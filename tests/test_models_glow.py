"""Glow: exact likelihood (against autograd), invertibility, bits/dim constant, training, persistence."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flowood_ray.models.flow_blocks import ActNorm
from flowood_ray.models.glow import Glow, GlowConfig, postprocess, preprocess

TINY = GlowConfig(image_size=4, channels=3, levels=2, steps_per_level=2, hidden_channels=8)


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator, std: float) -> None:
    for param in module.parameters():
        param.add_(std * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def ready_model(config: GlowConfig, seed: int = 0, std: float = 0.05) -> Glow:
    """float64 Glow with ActNorm initialised on data and all (incl. zero-initialised) weights randomised."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Glow(config).double().train()
    with torch.no_grad():
        model(torch.rand(16, config.channels, config.image_size, config.image_size, dtype=torch.float64) - 0.5)
    randomize_(model, generator, std)
    return model.eval()


def flat_latents(model: Glow, x: Tensor) -> Tensor:
    return torch.cat([z.flatten(1) for z in model.encode(x)], dim=1)


def jacobian_logabsdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten(), vectorize=True)
    return torch.linalg.slogdet(jac).logabsdet


def test_latent_shapes_cover_every_dimension() -> None:
    model = Glow(GlowConfig(image_size=64, levels=3, steps_per_level=1, hidden_channels=4))
    assert model.latent_shapes == [(6, 32, 32), (12, 16, 16), (48, 8, 8)]
    assert sum(math.prod(shape) for shape in model.latent_shapes) == model.dim == 3 * 64 * 64


def test_log_prob_is_gaussian_latent_density_plus_autograd_logdet() -> None:
    """log p(x) = log N(eps; 0, I) + log|det d eps / dx| with eps all standardised latents."""
    model = ready_model(TINY)
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64) - 0.5
    log_prob = model.log_prob(x)
    for i in range(3):
        xi = x[i : i + 1]
        eps = flat_latents(model, xi)
        gaussian = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum()
        logdet = jacobian_logabsdet(lambda v: flat_latents(model, v), xi)
        torch.testing.assert_close(log_prob[i], gaussian + logdet, atol=1e-8, rtol=1e-10)


@pytest.mark.parametrize("learn_top_prior", [True, False])
def test_inverse_of_encode_is_identity(learn_top_prior: bool) -> None:
    config = GlowConfig(image_size=8, levels=3, steps_per_level=2, hidden_channels=8, learn_top_prior=learn_top_prior)
    model = ready_model(config).float()
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        latents = model.encode(x)
        torch.testing.assert_close(model.inverse(latents), x, atol=1e-4, rtol=0)
        z = [torch.randn(4, *shape) for shape in model.latent_shapes]
        for a, b in zip(model.encode(model.inverse(z)), z, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_log_prob_of_a_sample_does_not_depend_on_the_batch() -> None:
    model = ready_model(TINY).float()
    x = torch.rand(6, 3, 4, 4) - 0.5
    with torch.no_grad():
        together = model.log_prob(x)
        alone = torch.cat([model.log_prob(x[i : i + 1]) for i in range(6)])
        shuffled = model.log_prob(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, together, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(shuffled, together, atol=1e-4, rtol=1e-6)


def test_bits_per_dim_define_a_probability_over_discrete_images() -> None:
    """sum over all images of 2**(-D * bpd(centre)) = P(x in [-0.5, 0.5)^D), checked against sampling.

    A wrong discretisation constant (missing D*ln(n_bins), 2**n_bits - 1 bins, nats vs bits) moves the
    sum by a factor of 1.7 or more here.
    """
    config = GlowConfig(image_size=2, channels=1, levels=1, steps_per_level=2, hidden_channels=8, n_bits=3)
    model = ready_model(config)
    levels = torch.tensor(list(itertools.product(range(8), repeat=4)), dtype=torch.uint8)
    images = (levels * 32).view(-1, 2, 2, 1)  # every 3-bit image, stored as 8-bit values
    x = preprocess(images, n_bits=3, dequantize="center").double()
    with torch.no_grad():
        total = torch.exp2(-model.dim * model.bits_per_dim(x)).sum().item()
        samples = model.sample(20_000, generator=torch.Generator().manual_seed(0))
    inside = ((samples >= -0.5) & (samples < 0.5)).flatten(1).all(dim=1).double().mean().item()
    assert 0.2 < inside < 0.99  # the check is informative only if the cube holds neither all nor no mass
    assert total == pytest.approx(inside, abs=0.02)


def test_preprocess_bins_and_postprocess_round_trip() -> None:
    images = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8).view(1, 1, 5, 1).expand(2, 1, 5, 3)
    center = preprocess(images, dequantize="center")
    assert center.shape == (2, 3, 1, 5) and center.dtype == torch.float32
    expected = (torch.tensor([0.0, 1.0, 127.0, 128.0, 255.0]) + 0.5) / 256 - 0.5
    torch.testing.assert_close(center[0, 0, 0], expected)
    uniform = preprocess(images, dequantize="uniform", generator=torch.Generator().manual_seed(0))
    offset = (uniform - center) * 256
    assert offset.min() >= -0.5 and offset.max() < 0.5 and offset.std() > 0.2
    again = preprocess(images, dequantize="uniform", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, uniform)
    assert torch.equal(postprocess(uniform), images)
    assert torch.equal(postprocess(center), images)

    five_bit = preprocess(images, n_bits=5, dequantize="center")
    torch.testing.assert_close(five_bit[0, 0, 0], (torch.tensor([0.0, 0.0, 15.0, 16.0, 31.0]) + 0.5) / 32 - 0.5)
    assert torch.equal(postprocess(five_bit, n_bits=5), (images // 8) * 8)
    with pytest.raises(ValueError):
        preprocess(images.float())


def test_sample_is_reproducible_and_temperature_zero_decodes_the_prior_mean() -> None:
    model = ready_model(TINY).float()
    a = model.sample(3, generator=torch.Generator().manual_seed(5))
    b = model.sample(3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 3, 4, 4)
    torch.testing.assert_close(a, b)
    cold = model.sample(2, temperature=0.0)
    torch.testing.assert_close(cold[0], cold[1])
    zeros = [torch.zeros(1, *shape) for shape in model.latent_shapes]
    torch.testing.assert_close(cold[:1], model.inverse(zeros))


def test_config_json_rebuilds_the_model_and_actnorm_is_not_reinitialised() -> None:
    torch.manual_seed(0)
    model = Glow(TINY).train()
    with torch.no_grad():
        model(torch.rand(8, 3, 4, 4) - 0.5)
    config = GlowConfig.model_validate_json(model.config.model_dump_json())
    assert config == TINY
    fresh = Glow(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(int(m.initialized) == 1 for m in fresh.modules() if isinstance(m, ActNorm))
    # A training-mode forward on very different data must not redo the data-dependent init.
    other = torch.rand(4, 3, 4, 4) * 0.01 + 0.3
    with torch.no_grad():
        torch.testing.assert_close(fresh.train().log_prob(other), model.train().log_prob(other))


def test_config_rejects_sizes_that_do_not_divide() -> None:
    with pytest.raises(ValueError):
        GlowConfig(image_size=12, levels=3)


def _ramp_images(n: int, generator: torch.Generator) -> Tensor:
    """8x8 colour ramps: a random base colour plus a shared linear ramp in a random direction."""
    base = torch.rand(n, 3, 1, 1, generator=generator) * 120 + 60
    theta = torch.rand(n, 1, 1, 1, generator=generator) * 2 * math.pi
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = (torch.cos(theta) * (rows - 3.5) + torch.sin(theta) * (cols - 3.5)) * 8
    noise = torch.randint(-2, 3, (n, 3, 8, 8), generator=generator)
    images = (base + ramp + noise).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()


def test_training_lowers_bits_per_dim_below_init_and_a_diagonal_gaussian() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train, test = _ramp_images(512, generator), _ramp_images(256, generator)
    x_test = preprocess(test, generator=generator)
    x_train = preprocess(train, generator=generator)

    mean, var = x_train.mean(dim=0), x_train.var(dim=0)
    gauss_nll = 0.5 * ((x_test - mean).pow(2) / var + torch.log(2 * math.pi * var)).flatten(1).sum(dim=1)
    dim = x_test[0].numel()
    baseline_bpd = ((gauss_nll + dim * math.log(256)) / (dim * math.log(2))).mean().item()

    model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=2, hidden_channels=16)).train()
    with torch.no_grad():
        model(x_train[:256])
        initial_bpd = model.eval().bits_per_dim(x_test).mean().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(200):
        batch = train[torch.randint(0, len(train), (32,), generator=generator)]
        loss = model.bits_per_dim(preprocess(batch, generator=generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final_bpd = model.eval().bits_per_dim(x_test).mean().item()
    assert final_bpd < initial_bpd - 1.0
    assert final_bpd < baseline_bpd - 1.0
