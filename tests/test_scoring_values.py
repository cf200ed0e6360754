"""Every derived score recomputed by hand on tiny inputs: plain torch/numpy arithmetic on the models' own
outputs (log-densities, logits, codes, restorations), never the scorer's own code path. Each test names the
mistakes it catches; bench/mutations.py plants those mistakes and checks that some test here fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from test_models_glow import ready_model
from test_scoring_restoration import TINY_VQ, random_crops, untrained_models
from flowood_ray.models.catalog import build_modules, mutate_pixels
from flowood_ray.models.glow import GlowConfig
from flowood_ray.models.patch_density import PatchDensity, PatchDensityConfig
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.restoration import restoration_map, smooth_map, weighted_residual_map
from flowood_ray.scoring.scorers import build_scorer, png_bits_per_dim


def centred(inputs: np.ndarray) -> Tensor:
    """uint8 model inputs (N, H, W, 3) -> float32 (N, 3, H, W) at the bin centres, (k + 0.5) / 256 - 0.5."""
    return ((torch.from_numpy(np.ascontiguousarray(inputs)).permute(0, 3, 1, 2).double() + 0.5) / 256 - 0.5).float()


def bundle_of(family: str, modules: dict[str, nn.Module], **extra: Any) -> ModelBundle:
    configs = {name: module.config.model_dump(mode="json") for name, module in modules.items()}
    return ModelBundle(family=family, configs=configs, modules=modules, extra=extra, code_version="test")


def png_bits(image: np.ndarray) -> float:
    return 8 * len(cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]) / image.size


def noisy_crops(n: int, size: int, seed: int, max_amplitude: float = 60.0) -> np.ndarray:
    """uint8 (n, size, size, 3): a flat colour plus noise whose amplitude grows with the index, so that
    likelihoods and PNG lengths spread over the crops."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 190, (n, 1, 1, 3))
    amplitude = np.linspace(0.0, max_amplitude, n)[:, None, None, None]
    return np.clip(base + amplitude * rng.standard_normal((n, size, size, 3)), 0, 255).round().astype(np.uint8)


def pool_by_hand(values: np.ndarray, kernel: int, reduce: Callable[[np.ndarray], float]) -> np.ndarray:
    """Stride-1 pooling of (H, W) with replicate padding, written as clamped window indices."""
    h, w = values.shape
    offsets = np.arange(kernel) - kernel // 2
    out = np.empty_like(values)
    for i in range(h):
        for j in range(w):
            rows, cols = np.clip(i + offsets, 0, h - 1), np.clip(j + offsets, 0, w - 1)
            out[i, j] = reduce(values[np.ix_(rows, cols)])
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def calibrate_bundle(
    bundle: ModelBundle, train_crops: np.ndarray, val_crops: np.ndarray, val_ids: np.ndarray
) -> dict[str, np.ndarray]:
    # Imported on use: train_job pulls in Ray, which only the calibration tests need.
    from flowood_ray.cluster.train_job import calibrate_bundle as calibrate

    return calibrate(bundle, train_crops, val_crops, val_ids)


# --- glow ------------------------------------------------------------------------------------------

GLOW = GlowConfig(image_size=8, levels=2, steps_per_level=1, hidden_channels=8)
# 10 px crops with face_fraction 0.8: the model input is their central 8 px, never the crop itself.
CROP_INPUT = {"face_fraction": 0.8}


def glow_inputs(crops: np.ndarray) -> np.ndarray:
    return crops[:, 1:9, 1:9]  # round(10 * 0.8) = 8 px from offset (10 - 8) // 2 = 1


def glow_modules() -> dict[str, nn.Module]:
    # Randomised with different seeds, zero-initialised layers included: a fresh pair would give both
    # models the same likelihood, and glow_lr = 0 whatever its sign.
    return {"glow": ready_model(GLOW, seed=1).float(), "background": ready_model(GLOW, seed=2).float()}


def bits_per_dim_by_hand(flow: nn.Module, x: Tensor) -> np.ndarray:
    """(-log p(x) + D ln 256) / (D ln 2) from the flow's log-density in nats."""
    d = x[0].numel()
    with torch.no_grad():
        log_prob = flow.log_prob(x).double()
    return ((-log_prob + d * math.log(256)) / (d * math.log(2))).numpy()


