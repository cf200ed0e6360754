"""The supervised classifier family (seed 004) on the ImageNet EfficientNet-Lite: shapes, batch independence,
ODIN, training of the classifier and of its abnormality module against self-blends."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODELS, phase_loss_before_and_after
from flowood_ray.media.shards import labelled_split_ids
from flowood_ray.models.catalog import build_modules, parse_configs
from flowood_ray.models.classifier import (
    ODIN_TEMPERATURE, FakeClassifierConfig, auxiliary, balanced_mean, fake_or_abnormal, odin_score,
)
from flowood_ray.models.glow import preprocess
from flowood_ray.registry import ModelBundle
from flowood_ray.scoring.scorers import build_scorer


@pytest.fixture(scope="module")
def faces() -> tuple[torch.Tensor, torch.Tensor]:
    """Twelve 32 px crops of scikit-image's astronaut, slightly shifted, and their face meshes."""
    import cv2
    import mediapipe as mp
    import skimage.data

    photo = skimage.data.astronaut()
    windows = [photo[20 + d: 260 + d, 130 - d: 370 - d] for d in range(0, 24, 2)]
    crops = np.stack([cv2.resize(w, (32, 32), interpolation=cv2.INTER_AREA) for w in windows])
    # Meshed at 128 px (MediaPipe misses faces this small), in 32 px coordinates (normalised landmarks).
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        points = np.stack([[(p.x * 32, p.y * 32) for p in mesh.process(
            cv2.resize(w, (128, 128), interpolation=cv2.INTER_AREA)).multi_face_landmarks[0].landmark]
            for w in windows]).astype(np.float32)
    return torch.from_numpy(crops), torch.from_numpy(points)


def _textures(n: int, generator: torch.Generator) -> torch.Tensor:
    """Noisy colour gradients: face stand-ins with fine texture everywhere."""
    base = torch.rand(n, 1, 1, 3, generator=generator) * 120 + 60
    ramp = torch.linspace(-30, 30, 32).view(1, 32, 1, 1)
    return (base + ramp + 12 * torch.randn(n, 32, 32, 3, generator=generator)).clamp(0, 255).to(torch.uint8)


def _smoothed_centre(images: torch.Tensor) -> torch.Tensor:
    """The centre of each image low-passed, as a re-rendered face region is."""
    x = images.permute(0, 3, 1, 2).float()
    blurred = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    out = x.clone()
    out[:, :, 8:24, 8:24] = blurred[:, :, 8:24, 8:24]
    return out.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_config_rejects_shapes_the_network_cannot_take() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        FakeClassifierConfig(image_size=48)
    # The abnormality module reads the encoder's stride-32 features: 320 channels in Lite0, 352 in Lite2.
    assert parse_configs("classifier", TINY_MODELS["classifier"])["abnormality"].feature_dim == 320
    lite2 = {"classifier": {"image_size": 32, "variant": "lite2"}}
    assert parse_configs("classifier", lite2)["abnormality"].feature_dim == 352


def test_balanced_mean_weighs_each_class_equally() -> None:
    values = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert float(balanced_mean(values, torch.tensor([0, 1, 1, 1]))) == pytest.approx(0.5)
    assert float(balanced_mean(values, torch.tensor([1, 1, 1, 1]))) == pytest.approx(0.25)


def test_fake_or_abnormal_is_the_noisy_or_of_both_probabilities() -> None:
    a, b = torch.tensor([-3.0, 0.0, 2.5, 30.0]), torch.tensor([1.0, -2.0, 0.5, -30.0])
    neither = torch.sigmoid(-a.double()) * torch.sigmoid(-b.double())  # 1 - sigmoid(z) without cancellation
    torch.testing.assert_close(fake_or_abnormal(a, b).double(), -torch.log(neither), rtol=1e-5, atol=1e-6)


