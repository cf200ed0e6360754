"""Clip embedders: shapes, self-supervised training, R3D-18 key layout and weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowood_ray.models.clip_embedder import (
    KINETICS_MEAN,
    KINETICS_STD,
    ClipAutoencoder,
    ClipAutoencoderConfig,
    ClipEncoder,
    ClipEncoderConfig,
    R3D18Encoder,
    load_r3d18_weights,
    preprocess_clips,
)

TINY = ClipAutoencoderConfig(encoder=ClipEncoderConfig(widths=(8, 16), embed_dim=16), clip_frames=4, image_size=16)


@pytest.fixture(scope="module")
def r3d() -> R3D18Encoder:
    torch.manual_seed(0)
    return R3D18Encoder().eval()


def test_preprocess_clips_layout_and_normalisations() -> None:
    clips = torch.randint(0, 256, (2, 4, 6, 5, 3), dtype=torch.uint8)
    x = preprocess_clips(clips)
    assert x.shape == (2, 3, 4, 6, 5) and x.dtype == torch.float32
    torch.testing.assert_close(x[1, 2, 3, 4, 0], clips[1, 3, 4, 0, 2].float() / 255 - 0.5)
    k = preprocess_clips(clips, normalization="kinetics")
    torch.testing.assert_close(k[0, 1, 0, 0, 0], (clips[0, 0, 0, 0, 1].float() / 255 - KINETICS_MEAN[1]) / KINETICS_STD[1])
    with pytest.raises(ValueError):
        preprocess_clips(clips[..., :2])


def test_clip_encoder_embeds_each_clip_independently_even_in_training_mode() -> None:
    torch.manual_seed(0)
    encoder = ClipEncoder(TINY.encoder).train()  # GroupNorm: no batch statistics
    clips = torch.rand(3, 3, 4, 16, 16) - 0.5
    together = encoder(clips)
    assert together.shape == (3, 16)
    alone = torch.cat([encoder(clips[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_clip_autoencoder_reconstructs_the_clip_shape_and_learns() -> None:
    torch.manual_seed(0)
    model = ClipAutoencoder(ClipAutoencoderConfig.model_validate_json(TINY.model_dump_json()))
    # Clips of a drifting coloured blob: structure an embedding can capture.
    t = torch.arange(4.0).view(1, 1, 4, 1, 1)
    rows = torch.arange(16.0).view(1, 1, 1, 16, 1)
    cols = torch.arange(16.0).view(1, 1, 1, 1, 16)
    start = torch.randint(2, 10, (16, 1, 1, 1, 1)).float()
    colour = torch.rand(16, 3, 1, 1, 1) - 0.5
    clips = colour * torch.exp(-((rows - start - t) ** 2 + (cols - 8) ** 2) / 8.0)
    assert model(clips).shape == clips.shape
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    initial = model.loss(clips).item()
    for _ in range(40):
        loss = model.loss(clips)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.loss(clips).item() < 0.5 * initial


def test_clip_autoencoder_config_rejects_indivisible_clip_shapes() -> None:
    with pytest.raises(ValueError):
        ClipAutoencoderConfig(encoder=ClipEncoderConfig(widths=(8, 16, 32)), clip_frames=6, image_size=64)


def test_r3d18_state_dict_has_torchvision_keys_and_shapes(r3d: R3D18Encoder) -> None:
    state = r3d.state_dict()
    # torchvision r3d_18: 122 entries including fc.weight and fc.bias.
    assert len(state) == 120
    assert not any(key.startswith("fc.") for key in state)
    expected = {
        "stem.0.weight": (64, 3, 3, 7, 7),
        "stem.1.running_var": (64,),
        "layer1.0.conv1.0.weight": (64, 64, 3, 3, 3),
        "layer1.1.conv2.1.weight": (64,),
        "layer2.0.conv1.0.weight": (128, 64, 3, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1, 1),
        "layer2.0.downsample.1.num_batches_tracked": (),
        "layer4.1.conv2.0.weight": (512, 512, 3, 3, 3),
        "layer4.1.conv2.1.bias": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(key.startswith("layer1.0.downsample") for key in state)
    assert r3d.stem[0].stride == (1, 2, 2) and r3d.stem[0].padding == (1, 3, 3)
    assert r3d.layer3[0].downsample[0].stride == (2, 2, 2)


def test_r3d18_weights_load_from_a_state_dict_file_with_or_without_fc(r3d: R3D18Encoder, tmp_path: Path) -> None:
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        reference = r3d(clips)
    assert reference.shape == (2, 512)

    with_fc = dict(r3d.state_dict())
    with_fc["fc.weight"] = torch.randn(400, 512)
    with_fc["fc.bias"] = torch.zeros(400)
    torch.save(with_fc, tmp_path / "r3d_18.pth")
    fresh = R3D18Encoder().eval()
    load_r3d18_weights(fresh, tmp_path / "r3d_18.pth")
    with torch.no_grad():
        torch.testing.assert_close(fresh(clips), reference)

    torch.save(r3d.state_dict(), tmp_path / "no_fc.pth")
    load_r3d18_weights(R3D18Encoder(), tmp_path / "no_fc.pth")

    broken = dict(r3d.state_dict())
    del broken["layer3.1.conv1.0.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="layer3.1.conv1.0.weight"):
        load_r3d18_weights(R3D18Encoder(), tmp_path / "broken.pth")
