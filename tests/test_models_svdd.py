"""Deep SVDD (centre, distance, training, no biases) and the Patch SVDD-style nearest-fibre distance
(search by hand, the reservoir bank and its rank consistency, zero distance for banked crops, maps)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import TINY_MODELS, phase_loss_before_and_after
from flowood_ray.models import patch_svdd
from flowood_ray.models.catalog import build_modules, family, parse_configs
from flowood_ray.models.patch_svdd import PatchBank, PatchSVDDConfig, nearest_distances
from flowood_ray.models.svdd import LEAKY_SLOPE, DeepSVDD, DeepSVDDConfig
from flowood_ray.registry import ModelBundle, load_bundle, save_bundle
from flowood_ray.scoring.scorers import build_scorer
from test_models_cflow import face_crops

SVDD, PATCH = TINY_MODELS["svdd"], TINY_MODELS["patchsvdd"]


def bundle_of(name: str, config: dict, modules: dict) -> ModelBundle:
    return ModelBundle(name, {k: v.model_dump(mode="json") for k, v in parse_configs(name, config).items()}, modules)


# --- Deep SVDD ---------------------------------------------------------------------------------


def test_centre_is_the_mean_of_the_initial_outputs_and_the_distance_is_squared_euclidean() -> None:
    """Hand-computed in NumPy: catches a centre taken after a training step or re-set on later batches,
    a missing eps push of near-zero coordinates, a root or a mean in the distance, and scoring before
    the centre exists."""
    svdd = DeepSVDD(DeepSVDDConfig(strides=(8,), widths=(5, 3), centre_eps=0.1))
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(5, 40)), rng.normal(size=(3, 5))
    w2[0] *= 1e-4  # a coordinate of the centre well inside eps
    w2[1:] *= 10
    with torch.no_grad():
        svdd.net[0].weight.copy_(torch.from_numpy(w1))
        svdd.net[2].weight.copy_(torch.from_numpy(w2))
    features = rng.normal(size=(6, 40))
    with pytest.raises(ValueError, match="centre"):
        svdd.eval()(torch.from_numpy(features).float())

    def phi(f: np.ndarray) -> np.ndarray:
        hidden = f @ w1.T
        return np.where(hidden > 0, hidden, LEAKY_SLOPE * hidden) @ w2.T

    mean = phi(features).mean(axis=0)
    assert abs(mean[0]) < 0.1 and np.all(np.abs(mean[1:]) > 0.1)
    expected_centre = np.r_[0.1 * np.sign(mean[0]), mean[1:]]
    with torch.no_grad():
        svdd.train()(torch.from_numpy(features).float())
        svdd(torch.from_numpy(features + 5.0).float())  # a later batch must not move the centre
    np.testing.assert_allclose(svdd.centre.numpy(), expected_centre, rtol=1e-5, atol=1e-6)
    new = rng.normal(size=(4, 40))
    with torch.no_grad():
        distance = svdd.eval()(torch.from_numpy(new).float()).numpy()
    np.testing.assert_allclose(distance, ((phi(new) - expected_centre) ** 2).sum(axis=1), rtol=1e-4)


def test_the_network_has_no_biases_and_ends_on_a_linear_layer() -> None:
    """The paper's conditions against the trivial collapse: catches a bias, a learnable affine norm, or
    a bounded activation at the output."""
    svdd = build_modules("svdd", SVDD)["svdd"]
    assert all(m.bias is None for m in svdd.modules() if isinstance(m, nn.Linear))
    assert all(name.endswith("weight") and p.dim() == 2 for name, p in svdd.named_parameters())
    assert isinstance(svdd.net[-1], nn.Linear) and svdd.net[-1].out_features == 8
    assert "centre" in dict(svdd.named_buffers())  # saved with the weights, never learnt


def test_training_lowers_the_mean_distance_and_keeps_the_centre(tmp_path: Path) -> None:
    """Catches a centre that follows the network (a parameter, or re-initialised) and a loss that does
    not pull real crops in; the registered bundle reloads its centre."""
    torch.manual_seed(0)
    modules = build_modules("svdd", SVDD)
    crops = face_crops(8, 32)
    batch = {"image": torch.from_numpy(crops), "label": torch.zeros(8)}
    with torch.no_grad():
        family("svdd").phases[0].loss(modules, batch, None)
    centre = modules["svdd"].centre.clone()
    before, after = phase_loss_before_and_after("svdd", 0, modules, batch, steps=20, lr=1e-4, seed=0)
    assert after < 0.7 * before, (before, after)
    assert torch.equal(modules["svdd"].centre, centre)

    bundle = bundle_of("svdd", SVDD, modules)
    scores = build_scorer(bundle).score(crops)["svdd_distance"]
    np.testing.assert_allclose(scores.mean(), after - modules["svdd"].weight_penalty().item(), rtol=1e-4)
    save_bundle(bundle, tmp_path / "bundle")
    assert set(torch.load(tmp_path / "bundle" / "weights.pt", weights_only=True)) == {"svdd"}
    reloaded = build_scorer(load_bundle(tmp_path / "bundle"))
    np.testing.assert_allclose(reloaded.score(crops)["svdd_distance"], scores, rtol=1e-6)


# --- Patch SVDD --------------------------------------------------------------------------------


def test_nearest_distance_by_hand_on_a_tiny_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a squared distance, a maximum instead of a minimum, chunks that lose or reorder queries,
    and a copy counted as its own neighbour when copies are to be skipped."""
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    queries = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 2.0], [10.0, 10.0]])
    expected = torch.tensor([math.sqrt(5), 0.0, 1.0, math.sqrt(85)])
    torch.testing.assert_close(nearest_distances(queries, bank), expected)
    monkeypatch.setattr(patch_svdd, "CHUNK_ELEMENTS", 3)  # one query per chunk
    torch.testing.assert_close(nearest_distances(queries, bank), expected)
    skipped = nearest_distances(queries, bank, skip_copies=True)
    torch.testing.assert_close(skipped, torch.tensor([math.sqrt(5), math.sqrt(2), 1.0, math.sqrt(85)]))
    with pytest.raises(ValueError, match="empty"):
        nearest_distances(queries, bank[:0])


