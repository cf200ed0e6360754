"""Fixed separable low-pass filters shared by the models that look at high-frequency residuals."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Binomial 5-tap kernel: a Gaussian of variance 1 in five taps.
BINOMIAL5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def separable_blur(x: Tensor, kernel: Tensor, padding: str) -> Tensor:
    """Each channel of x (N, C, H, W) blurred by the 1-D `kernel` along both axes; `padding` is an
    F.pad mode, so the crop edge is extended rather than read as a seam against zeros."""
    c, pad = x.shape[1], len(kernel) // 2
    k = kernel.to(x)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=padding), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode=padding), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
