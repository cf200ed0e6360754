"""The real-only blend detector: what is fine-tuned and what stays ImageNet's, how a training batch is
made, and that training separates reals from their self-blends."""

from __future__ import annotations

import mediapipe as mp
import numpy as np
import pytest
import skimage.data
import torch

from conftest import phase_loss_before_and_after
from flowood_ray.media.facecrop import ModelInput, model_input_points
from flowood_ray.models.blend_detector import BlendDetector, BlendDetectorConfig, blended_batch, matched_pair_error
from flowood_ray.models.catalog import build_modules, family


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, np.ndarray]:
    """Eight 64 px crops of scikit-image's astronaut, slightly shifted, and their face meshes."""
    import cv2

    photo = skimage.data.astronaut()
    crops = np.stack([cv2.resize(photo[20 + d: 260 + d, 130 - d: 370 - d], (64, 64), interpolation=cv2.INTER_AREA)
                      for d in range(0, 16, 2)])
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        points = np.stack([[(p.x * 64, p.y * 64) for p in mesh.process(c).multi_face_landmarks[0].landmark]
                           for c in crops]).astype(np.float32)
    return crops, points


def test_layers_below_the_frozen_stride_keep_imagenet_weights_and_statistics() -> None:
    """Catches freezing the wrong layers, and BatchNorm statistics of frozen layers drifting in train()."""
    detector = BlendDetector(BlendDetectorConfig(image_size=64, frozen_below_stride=8))
    frozen = [detector.encoder.stem, *detector.encoder.blocks[:3]]  # strides 2 and 4 (blocks 0-2 in Lite0)
    assert all(not p.requires_grad for layer in frozen for p in layer.parameters())
    assert all(p.requires_grad for p in detector.encoder.blocks[3].parameters())
    assert all(p.requires_grad for p in detector.head.parameters())
    # Fine-tuned BatchNorms follow the new data at the configured momentum; frozen ones keep TF's.
    assert detector.encoder.blocks[3].project.bn.momentum == 0.1 and detector.encoder.stem.bn.momentum == 0.01
    before = detector.encoder.stem.bn.running_mean.clone()
    detector.train()
    detector(torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8))
    assert torch.equal(detector.encoder.stem.bn.running_mean, before)
    assert not detector.encoder.blocks[3].project.bn.running_mean.equal(torch.zeros_like(
        detector.encoder.blocks[3].project.bn.running_mean))
    with pytest.raises(ValueError, match="stride must be"):
        BlendDetector(BlendDetectorConfig(frozen_below_stride=3))


def test_every_trainable_parameter_gets_a_gradient() -> None:
    """DDP refuses trainable parameters that take no part in the loss (the ImageNet head did not)."""
    for name, configs in (("blend", {"detector": {"image_size": 64}}), ("classifier", {"classifier": {"image_size": 64}})):
        module = build_modules(name, configs)[family(name).phases[0].trains]
        output = module(torch.rand(2, 3, 64, 64) - 0.5 if name == "classifier" else torch.randint(
            0, 255, (2, 64, 64, 3), dtype=torch.uint8))
        loss = output.logits.sum() + output.recon.sum() if name == "classifier" else output.sum()
        loss.backward()
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name}: {missing[:5]}"


def test_a_training_batch_is_the_reals_then_their_blends(faces) -> None:
    """Catches labels out of step with the images and blends that are not made from the same crops."""
    crops, points = faces
    config = BlendDetectorConfig(image_size=64, jpeg_probability=0.0, flip_probability=0.0)
    images, labels = blended_batch(crops, points, config, np.random.default_rng(0))
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0.0] * 8 + [1.0] * 8
    assert np.array_equal(images[:8], crops)  # no augmentation asked: reals pass unchanged
    diff = np.abs(images[8:].astype(int) - crops).mean(axis=(1, 2, 3))
    assert (diff > 0.5).all() and (diff < 40).all()  # each blend is its own crop, altered inside the face


def test_mesh_points_follow_the_model_input_resize_and_face_fraction() -> None:
    points = np.array([[0.0, 0.0], [127.0, 127.0], [63.5, 63.5]], np.float32)
    np.testing.assert_allclose(model_input_points(points, 128, 64, ModelInput()), [[-0.25, -0.25], [63.25, 63.25],
                                                                                   [31.5, 31.5]])
    # The central half of a 128 px crop is pixels 32..95, kept at 64 px: a shift by 32, no scaling.
    half = model_input_points(points, 128, 64, ModelInput(face_fraction=0.5))
    np.testing.assert_allclose(half, [[-32.0, -32.0], [95.0, 95.0], [31.5, 31.5]])


def test_training_separates_reals_from_their_self_blends(faces) -> None:
    torch.manual_seed(0)
    crops, points = faces
    modules = build_modules("blend", {"detector": {"image_size": 64, "dropout": 0.0}})
    batch = {"image": torch.from_numpy(crops), "label": torch.zeros(8), "mesh": torch.from_numpy(points)}
    before, after = phase_loss_before_and_after("blend", 0, modules, batch, steps=15, lr=1e-3, seed=0)
    assert family("blend").supervised is False and family("blend").needs_mesh
    assert before > 0.5 and after < 0.6 * before, (before, after)


def test_matched_pair_error_counts_blends_not_above_their_own_real() -> None:
    # Pairs: (0, 1) right, (2, -1) wrong, (0.5, 0.5) tied, (3, 4) right -> (0 + 1 + 0.5 + 0) / 4. Pooled,
    # every blend against every real, the same logits give 1 - 7.5 / 16 = 0.53: pairs must be matched.
    # Catches the sign, ties counted as errors or as right, and pooling.
    real = torch.tensor([0.0, 2.0, 0.5, 3.0])
    blend = torch.tensor([1.0, -1.0, 0.5, 4.0])
    assert matched_pair_error(real, blend) == 0.375
    assert matched_pair_error(blend, real) == 0.625
    with pytest.raises(ValueError, match="equal non-empty"):
        matched_pair_error(real, blend[:3])


def test_the_blend_loss_reports_bce_and_the_matched_pair_error(faces) -> None:
    crops, points = faces
    modules = build_modules("blend", {"detector": {"image_size": 64}})
    for module in modules.values():
        module.eval()
    batch = {"image": torch.from_numpy(crops), "label": torch.zeros(8), "mesh": torch.from_numpy(points)}
    phase = family("blend").phases[0]
    with torch.no_grad():
        _, metrics = phase.loss(modules, batch, torch.Generator().manual_seed(0))
    assert phase.metric == "bce" and set(metrics) == {"bce", "pair_error"}
    assert metrics["pair_error"] in {k / 16 for k in range(17)}  # 8 pairs, ties counting half