def test_odin_perturbation_raises_the_top_softmax_and_is_per_input() -> None:
    torch.manual_seed(0)
    classifier = build_modules("classifier", TINY_MODELS["classifier"])["classifier"].eval()
    x = preprocess(_textures(6, torch.Generator().manual_seed(1)), 8, "center")
    with torch.no_grad():
        msp_t = 1 - F.softmax(classifier(x).logits / ODIN_TEMPERATURE, dim=1).max(dim=1).values
    odin = odin_score(classifier, x)
    # A step against the gradient of -log max softmax can only raise the max softmax (to first order).
    assert (odin <= msp_t + 1e-7).all() and (odin < msp_t).any()
    assert all(p.grad is None for p in classifier.parameters())
    torch.testing.assert_close(torch.cat([odin_score(classifier, x[i : i + 1]) for i in range(6)]), odin)


def test_training_separates_smoothed_faces_and_the_abnormality_module_flags_self_blends(faces) -> None:
    """The classifier learns the fakes it is shown; the abnormality module, classifier frozen, learns to
    flag self-blends of the real crops (its outliers need their face meshes)."""
    torch.manual_seed(0)
    modules = build_modules("classifier", TINY_MODELS["classifier"])
    real, meshes = faces
    batch = {"image": torch.cat([real, _smoothed_centre(real)]),
             "label": torch.cat([torch.zeros(12), torch.ones(12)]).to(torch.uint8),
             "mesh": torch.cat([meshes, meshes])}
    before, after = phase_loss_before_and_after("classifier", 0, modules, batch, steps=25, lr=1e-3)
    assert after < before - 0.3, (before, after)
    # Train mode: 25 steps leave BatchNorm's running statistics (momentum 0.01) near ImageNet's.
    with torch.no_grad():
        logits = modules["classifier"].train()(preprocess(batch["image"], 8, "center")).logits
    assert (logits.argmax(1) == batch["label"]).float().mean() > 0.9
    before, after = phase_loss_before_and_after("classifier", 1, modules, batch, steps=60, lr=1e-2, seed=3)
    assert after < before - 0.1, (before, after)


def test_scorer_outputs_every_score_per_crop_independently_of_the_batch() -> None:
    torch.manual_seed(0)
    configs = TINY_MODELS["classifier"]
    modules = build_modules("classifier", configs)
    parsed = {k: v.model_dump() for k, v in parse_configs("classifier", configs).items()}
    scorer = build_scorer(ModelBundle(family="classifier", configs=parsed, modules=modules, code_version="test"))
    crops = _textures(7, torch.Generator().manual_seed(4)).numpy()
    together = scorer.score(crops)
    assert set(together) == {"cls_fake", "cls_msp", "cls_energy", "cls_odin", "cls_recon", "cls_abnormality",
                             "cls_fake_or_abnormal"}
    assert scorer.primary in together
    for name, values in together.items():
        assert values.shape == (7,) and np.isfinite(values).all(), name
        alone = np.concatenate([scorer.score(crops[i : i + 1])[name] for i in range(7)])
        np.testing.assert_allclose(alone, values, rtol=1e-5, atol=1e-6, err_msg=name)
    with torch.no_grad():
        x = preprocess(scorer.model_input(crops), 8, "center")
        aux = auxiliary(modules["classifier"](x), x, modules["abnormality"].config.residual_grid)
    assert aux.shape == (7, 5 + 320 + 16)


def test_labelled_split_selects_reals_and_the_chosen_methods_fakes() -> None:
    videos = pa.table({
        "video_id": ["r1", "r2", "f1", "f2", "f3", "v1"],
        "label": [0, 0, 1, 1, 1, 0],
        "method": [None, None, "Deepfakes", "FaceSwap", "Deepfakes", None],
        "split": ["train", "train", "train", "train", "train", "val"],
        "faces": [8, 0, 8, 8, 8, 8],
    })
    assert labelled_split_ids(videos, "train") == {"r1": 0, "f1": 1, "f2": 1, "f3": 1}
    assert labelled_split_ids(videos, "train", ["FaceSwap"]) == {"r1": 0, "f2": 1}
    with pytest.raises(ValueError, match="NeuralTextures"):
        labelled_split_ids(videos, "train", ["NeuralTextures"])
