"""Invertible blocks: exact inverses and log-determinants equal to log|det J| from autograd."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flowood_ray.models.flow_blocks import (
    ActNorm,
    AffineCoupling,
    InvConv2d1x1,
    InvertibleBlock,
    MaskedAffineCoupling,
    SequentialFlow,
    Squeeze,
)

BlockCase = tuple[Callable[[], InvertibleBlock], tuple[int, ...], tuple[int, ...] | None]

CASES: dict[str, BlockCase] = {
    "actnorm_image": (lambda: ActNorm(2), (3, 2, 4, 4), None),
    "actnorm_vector": (lambda: ActNorm(4), (3, 4), None),
    "invconv_image": (lambda: InvConv2d1x1(3), (3, 3, 4, 4), None),
    "invconv_vector": (lambda: InvConv2d1x1(5), (3, 5), None),
    "coupling_sigmoid": (lambda: AffineCoupling(4, 8), (3, 4, 4, 4), None),
    "coupling_tanh_odd_channels": (lambda: AffineCoupling(3, 8, scale="tanh"), (3, 3, 4, 4), None),
    "coupling_conditional": (lambda: AffineCoupling(2, 8, cond_channels=2), (3, 2, 4, 4), (3, 2, 4, 4)),
    "masked_coupling": (lambda: MaskedAffineCoupling(torch.tensor([1, 0, 1, 0, 0]), 16), (3, 5), None),
    "masked_coupling_bottleneck_cond": (
        lambda: MaskedAffineCoupling(torch.tensor([0, 1, 1, 0]), 16, bottleneck=2, cond_dim=3),
        (3, 4),
        (3, 3),
    ),
    "squeeze": (lambda: Squeeze(), (3, 2, 4, 4), None),
    "glow_step": (
        lambda: SequentialFlow([Squeeze(), ActNorm(8), InvConv2d1x1(8), AffineCoupling(8, 8)]),
        (3, 2, 4, 4),
        None,
    ),
}


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator, std: float = 0.3) -> None:
    """Perturb every parameter so zero-initialised layers (identity couplings) become non-trivial."""
    for param in module.parameters():
        param.add_(std * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def build(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[InvertibleBlock, Tensor, Tensor | None]:
    """A block with initialised ActNorms and random weights in eval mode, an input and a condition."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    factory, shape, cond_shape = CASES[name]
    block = factory().to(dtype)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 2.0 + 0.5
    cond = None if cond_shape is None else torch.randn(cond_shape, generator=generator, dtype=dtype)
    block.train()
    block(x, cond)  # data-dependent ActNorm initialisation
    randomize_(block, generator)
    block.eval()
    return block, x, cond


