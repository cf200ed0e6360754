"""VQ-VAE codebook mechanics, PixelSNAIL causality and normalisation, and latent restoration."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from flowood_ray.models.flow_blocks import ActNorm
from flowood_ray.models.vqvae import (
    VQVAE,
    PixelSNAIL,
    PixelSNAILConfig,
    VectorQuantizer,
    VQVAEConfig,
)
from flowood_ray.models.vqvae_restore import restore, restore_parallel

TINY_VQ = VQVAEConfig(
    image_size=16, hidden_channels=16, res_channels=8, n_res_blocks=1, codebook_size=16, code_dim=4
)
TINY_PRIOR = PixelSNAILConfig(
    num_codes=5, height=3, width=4, channels=16, n_blocks=2, n_res_blocks=1, n_heads=2, key_channels=8
)


def prior_in_eval(config: PixelSNAILConfig = TINY_PRIOR, seed: int = 0) -> PixelSNAIL:
    torch.manual_seed(seed)
    return PixelSNAIL(config).double().eval()


def random_codes(n: int, config: PixelSNAILConfig, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.num_codes, (n, config.height, config.width), generator=generator)


# --- vector quantiser -----------------------------------------------------------------------------


def test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=10, dim=3).eval()
    z_e = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, commitment, codes = quantizer(z_e)
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat, quantizer.embedding).argmin(dim=1).view(2, 4, 5)
    assert torch.equal(codes, expected)
    torch.testing.assert_close(z_q.detach(), quantizer.lookup(codes))
    torch.testing.assert_close(commitment, F.mse_loss(z_e.detach(), quantizer.lookup(codes)))
    weight = torch.randn_like(z_q)
    (z_q * weight).sum().backward()
    torch.testing.assert_close(z_e.grad, weight)


def test_ema_update_moves_used_codes_to_the_mean_of_their_vectors_only_in_training() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=6, dim=2, decay=0.5, dead_code_threshold=0.0)
    z_e = torch.randn(4, 2, 3, 3)
    before = quantizer.embedding.clone()
    quantizer.eval()(z_e)
    assert torch.equal(quantizer.embedding, before)

    _, _, codes = quantizer.train()(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in codes.unique().tolist():
        assigned = flat[codes.flatten() == code]
        # Laplace smoothing shifts the result by O(eps); 1e-3 is far below any real error.
        torch.testing.assert_close(quantizer.embedding[code], assigned.mean(dim=0), atol=1e-3, rtol=1e-3)


def test_dead_codes_restart_on_encoder_outputs_and_get_used() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=8, dim=3, decay=0.99, dead_code_threshold=1.0)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.randn(8, 3) + 100.0)
        quantizer.embedding[0] = 0.0  # the only code near the data
    z_e = torch.randn(8, 3, 8, 8)
    _, _, codes = quantizer.eval()(z_e)
    assert codes.unique().tolist() == [0]

    quantizer.train()(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    distance_to_data = torch.cdist(quantizer.embedding[1:], flat).min(dim=1).values
    assert distance_to_data.max() < 1e-5  # every dead code now sits on an encoder output
    _, _, codes = quantizer.eval()(z_e)
    assert codes.unique().numel() >= 6


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each rank sees different data and makes different restart draws
    x = torch.randn(8, 3, 4, 4) * (rank + 1) + rank
    norm = ActNorm(3).train()
    norm(x)
    state = {"loc": norm.loc.detach(), "log_scale": norm.log_scale.detach()}
    # Threshold 0 exercises the pooled EMA statistics alone, threshold 1 the restarts as well.
    for threshold in (0.0, 1.0):
        torch.manual_seed(123)
        quantizer = VectorQuantizer(16, 3, dead_code_threshold=threshold).train()
        torch.manual_seed(rank)
        quantizer(torch.randn(4, 3, 4, 4) + rank)
        state |= {f"{name}@{threshold}": buffer for name, buffer in quantizer.named_buffers()}
    gathered = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    state["all_data"] = torch.cat(gathered)
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_keep_identical_actnorm_init_and_codebook_under_torch_distributed(tmp_path: Path) -> None:
    """Data-dependent init and EMA/restart updates happen inside forward; DDP would not resync them."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in set(first) - {"all_data"}:
        assert torch.equal(first[name], second[name]), name
    pooled = ActNorm(3).train()
    pooled(first["all_data"])  # one process seeing every rank's batch
    torch.testing.assert_close(first["loc"], pooled.loc.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first["log_scale"], pooled.log_scale.detach(), atol=1e-5, rtol=1e-5)


# --- VQ-VAE -------------------------------------------------------------------------------------