def test_glow_bpd_complexity_and_likelihood_ratio_follow_their_formulas() -> None:
    """Catches: glow_lr or glow_complexity with the wrong sign, a zero PNG length, the PNG length of the
    raw crop instead of the model input, bits/dim without D ln 256 or in nats, and noisy dequantisation."""
    modules = glow_modules()
    crops = noisy_crops(6, 10, seed=0)
    scores = build_scorer(bundle_of("glow", modules, input=CROP_INPUT)).score(crops)
    inputs = glow_inputs(crops)
    x = centred(inputs)
    bpd = bits_per_dim_by_hand(modules["glow"], x)
    background = bits_per_dim_by_hand(modules["background"], x)
    png = np.array([png_bits(image) for image in inputs])
    # Informative only where each correction moves the score by far more than the tolerance.
    assert np.abs(bpd - background).min() > 1e-3 and png.min() > 1.0
    assert np.abs(png - [png_bits(crop) for crop in crops]).min() > 0.1
    assert set(scores) == {"glow_bpd", "glow_complexity", "glow_lr"}  # no typicality before calibration
    np.testing.assert_allclose(scores["glow_bpd"], bpd, rtol=1e-6)
    np.testing.assert_allclose(scores["glow_complexity"], bpd - png, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores["glow_lr"], bpd - background, rtol=1e-6, atol=1e-6)


def test_glow_typicality_tests_each_frame_and_each_videos_mean_against_the_entropy() -> None:
    """Catches: an entropy of 0 instead of the calibrated one, a one-sided distance, and a video score
    that averages per-frame distances instead of testing the video's mean bits/dim."""
    modules = glow_modules()
    crops = noisy_crops(6, 10, seed=1)
    bpd = bits_per_dim_by_hand(modules["glow"], centred(glow_inputs(crops)))
    video_ids = np.array([0, 0, 0, 1, 1, 1])
    entropy = float(bpd[:3].min() + bpd[:3].max()) / 2  # inside video 0's range: frames on both sides
    video_mean = np.array([bpd[:3].mean(), bpd[3:].mean()])
    assert abs(abs(video_mean[0] - entropy) - np.abs(bpd[:3] - entropy).mean()) > 1e-2
    scorer = build_scorer(bundle_of("glow", modules, input=CROP_INPUT, entropy_bpd=entropy))
    scores = scorer.score(crops)
    np.testing.assert_allclose(scores["glow_typicality"], np.abs(bpd - entropy), rtol=1e-6, atol=1e-6)
    ids, video = scorer.aggregate(video_ids, scores)
    np.testing.assert_array_equal(ids, [0, 1])
    np.testing.assert_allclose(video["glow_bpd"], video_mean, rtol=1e-6)
    np.testing.assert_allclose(video["glow_typicality"], np.abs(video_mean - entropy), rtol=1e-6, atol=1e-6)


def test_video_scores_leave_out_nan_frames_and_a_video_of_nan_frames_is_nan() -> None:
    """Catches: one NaN frame making its video NaN (or the aggregation refusing the batch), a NaN frame
    counted as 0, and a video with no scored frame given a number (it must come out unscored)."""
    scorer = build_scorer(bundle_of("glow", glow_modules(), input=CROP_INPUT, entropy_bpd=4.0))
    nan = float("nan")
    scores = {"glow_bpd": np.array([3.0, nan, 5.0, nan, nan, 2.0])}
    ids, video = scorer.aggregate(np.array([7, 7, 7, 8, 8, 9]), scores)
    np.testing.assert_array_equal(ids, [7, 8, 9])
    np.testing.assert_array_equal(video["glow_bpd"], [4.0, nan, 2.0])