def jacobian_logabsdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """log|det d fn(x) / dx| for one sample x of shape (1, ...), by dense autograd Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten(), vectorize=True)
    return torch.linalg.slogdet(jac).logabsdet


@pytest.mark.parametrize("name", CASES)
def test_inverse_of_forward_is_identity_float32(name: str) -> None:
    block, x, cond = build(name, torch.float32)
    with torch.no_grad():
        y, _ = block(x, cond)
        x_back, _ = block.inverse(y, cond)
        y_again, _ = block(x_back, cond)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(y_again, y, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    block, x, cond = build(name, torch.float64)
    y, logdet = block(x, cond)
    x_back, logdet_inverse = block.inverse(y, cond)
    assert logdet.shape == (x.shape[0],)
    assert logdet_inverse.shape == (x.shape[0],)
    for i in range(x.shape[0]):
        c = None if cond is None else cond[i : i + 1]
        expected = jacobian_logabsdet(lambda v, c=c: block(v, c)[0], x[i : i + 1])
        torch.testing.assert_close(logdet[i], expected, atol=1e-8, rtol=1e-8)
        expected_inverse = jacobian_logabsdet(lambda v, c=c: block.inverse(v, c)[0], y[i : i + 1])
        torch.testing.assert_close(logdet_inverse[i], expected_inverse, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(logdet_inverse, -logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["coupling_conditional", "masked_coupling_bottleneck_cond"])
def test_conditional_coupling_reads_the_condition(name: str) -> None:
    block, x, cond = build(name, torch.float64)
    assert cond is not None
    y1, _ = block(x, cond)
    y2, _ = block(x, cond + 1.0)
    assert (y1 - y2).abs().max() > 1e-3
    with pytest.raises(ValueError):
        block(x)


def test_actnorm_data_dependent_init_standardises_the_first_batch() -> None:
    torch.manual_seed(0)
    norm = ActNorm(3).train()
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.1, 2.0, 7.0]).view(1, 3, 1, 1) + torch.tensor([3.0, -1.0, 0.0]).view(
        1, 3, 1, 1
    )
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert int(norm.initialized) == 1
    loc, log_scale = norm.loc.detach().clone(), norm.log_scale.detach().clone()
    norm(torch.randn(16, 3, 5, 5) * 10)  # a second batch must not re-initialise
    torch.testing.assert_close(norm.loc.detach(), loc)
    torch.testing.assert_close(norm.log_scale.detach(), log_scale)


def test_actnorm_does_not_initialise_in_eval_mode() -> None:
    norm = ActNorm(2).eval()
    x = torch.randn(4, 2, 3, 3) * 5
    y, logdet = norm(x)
    assert int(norm.initialized) == 0
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(4))


def test_actnorm_init_flag_survives_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    trained = ActNorm(3).train()
    trained(torch.randn(32, 3, 4, 4) * 3 + 1)
    assert "initialized" in trained.state_dict()
    fresh = ActNorm(3)
    fresh.load_state_dict(trained.state_dict())
    fresh.train()
    other_batch = torch.randn(8, 3, 4, 4) * 0.01 - 5  # would give very different statistics
    torch.testing.assert_close(fresh(other_batch)[0], trained(other_batch)[0])
    assert int(fresh.initialized) == 1


def test_actnorm_rejects_constant_channels() -> None:
    x = torch.randn(8, 2)
    x[:, 1] = 3.0
    with pytest.raises(ValueError, match="constant"):
        ActNorm(2).train()(x)


def test_invconv_weight_is_orthogonal_at_init_and_inverse_weight_inverts_after_training() -> None:
    torch.manual_seed(0)
    conv = InvConv2d1x1(6).double()
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    randomize_(conv, torch.Generator().manual_seed(1))
    torch.testing.assert_close(conv.inverse_weight() @ conv.weight(), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.slogdet(conv.weight()).logabsdet, conv.log_s.sum())
    assert {"perm", "sign_s"} <= set(dict(conv.named_buffers()))


def test_coupling_identity_at_init_with_tanh_scale_and_glow_scale_with_sigmoid() -> None:
    x = torch.randn(2, 4, 3, 3)
    y, logdet = AffineCoupling(4, 8, scale="tanh")(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(2))
    y, logdet = AffineCoupling(4, 8, scale="sigmoid")(x)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))
    v = torch.randn(2, 6)
    y, logdet = MaskedAffineCoupling(torch.tensor([1, 0, 1, 0, 1, 0]), 8)(v)
    torch.testing.assert_close(y, v)
    torch.testing.assert_close(logdet, torch.zeros(2))


def test_masked_coupling_leaves_masked_entries_unchanged() -> None:
    block, x, _ = build("masked_coupling", torch.float64)
    y, _ = block(x)
    keep = torch.tensor([1, 0, 1, 0, 0]).bool()
    torch.testing.assert_close(y[:, keep], x[:, keep])
    assert (y[:, ~keep] - x[:, ~keep]).abs().min() > 0


def test_squeeze_groups_2x2_neighbourhoods_into_channels() -> None:
    x = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)
    y, logdet = Squeeze()(x)
    assert y.shape == (1, 8, 2, 2)
    torch.testing.assert_close(y[0, :4, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    torch.testing.assert_close(y[0, :4, 1, 1], torch.tensor([10.0, 11.0, 14.0, 15.0]))
    torch.testing.assert_close(y[0, 4:, 0, 0], torch.tensor([16.0, 17.0, 20.0, 21.0]))
    torch.testing.assert_close(logdet, torch.zeros(1))
