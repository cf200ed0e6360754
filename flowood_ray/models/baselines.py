"""Reference densities that a learned model has to beat."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class DiagonalGaussian:
    """Independent Gaussian per dimension, fitted by maximum likelihood."""

    def __init__(self, mean: Tensor, var: Tensor) -> None:
        self.mean, self.var = mean, var

    @classmethod
    def fit(cls, x: Tensor, min_var: float = 1e-6) -> "DiagonalGaussian":
        """x (N, D); the variance floor keeps constant dimensions from giving infinite density."""
        return cls(x.mean(0), x.var(0, unbiased=False).clamp_min(min_var))

    def log_prob(self, x: Tensor) -> Tensor:
        return -0.5 * (((x - self.mean) ** 2) / self.var + torch.log(self.var) + math.log(2 * math.pi)).sum(1)