def test_a_fibre_in_the_bank_is_at_distance_exactly_zero_even_with_large_norms() -> None:
    """The matrix-product distance alone leaves cancellation error of order |x|^2 * 1e-7: catches a
    search that skips the exact recomputation."""
    generator = torch.Generator().manual_seed(0)
    bank = 1000.0 + torch.randn(50, 16, generator=generator)
    queries = torch.cat([bank[[7, 31]], bank[[3]] + 0.01])
    distances = nearest_distances(queries, bank)
    assert distances[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(distances[2], torch.tensor(0.01 * 4), rtol=1e-3, atol=0)


def _index_features(start: int, crops: int, channels: int = 40, side: int = 5) -> dict[int, torch.Tensor]:
    """Stride-8 maps whose fibre k (crop, row, column order) holds the value start + k in every channel."""
    values = torch.arange(start, start + crops * side * side, dtype=torch.float32).view(crops, 1, side, side)
    return {8: values.expand(-1, channels, -1, -1).contiguous()}


def test_the_bank_never_exceeds_its_size_and_keeps_a_uniform_sample() -> None:
    """Catches a bank that grows, keeps the first or the last fibres instead of a uniform sample,
    loses fibres while it has room, invents rows, or fills during no-grad passes (the loop's
    initialisation call) or outside training."""
    bank = PatchBank(PatchSVDDConfig(strides=(8,), bank_size=100))
    with torch.no_grad():
        bank(_index_features(0, 2))
    bank.eval()(_index_features(0, 2))
    assert int(bank.seen_8) == 0
    bank.train()
    loss = bank(_index_features(0, 2))  # 50 fibres
    loss.backward()
    assert loss.item() == 0.0 and bank.anchor.grad.item() == 0.0
    bank(_index_features(50, 2))
    assert torch.equal(bank.fibres(8)[:, 0], torch.arange(100.0))  # room for all: kept in order
    for step in range(2, 20):
        bank(_index_features(50 * step, 2))
        assert bank.bank_8.shape == (100, 40) and bank.fibres(8).shape == (100, 40)
    kept = bank.fibres(8)[:, 0]
    assert int(bank.seen_8) == 1000 and kept.unique().numel() == 100
    assert torch.equal(kept, kept.round()) and kept.min() >= 0 and kept.max() < 1000
    assert 30 <= int((kept < 500).sum()) <= 70  # about half from each half of the stream


def test_reservoir_slots_equal_algorithm_r_run_item_by_item() -> None:
    """The vectorised offer against a sequential Algorithm R on the same uniform draws: catches an
    off-by-one in the replacement probability and two items of one offer left on the same slot (which
    the bank's scatter would then resolve in an unspecified order, differently across devices)."""
    seen, count, capacity = 7, 400, 10
    slots = patch_svdd.reservoir_slots(seen, count, capacity, torch.Generator().manual_seed(5))
    uniforms = torch.rand(count, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
    holder: dict[int, int] = {}  # slot -> item now in it
    for item, u in enumerate(uniforms):
        t = seen + item
        slot = t if t < capacity else math.floor(u * (t + 1))
        if slot < capacity:
            holder[slot] = item
    kept = {int(slot): item for item, slot in enumerate(slots.tolist()) if slot >= 0}
    assert kept == holder and len(kept) == int((slots >= 0).sum())


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    bank = PatchBank(PatchSVDDConfig(strides=(8,), bank_size=60))
    for step in range(4):
        # Ranks hold different numbers of crops: 2 on rank 0, 3 on rank 1 (25 fibres per crop).
        bank(_index_features(1000 * step + 100 * rank, 2 + rank))
    torch.save({"bank": bank.bank_8.clone(), "seen": bank.seen_8.clone()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_keep_the_identical_bank_of_everyone_s_fibres(tmp_path: Path) -> None:
    """Under DDP each rank sees half the data: catches a bank of the rank's own fibres, reservoir draws
    from a per-rank generator, and a gather that drops or pads rows when ranks' batches differ."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(first["bank"], second["bank"]) and int(first["seen"]) == 4 * 125
    # One process offered the same fibres in rank order keeps the same bank.
    alone = PatchBank(PatchSVDDConfig(strides=(8,), bank_size=60))
    for step in range(4):
        both = [_index_features(1000 * step + 100 * rank, 2 + rank)[8] for rank in range(2)]
        alone({8: torch.cat(both)})
    assert torch.equal(alone.bank_8, first["bank"])


def test_a_banked_crop_scores_zero_and_maps_are_standardised_and_batch_independent(tmp_path: Path) -> None:
    """Catches a nearest neighbour other than the crop's own fibre, a sign flip of the standardisation,
    any batch statistic in the map, and a bank that is not saved with the bundle."""
    torch.manual_seed(0)
    modules = build_modules("patchsvdd", PATCH)
    crops = face_crops(6, 32)
    encoder, bank = modules["encoder"], modules["patchsvdd"]
    with torch.no_grad():
        bank.offer(encoder.features(torch.from_numpy(crops[:2])))
        distances = bank.distance_maps(encoder.features(torch.from_numpy(crops)))
    assert int(bank.seen_8) == 2 * 16 and int(bank.seen_16) == 2 * 4
    assert all(float(d[:2].abs().max()) == 0.0 and float(d[2:].min()) > 0 for d in distances.values())

    bundle = bundle_of("patchsvdd", PATCH, modules)
    scorer = build_scorer(bundle)
    with pytest.raises(ValueError, match="calibrate"):
        scorer.score(crops)
    bundle.extra.update(scorer.reference_statistics(crops[:4]))
    reference = bundle.extra["patchsvdd_reference"]
    scorer = build_scorer(bundle)
    alone_scores, alone_map = scorer.score_and_map(crops[:1])
    # Distance 0 at every fibre of both scales: z = (0 - mean) / std, averaged over the two scales.
    expected = -(reference["8"][0] / reference["8"][1] + reference["16"][0] / reference["16"][1]) / 2
    np.testing.assert_allclose(alone_map, expected, rtol=1e-5)
    batch_scores, batch_map = scorer.score_and_map(crops[[3, 0, 5]])
    np.testing.assert_allclose(batch_map[1], alone_map[0], atol=1e-5)
    for name, value in alone_scores.items():
        np.testing.assert_allclose(batch_scores[name][1], value[0], atol=1e-5)
    assert batch_scores["patchsvdd_topk"][0] > alone_scores["patchsvdd_topk"][0]  # an unseen crop is further
    assert scorer.pixel_map(face_crops(2, 48)).shape == (2, 48, 48)

    save_bundle(bundle, tmp_path / "bundle")
    assert set(torch.load(tmp_path / "bundle" / "weights.pt", weights_only=True)) == {"patchsvdd"}
    reloaded = build_scorer(load_bundle(tmp_path / "bundle"))
    np.testing.assert_allclose(reloaded.pixel_map(crops[[3, 0, 5]]), batch_map, atol=1e-6)


def test_reference_statistics_skip_each_training_fibre_s_own_copy() -> None:
    """Reference crops are training crops, whose fibres are in the bank: counting those at distance 0
    would shrink the statistics (to a zero std when every fibre is banked, as in a small run)."""
    torch.manual_seed(0)
    modules = build_modules("patchsvdd", PATCH)
    crops = face_crops(4, 32)
    with torch.no_grad():
        modules["patchsvdd"].offer(modules["encoder"].features(torch.from_numpy(crops)))
    scorer = build_scorer(bundle_of("patchsvdd", PATCH, modules))
    reference = scorer.reference_statistics(crops)["patchsvdd_reference"]
    assert all(mean > 0 and std > 0 for mean, std in reference.values())