def _blob_images(n: int, generator: torch.Generator) -> Tensor:
    """16x16 images with a coloured square at a random place on a random background, in [-0.5, 0.5)."""
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 16, 16).clone() - 0.5
    for i in range(n):
        r, c = torch.randint(0, 10, (2,), generator=generator).tolist()
        images[i, :, r : r + 6, c : c + 6] = torch.rand(3, 1, 1, generator=generator) - 0.5
    return images


def test_vqvae_shapes_and_encode_agrees_with_forward() -> None:
    torch.manual_seed(0)
    model = VQVAE(TINY_VQ).eval()
    x = torch.rand(3, 3, 16, 16) - 0.5
    recon, vq_loss, codes = model(x)
    assert recon.shape == x.shape and vq_loss.dim() == 0
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert torch.equal(model.encode(x), codes)
    assert 0 <= int(codes.min()) and int(codes.max()) < TINY_VQ.codebook_size
    torch.testing.assert_close(model.decode_codes(codes), recon)
    rebuilt = VQVAE(VQVAEConfig.model_validate_json(TINY_VQ.model_dump_json()))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval().encode(x), codes)


def test_brief_training_reconstructs_better_and_uses_many_codes() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = _blob_images(128, generator)
    model = VQVAE(TINY_VQ.model_copy(update={"dead_code_threshold": 0.5}))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        initial = F.mse_loss(model.eval()(data)[0], data).item()
    model.train()
    for _ in range(100):
        loss, _, _ = model.loss(data[torch.randint(0, 128, (32,), generator=generator)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = F.mse_loss(model(data)[0], data).item()
        used = model.encode(data).unique().numel()
    assert final < 0.75 * initial
    assert used >= 8  # of 16: restarts keep the codebook in use


# --- PixelSNAIL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [True, False])
def test_prior_is_causal_and_uses_all_of_its_context_exhaustively(attention: bool) -> None:
    """Changing the code at raster position p changes no logits at positions <= p.

    With attention the receptive field is the whole past, so the logits at every later position must
    change too (this catches over-masking such as PixelCNN's blind spot).
    """
    config = TINY_PRIOR.model_copy(update={"attention": attention})
    prior = prior_in_eval(config)
    codes = random_codes(2, config)
    length = config.height * config.width
    with torch.no_grad():
        base = prior(codes).flatten(2)
        for position in range(length):
            row, col = divmod(position, config.width)
            affected = torch.zeros(length, dtype=torch.bool)
            for value in range(config.num_codes):
                if bool((codes[:, row, col] == value).all()):
                    continue
                changed = codes.clone()
                changed[:, row, col] = value
                diff = (prior(changed).flatten(2) - base).abs().amax(dim=(0, 1))
                assert diff[: position + 1].max() == 0.0, f"position {position} leaks into earlier logits"
                affected |= diff > 1e-9
            if attention:
                assert bool(affected[position + 1 :].all()), f"position {position} is ignored by later ones"
            elif position + 1 < length:
                assert bool(affected[position + 1]), f"position {position} is ignored by its successor"


def test_prior_probabilities_of_all_code_maps_sum_to_one() -> None:
    config = PixelSNAILConfig(num_codes=3, height=2, width=3, channels=8, n_blocks=1, n_res_blocks=1, n_heads=2,
                              key_channels=4)
    prior = prior_in_eval(config)
    every_map = torch.tensor(list(itertools.product(range(3), repeat=6))).view(-1, 2, 3)
    with torch.no_grad():
        total = torch.exp(-prior.nll_map(every_map).sum(dim=(1, 2))).sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), atol=1e-10, rtol=0)


def test_cropped_rows_give_the_same_logits_and_nll_is_cross_entropy() -> None:
    prior = prior_in_eval()
    codes = random_codes(3, TINY_PRIOR)
    with torch.no_grad():
        full = prior(codes)
        for rows in range(1, TINY_PRIOR.height + 1):
            torch.testing.assert_close(prior(codes[:, :rows]), full[:, :, :rows], atol=1e-12, rtol=0)
        nll = prior.nll_map(codes)
    expected = -full.log_softmax(dim=1).gather(1, codes[:, None]).squeeze(1)
    torch.testing.assert_close(nll, expected)


