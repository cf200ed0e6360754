"""A run name's checkpoint is resumed only by a training of the same model."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODELS
from flowood_ray.cluster.train import check_resumable
from flowood_ray.models.catalog import build_modules


def test_a_checkpoint_of_another_family_is_refused_with_what_to_change() -> None:
    cflow = build_modules("cflow", TINY_MODELS["cflow"])
    blend = build_modules("blend", TINY_MODELS["blend"])
    saved = {name: module.state_dict() for name, module in cflow.items()}
    check_resumable(saved, cflow, "cflow")  # its own checkpoint resumes
    with pytest.raises(ValueError, match="run name is taken by another model's training") as refused:
        check_resumable(saved, blend, "blend")
    assert "detector" in str(refused.value) and all(name in str(refused.value) for name in saved)


def test_a_checkpoint_missing_a_component_is_refused() -> None:
    modules = {"a": torch.nn.Linear(1, 1), "b": torch.nn.Linear(1, 1)}
    with pytest.raises(ValueError):
        check_resumable({"a": modules["a"].state_dict()}, modules, "two-part")