def test_calibration_sets_the_entropy_to_the_mean_training_bpd_and_calibrates_typicality_on_it() -> None:
    """Catches: an entropy of 0 (or of another score) written at calibration, an entropy taken from the
    validation crops, and typicality thresholds computed before the entropy is known or from per-frame
    distances at video level."""
    modules = glow_modules()
    bundle = bundle_of("glow", modules, input=CROP_INPUT)
    train_crops = noisy_crops(12, 10, seed=2)
    crops, video_ids = noisy_crops(24, 10, seed=3, max_amplitude=30.0), np.repeat(np.arange(4), 6)
    entropy = bits_per_dim_by_hand(modules["glow"], centred(glow_inputs(train_crops))).mean()
    bpd = bits_per_dim_by_hand(modules["glow"], centred(glow_inputs(crops)))
    assert abs(entropy - bpd.mean()) > 1e-2  # the training and validation means are told apart
    scores = calibrate_bundle(bundle, train_crops, crops, video_ids)
    assert bundle.extra["entropy_bpd"] == pytest.approx(entropy, rel=1e-6)
    np.testing.assert_allclose(scores["glow_typicality"], np.abs(bpd - entropy), rtol=1e-5, atol=1e-6)
    assert bundle.calibration["primary"] == "glow_typicality"
    frame = bundle.calibration["frame"]["glow_typicality"]
    assert frame["mean"] == pytest.approx(np.abs(bpd - entropy).mean(), rel=1e-5)
    video = bundle.calibration["video"]["glow_typicality"]
    assert video["mean"] == pytest.approx(np.abs(bpd.reshape(4, 6).mean(1) - entropy).mean(), rel=1e-5)


