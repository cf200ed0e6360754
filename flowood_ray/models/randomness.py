"""Random draws that follow a generator wherever the data lives.

Training and scoring seed CPU generators, so results do not depend on the accelerator; a draw is made
on the generator's device and moved to the data's (a CUDA tensor cannot be filled from a CPU generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def draw(
    sampler: Callable[..., torch.Tensor], shape: Sequence[int], generator: torch.Generator | None,
    device: torch.device | str, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`sampler` (torch.rand or torch.randn) of `shape` from `generator`, returned on `device`."""
    where = generator.device if generator is not None else device
    return sampler(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)
