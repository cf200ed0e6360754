"""Clip embedders: input layout, shapes and self-supervised training."""

from __future__ import annotations

import pytest
import torch

from flowood_ray.models.clip_embedder import (
    ClipAutoencoder,
    ClipAutoencoderConfig,
    ClipEncoder,
    ClipEncoderConfig,
    preprocess_clips,
)

TINY = ClipAutoencoderConfig(encoder=ClipEncoderConfig(widths=(8, 16), embed_dim=16), clip_frames=4, image_size=16)


def test_preprocess_clips_layout_and_normalisation() -> None:
    clips = torch.randint(0, 256, (2, 4, 6, 5, 3), dtype=torch.uint8)
    x = preprocess_clips(clips)
    assert x.shape == (2, 3, 4, 6, 5) and x.dtype == torch.float32
    torch.testing.assert_close(x[1, 2, 3, 4, 0], clips[1, 3, 4, 0, 2].float() / 255 - 0.5)
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