def test_png_bits_per_dim_is_the_png_code_length_per_sub_pixel() -> None:
    """Catches: a zero or unscaled code length (bytes for bits), another compression level, and a
    normalisation by pixels instead of sub-pixels."""
    flat = np.full((12, 12, 3), 90, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    images = np.stack([flat, noise])
    got = png_bits_per_dim(images)
    np.testing.assert_allclose(got, [png_bits(flat), png_bits(noise)], rtol=1e-12)
    # Incompressible noise costs at least its 8 bits per sub-pixel; a constant image a fraction of that.
    assert got[1] > 8.0 and got[0] < 0.3 * got[1]


# --- pixel mutation (the background model's training data) ---------------------------------------


def test_mutate_pixels_replaces_the_rate_of_sub_pixels_by_uniform_values() -> None:
    """Catches: a no-op mutation, a comparison with the rate the wrong way round, and replacement values
    that miss part of 0..255 or are not uniform over it."""
    images = torch.full((4, 32, 32, 3), 7, dtype=torch.uint8)
    n = images.numel()
    assert torch.equal(mutate_pixels(images, 0.0, torch.Generator().manual_seed(0)), images)
    for rate, seed in ((0.2, 1), (1.0, 2)):
        mutated = mutate_pixels(images, rate, torch.Generator().manual_seed(seed))
        assert mutated.dtype == torch.uint8 and mutated.shape == images.shape
        changed = float((mutated != images).double().mean())
        expected = rate * 255 / 256  # a replacement draws the old value again 1 time in 256
        assert abs(changed - expected) < 5 * math.sqrt(expected * (1 - expected) / n), (rate, changed)
    counts = np.bincount(mutated.flatten().numpy(), minlength=256)  # rate 1: every value is a draw
    assert len(counts) == 256 and counts.min() > 0
    chi_square = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert chi_square < 255 + 5 * math.sqrt(2 * 255)  # 255 degrees of freedom: mean 255, sd sqrt(510)


# --- VQ-VAE ----------------------------------------------------------------------------------------


def vq_modules(crops: np.ndarray) -> dict[str, nn.Module]:
    vqvae, prior = untrained_models()
    # An untrained encoder maps every position to the code nearest 0; codes put on the encoder's
    # outputs for these crops give every crop and position a code of its own.
    with torch.no_grad():
        z = vqvae.encoder(centred(crops)).permute(0, 2, 3, 1).reshape(-1, TINY_VQ.code_dim)
        picks = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[: TINY_VQ.codebook_size]
        vqvae.quantizer.embedding.copy_(z[picks])
    return {"vqvae": vqvae, "prior": prior}


def code_nll_by_hand(modules: dict[str, nn.Module], x: Tensor) -> tuple[Tensor, np.ndarray]:
    """(codes (N, h, w), -log softmax(prior logits) at each code (N, h, w) in nats)."""
    with torch.no_grad():
        codes = modules["vqvae"].encode(x)
        logits = modules["prior"](codes).double()  # (N, K, h, w)
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return codes, -log_p.gather(1, codes[:, None])[:, 0].numpy()


def test_vq_scores_are_the_code_nll_above_lambda_s_its_mean_and_the_reconstruction_error() -> None:
    """Catches: the lambda_s mask inverted (or ignored), a mean instead of a sum over positions, and a
    reconstruction error of the wrong input or norm."""
    crops = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    modules = vq_modules(crops)
    x = centred(crops)
    codes, nll = code_nll_by_hand(modules, x)
    assert len(np.unique(codes.numpy())) > 4  # the prior sees varied code maps
    # lambda_s in the widest gap between the middle NLL values: the mask matters and is unambiguous.
    values = np.sort(nll.flatten())
    middle = np.arange(len(values) // 4, 3 * len(values) // 4)
    widest = middle[np.argmax(values[middle + 1] - values[middle])]
    assert values[widest + 1] - values[widest] > 1e-4
    lambda_s = float(values[widest] + values[widest + 1]) / 2
    scores = build_scorer(bundle_of("vqvae", modules, lambda_s=lambda_s)).score(crops)
    np.testing.assert_allclose(scores["vq_latent_nll"], np.where(nll > lambda_s, nll, 0.0).sum((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(scores["vq_code_nll"], nll.mean((1, 2)), rtol=1e-5)
    with torch.no_grad():
        recon = modules["vqvae"].decode_codes(codes)
    np.testing.assert_allclose(scores["vq_recon"], (recon - x).abs().double().mean((1, 2, 3)).numpy(), rtol=1e-5)
    assert "vq_latent_nll" not in build_scorer(bundle_of("vqvae", modules)).score(crops)  # before calibration


def test_calibration_puts_lambda_s_and_lambda_p_at_the_quantiles_of_training_code_nlls() -> None:
    """Catches: lambda_s and lambda_p swapped or at other quantiles, lambdas taken from the validation
    crops, and a sample score calibrated without the lambda_s it is defined by."""
    rng = np.random.default_rng(4)
    train_crops = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    crops = rng.integers(64, 192, (24, 16, 16, 3), dtype=np.uint8)  # other statistics than the training crops
    modules = vq_modules(train_crops)
    train_nll = code_nll_by_hand(modules, centred(train_crops))[1].flatten()
    _, nll = code_nll_by_hand(modules, centred(crops))
    bundle = bundle_of("vqvae", modules)
    scores = calibrate_bundle(bundle, train_crops, crops, np.repeat(np.arange(4), 6))
    lambda_s, lambda_p = np.quantile(train_nll, 0.95), np.quantile(train_nll, 0.90)
    assert lambda_s - lambda_p > 1e-3 and abs(np.quantile(nll.flatten(), 0.95) - lambda_s) > 1e-3
    assert bundle.extra["lambda_s"] == pytest.approx(lambda_s, rel=1e-5)
    assert bundle.extra["lambda_p"] == pytest.approx(lambda_p, rel=1e-5)
    np.testing.assert_allclose(
        scores["vq_latent_nll"], np.where(nll > bundle.extra["lambda_s"], nll, 0.0).sum((1, 2)), rtol=1e-5
    )
    assert bundle.calibration["primary"] == "vq_latent_nll" and "vq_latent_nll" in bundle.calibration["video"]


# --- restoration maps --------------------------------------------------------------------------------


def expected_restoration(image: np.ndarray, restorations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image (C, H, W), restorations (S, C, H, W) -> (weights (S,), raw map, smoothed map (H, W)), as the
    module docstring of scoring/restoration.py states them."""
    difference = np.abs(restorations - image[None])
    weights = softmax(3.0 / difference.mean(axis=(1, 2, 3)))  # k = 3 on the mean L1 distance
    raw = (weights[:, None, None] * difference.sum(axis=1)).sum(axis=0)
    return weights, raw, pool_by_hand(pool_by_hand(raw, 3, np.min), 7, np.mean)


def test_restoration_weights_and_map_of_a_hand_made_input() -> None:
    """Catches: another softmax temperature, residuals averaged (or signed) over channels instead of
    summed as L1, a max-pool for the min-pool, the two pools swapped, and zero padding."""
    image = torch.zeros(1, 2, 9, 9)
    near = torch.ones(1, 2, 9, 9)
    near[0, 0, 2:5, 2:5] += 2.0  # a blob survives the min-pool
    near[0, 1, 7, 7] += 5.0  # an isolated spike does not
    near[0, 1, 0, :] = -1.0  # |y - x|, not y - x
    far = torch.full((1, 2, 9, 9), 1.5)
    weights, raw, smoothed = expected_restoration(image[0].numpy(), torch.cat([near, far]).numpy())
    assert 0.55 < weights[0] < 0.9  # neither restoration takes all the weight
    raw_map, got_weights = weighted_residual_map(image, torch.stack([near, far], dim=1))
    np.testing.assert_allclose(got_weights[0].numpy(), weights, rtol=1e-5)
    np.testing.assert_allclose(raw_map[0].numpy(), raw, rtol=1e-5)
    np.testing.assert_allclose(smooth_map(raw_map)[0].numpy(), smoothed, rtol=1e-5)


def test_restoration_map_weighs_and_pools_its_own_restorations_as_documented() -> None:
    """Catches the same mistakes inside restoration_map (its default k and pools), and a top-1% image
    score over the wrong number of pixels."""
    vqvae, prior = untrained_models()
    images = random_crops(2, seed=5)
    generator = torch.Generator().manual_seed(1)
    result = restoration_map(vqvae, prior, images, 0.0, generator=generator, keep_restorations=True)
    assert result.restorations is not None
    for i in range(2):
        weights, _, smoothed = expected_restoration(images[i].double().numpy(), result.restorations[i].double().numpy())
        assert weights.max() < 0.99  # the restorations differ enough for the weighting to matter
        np.testing.assert_allclose(result.weights[i].numpy(), weights, rtol=1e-5)
        np.testing.assert_allclose(result.pixel_map[i].numpy(), smoothed, rtol=1e-5, atol=1e-7)
        top = np.sort(smoothed.flatten())[-3:].mean()  # ceil(1% of 256 pixels) = 3
        assert float(result.image_score[i]) == pytest.approx(top, rel=1e-5)


# --- patch texture density ---------------------------------------------------------------------------

PATCH = PatchDensityConfig(image_size=16, patch=4, stride=3, n_layers=2, hidden=16)


def test_patch_scores_average_the_inner_patches_all_patches_and_test_typicality() -> None:
    """Catches: the inner mask inverted or widened (patch_nll over the border), nats per patch instead of
    per patch dimension, a zero entropy, and video typicality as a mean of per-frame distances."""
    torch.manual_seed(0)
    density = PatchDensity(PATCH)
    rng = np.random.default_rng(6)
    crops = np.full((4, 16, 16, 3), 120.0)
    # Flat borders around a noisy centre: inner and border patches have very different likelihoods.
    crops[:, 4:12, 4:12] += np.linspace(10, 50, 4)[:, None, None, None] * rng.standard_normal((4, 8, 8, 3))
    crops = np.clip(crops, 0, 255).round().astype(np.uint8)
    with torch.no_grad():
        # ActNorm's data-dependent init scales the residuals (units of 1/255) up to where likelihoods differ.
        density.train()(torch.from_numpy(crops))
        log_prob = density.eval().flow.log_prob(density.patches(torch.from_numpy(crops)).reshape(-1, 16))
    nll = (-log_prob.double() / 16).view(4, 5, 5).numpy()
    inner = nll[:, 1:4, 1:4].mean((1, 2))  # patch centres 5, 8, 11 lie within 16 / 4 px of the centre 8
    border = (nll.sum((1, 2)) - 9 * inner) / 16
    assert np.abs(inner - border).min() > 0.1
    entropy = float(inner[0] + inner[1]) / 2  # video 0 has frames on both sides
    scorer = build_scorer(bundle_of("patch", {"patch": density}, entropy_patch_nll=entropy))
    scores = scorer.score(crops)
    np.testing.assert_allclose(scores["patch_nll"], inner, rtol=1e-5)
    np.testing.assert_allclose(scores["patch_nll_all"], nll.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(scores["patch_typicality"], np.abs(inner - entropy), rtol=1e-5, atol=1e-6)
    _, video = scorer.aggregate(np.array([0, 0, 1, 1]), scores)
    video_mean = inner.reshape(2, 2).mean(1)
    assert abs(abs(video_mean[0] - entropy) - np.abs(inner[:2] - entropy).mean()) > 1e-2
    np.testing.assert_allclose(video["patch_typicality"], np.abs(video_mean - entropy), rtol=1e-5, atol=1e-6)


# --- classifier ------------------------------------------------------------------------------------


def odin_by_hand(classifier: nn.Module, x: Tensor) -> Tensor:
    """Liang et al.: step x by 0.0014 against the sign of the gradient of -log max softmax(logits / 1000),
    then 1 - max softmax(logits / 1000) at the stepped input."""
    x = x.clone().requires_grad_(True)
    log_p = F.log_softmax(classifier(x).logits / 1000.0, dim=1)
    (grad,) = torch.autograd.grad(-log_p.max(dim=1).values.sum(), x)
    with torch.no_grad():
        scaled = classifier(x - 0.0014 * grad.sign()).logits.double() / 1000.0
    return 1 - torch.exp(scaled.max(dim=1).values - torch.logsumexp(scaled, dim=1))


def test_every_classifier_score_follows_its_formula() -> None:
    """Catches: cls_fake with the wrong sign, MSP not complemented, energy with the wrong sign, ODIN with
    another temperature, no perturbation or a step along the gradient, the reconstruction error of the
    wrong input, auxiliary features in the wrong order or sign, and the noisy-OR replaced by a max or a
    single detector."""
    torch.manual_seed(0)
    modules = build_modules("classifier", {
        "classifier": {"image_size": 32}, "abnormality": {"hidden": 16},
    })
    classifier, abnormality = modules["classifier"].eval(), modules["abnormality"].eval()
    with torch.no_grad():
        # Logits of a few units: softmax and sigmoids away from 1/2, so every formula is exercised.
        classifier.head.weight.mul_(20.0)
        abnormality.net[-1].weight.mul_(20.0)
    crops = noisy_crops(4, 32, seed=7, max_amplitude=40.0)
    scores = build_scorer(bundle_of("classifier", modules)).score(crops)
    x = centred(crops)
    with torch.no_grad():
        output = classifier(x)
        residual = (output.recon - x).abs().mean(dim=1).view(4, 4, 8, 4, 8).mean(dim=(2, 4))  # 4x4 cells of 8x8 px
        logits = output.logits.double()
        log_total = torch.logsumexp(logits, dim=1)
        aux = torch.cat([output.logits, output.logits.softmax(dim=1), -torch.logsumexp(output.logits, 1, True),
                         output.features, residual.flatten(1)], dim=1)
        abnormal = abnormality.net(aux)[:, 0].double()
    fake = logits[:, 1] - logits[:, 0]
    assert fake.abs().min() > 0.3 and abnormal.abs().min() > 0.1
    neither = (1 - torch.sigmoid(fake)) * (1 - torch.sigmoid(abnormal))
    expected = {
        "cls_fake": fake,
        "cls_msp": 1 - torch.exp(logits.max(dim=1).values - log_total),
        "cls_energy": -log_total,
        "cls_recon": (output.recon - x).abs().double().mean(dim=(1, 2, 3)),
        "cls_abnormality": abnormal,
        "cls_fake_or_abnormal": -torch.log(neither),
    }
    assert set(scores) == {*expected, "cls_odin"}
    for name, values in expected.items():
        np.testing.assert_allclose(scores[name], values.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    odin = odin_by_hand(classifier, x).numpy()
    unperturbed = 1 - torch.exp(logits.max(1).values / 1000.0 - torch.logsumexp(logits / 1000.0, 1)).numpy()
    assert np.abs(odin - unperturbed).min() > 1e-5  # the perturbation moves the score far beyond the tolerance
    np.testing.assert_allclose(scores["cls_odin"], odin, rtol=0, atol=1e-6)