def test_prior_nll_of_a_map_does_not_depend_on_the_batch() -> None:
    prior = prior_in_eval().float()
    codes = random_codes(5, TINY_PRIOR)
    with torch.no_grad():
        together = prior.nll_map(codes)
        alone = torch.cat([prior.nll_map(codes[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_sample_is_reproducible_and_in_range() -> None:
    prior = prior_in_eval()
    a = prior.sample(4, generator=torch.Generator().manual_seed(3))
    b = prior.sample(4, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, TINY_PRIOR.height, TINY_PRIOR.width)
    assert torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < TINY_PRIOR.num_codes


# --- restoration --------------------------------------------------------------------------------


def naive_restore(
    prior: PixelSNAIL, codes: Tensor, mask: Tensor, seed: int, n_samples: int, threshold: float | None
) -> Tensor:
    """Reference: a full prior forward over all replicas at every raster position.

    Uses the randomness contract documented in ``restore``: one float64 uniform per (replica, position)
    drawn up front, codes drawn by inverting the softmax CDF.
    """
    n, h, w = codes.shape
    current = codes.repeat_interleave(n_samples, dim=0).clone()
    eligible = mask.repeat_interleave(n_samples, dim=0)
    uniforms = torch.rand((n * n_samples, h * w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for position in range(h * w):
        row, col = divmod(position, w)
        logits = prior(current)[:, :, row, col]
        old = current[:, row, col]
        take = eligible[:, row, col]
        if threshold is not None:
            take &= F.cross_entropy(logits, old, reduction="none") > threshold
        cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)
        drawn = (cdf < uniforms[:, position, None]).sum(dim=-1).clamp_max(logits.shape[-1] - 1)
        current[:, row, col] = torch.where(take, drawn, old)
    return current.view(n, n_samples, h, w)


def restoration_inputs(seed: int = 0) -> tuple[PixelSNAIL, Tensor, Tensor]:
    prior = prior_in_eval(seed=seed)
    codes = random_codes(2, TINY_PRIOR, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(codes.shape, generator=generator) < 0.4
    mask[0, 0, 1] = True  # a mask position with earlier unmasked context
    return prior, codes, mask


def test_restore_changes_only_masked_positions_and_is_deterministic_per_seed() -> None:
    prior, codes, mask = restoration_inputs()
    first = restore(prior, codes, mask, torch.Generator().manual_seed(7), 6)
    again = restore(prior, codes, mask, torch.Generator().manual_seed(7), 6)
    other = restore(prior, codes, mask, torch.Generator().manual_seed(8), 6)
    assert first.shape == (2, 6, TINY_PRIOR.height, TINY_PRIOR.width)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    unmasked = ~mask[:, None].expand_as(first)
    assert torch.equal(first[unmasked], codes[:, None].expand_as(first)[unmasked])
    assert bool((first != codes[:, None])[mask[:, None].expand_as(first)].any())


@pytest.mark.parametrize("threshold", [None, 1.5])
def test_restore_equals_a_full_forward_per_position_reference(threshold: float | None) -> None:
    prior, codes, mask = restoration_inputs(seed=1)
    with torch.no_grad():
        expected = naive_restore(prior, codes, mask, seed=11, n_samples=4, threshold=threshold)
    got = restore(prior, codes, mask, torch.Generator().manual_seed(11), 4, threshold=threshold)
    assert torch.equal(got, expected)
    if threshold is not None:  # the threshold must actually have skipped some eligible positions
        unrestricted = restore(prior, codes, mask, torch.Generator().manual_seed(11), 4)
        assert not torch.equal(got, unrestricted)


def test_restore_needs_at_most_one_forward_per_distinct_masked_position() -> None:
    prior, codes, mask = restoration_inputs(seed=2)
    calls: list[tuple[int, ...]] = []
    handle = prior.register_forward_pre_hook(lambda _module, args: calls.append(tuple(args[0].shape)))
    try:
        restore(prior, codes, mask, torch.Generator().manual_seed(0), 8)
    finally:
        handle.remove()
    distinct = int(mask.flatten(1).any(dim=0).sum())
    assert 1 <= len(calls) <= distinct
    # Every call is batched over the replicas that need it: never more rows than images x samples.
    assert all(shape[0] <= codes.shape[0] * 8 for shape in calls)
    # Calls after the initial one see the map cropped to the rows up to the position they restore.
    assert any(shape[1] < TINY_PRIOR.height for shape in calls[1:])


def test_restore_refuses_a_prior_in_training_mode() -> None:
    prior, codes, mask = restoration_inputs()
    with pytest.raises(ValueError, match="eval"):
        restore(prior.train(), codes, mask, None, 1)


# --- parallel (one-pass) restoration ----------------------------------------------------------------


def naive_parallel_restore(
    prior: PixelSNAIL, codes: Tensor, mask: Tensor, seed: int, n_samples: int, threshold: float | None,
    temperature: float,
) -> Tensor:
    """Reference of ``restore_parallel``'s contract, position by position and replica by replica: each
    eligible code above the threshold under the ORIGINAL context is redrawn at its replica's uniform."""
    n, h, w = codes.shape
    logits = prior(codes)  # teacher forcing: every position sees the original codes before it
    uniforms = torch.rand((n * n_samples, h * w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = codes[:, None].repeat(1, n_samples, 1, 1)
    for image in range(n):
        for position in range(h * w):
            row, col = divmod(position, w)
            here = logits[image, :, row, col]
            old = int(codes[image, row, col])
            nll = float(-torch.log_softmax(here.double(), dim=0)[old])
            if not mask[image, row, col] or (threshold is not None and nll <= threshold):
                continue
            probabilities = torch.softmax(here.double() / temperature, dim=0)
            for replica in range(n_samples):
                u = float(uniforms[image * n_samples + replica, position])
                # Smallest code whose cumulative probability reaches u.
                out[image, replica, row, col] = min(int((probabilities.cumsum(0) < u).sum()), len(here) - 1)
    return out


@pytest.mark.parametrize(("threshold", "temperature"), [(None, 1.0), (1.5, 0.5)])
def test_parallel_restore_equals_a_per_position_reference(threshold: float | None, temperature: float) -> None:
    """Catches: logits of the wrong position (a raster off-by-one, rows and columns swapped), redrawn
    codes fed back as context, replicas sharing uniforms, the temperature ignored or applied to the
    threshold test, and the threshold compared the wrong way."""
    prior, codes, mask = restoration_inputs(seed=3)
    with torch.no_grad():
        expected = naive_parallel_restore(prior, codes, mask, 13, 4, threshold, temperature)
    got = restore_parallel(prior, codes, mask, torch.Generator().manual_seed(13), 4, threshold=threshold,
                           temperature=temperature)
    assert torch.equal(got, expected)
    unmasked = ~mask[:, None].expand_as(got)
    assert torch.equal(got[unmasked], codes[:, None].expand_as(got)[unmasked])
    assert bool((got != codes[:, None]).any())
    if threshold is not None:  # the threshold must have kept some eligible codes
        assert not torch.equal(got, restore_parallel(prior, codes, mask, torch.Generator().manual_seed(13), 4,
                                                     temperature=temperature))


def test_parallel_restore_makes_one_prior_pass_over_the_original_codes() -> None:
    """Catches a fallback to per-position passes and a pass over anything but the full original maps."""
    prior, codes, mask = restoration_inputs(seed=2)
    seen: list[Tensor] = []
    handle = prior.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    try:
        restored = restore_parallel(prior, codes, mask, torch.Generator().manual_seed(0), 8, threshold=0.0)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], codes)
    assert bool((restored != codes[:, None]).any())


def test_parallel_restore_agrees_with_restore_when_one_code_is_above_the_threshold() -> None:
    """With one code above the threshold both restorers draw it from the same conditional at the same
    uniform. Catches another uniform layout or another draw than ``restore``'s, which would make the
    parallel mode a different random process rather than an approximation of the same one."""
    prior = prior_in_eval(seed=4)
    codes = random_codes(3, TINY_PRIOR, seed=4)
    with torch.no_grad():
        # The most likely code everywhere (greedy, in raster order) but the least likely one at the last
        # position, after which there is nothing that restore could re-judge in a new context.
        for row, col in itertools.product(range(TINY_PRIOR.height), range(TINY_PRIOR.width)):
            pick = torch.argmin if (row, col) == (TINY_PRIOR.height - 1, TINY_PRIOR.width - 1) else torch.argmax
            codes[:, row, col] = pick(prior(codes)[:, :, row, col], dim=1)
        nll = prior.nll_map(codes).flatten(1)
    top2 = nll.topk(2, dim=1).values
    assert bool((nll.argmax(dim=1) == nll.shape[1] - 1).all())
    threshold = float((top2[:, 1].max() + top2[:, 0].min()) / 2)
    assert bool((top2[:, 1] < threshold).all() and (top2[:, 0] > threshold).all())  # one code per map above it
    parallel = restore_parallel(prior, codes, None, torch.Generator().manual_seed(5), 16, threshold=threshold)
    exact = restore(prior, codes, None, torch.Generator().manual_seed(5), 16, threshold=threshold)
    assert torch.equal(parallel, exact)
    assert bool((parallel[:, :, -1, -1] != codes[:, None, -1, -1]).any())  # the code was redrawn
    # One eligible code in the middle of the map: the same agreement away from the border.
    mask = torch.zeros_like(codes, dtype=torch.bool)
    mask[:, 1, 2] = True
    parallel = restore_parallel(prior, codes, mask, torch.Generator().manual_seed(6), 16, temperature=0.7)
    exact = restore(prior, codes, mask, torch.Generator().manual_seed(6), 16, temperature=0.7)
    assert torch.equal(parallel, exact) and bool((parallel[:, :, 1, 2] != codes[:, None, 1, 2]).any())


def test_parallel_restore_refuses_a_prior_in_training_mode_and_a_wrong_mask() -> None:
    prior, codes, mask = restoration_inputs()
    with pytest.raises(ValueError, match="eval"):
        restore_parallel(prior.train(), codes, mask, None, 1)
    with pytest.raises(ValueError, match="mask"):
        restore_parallel(prior.eval(), codes, mask[:, :1], None, 1)
