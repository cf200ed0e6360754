"""Deep SVDD (Ruff et al., ICML 2018) on the frozen encoder's pooled multi-scale features.

A network phi maps a crop's pooled feature vector (see :func:`~flowood_ray.models.differnet.pooled_features`)
into a space where real crops gather around a fixed centre c; the training loss is the mean squared
distance ||phi(f) - c||^2 plus the paper's weight decay, and the same distance is the anomaly score.
Two rules of the paper keep the hypersphere from collapsing to a point every input reaches:

* c is fixed, set once to the mean of phi's outputs on the first training batch (a buffer, so it is
  saved with the weights), never learnt;
* phi has no bias terms and ends on a linear layer (no bounded activation): a bias or a saturated
  output could produce c for every input with all weights at zero.

Like Ruff's reference code, centre coordinates closer to 0 than ``centre_eps`` are pushed to +-eps:
a unit whose target is 0 is matched by zero weights into it, whatever the input.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from flowood_ray.models.differnet import Strides, pooled_dim
from flowood_ray.models.efficientnet import Variant
from flowood_ray.models.flow_blocks import _sum_over_ranks

LEAKY_SLOPE = 0.1


class DeepSVDDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(128, ge=32, le=512)
    variant: Variant = "lite0"
    strides: Strides = (8, 16, 32)
    widths: tuple[int, ...] = Field((256, 64), min_length=1, description="layer widths; the last is phi's output")
    weight_decay: float = Field(1e-6, ge=0.0, description="the objective's lambda / 2 * ||W||^2 weight")
    centre_eps: float = Field(0.1, ge=0.0)


class DeepSVDD(nn.Module):
    """``forward(pooled (N, D)) -> squared distance to the centre (N,)``; the first forward in training
    mode sets the centre from its batch (pooled over torch.distributed ranks, so every rank agrees)."""

    def __init__(self, config: DeepSVDDConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        previous = pooled_dim(config.variant, config.strides)
        for index, width in enumerate(config.widths):
            if index:
                layers.append(nn.LeakyReLU(LEAKY_SLOPE))
            layers.append(nn.Linear(previous, width, bias=False))
            previous = width
        self.net = nn.Sequential(*layers)
        self.register_buffer("centre", torch.zeros(config.widths[-1]))
        # uint8 rather than bool so that collective broadcasts of buffers work on every backend.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, pooled: Tensor) -> None:
        outputs = self.net(pooled)
        count = _sum_over_ranks(outputs.new_tensor(float(outputs.shape[0])))
        centre = _sum_over_ranks(outputs.sum(dim=0)) / count
        eps = self.config.centre_eps
        pushed = torch.where(centre < 0, -eps, eps).to(centre)
        self.centre.copy_(torch.where(centre.abs() < eps, pushed, centre))
        self.initialized.fill_(1)

    def forward(self, pooled: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            self._initialize(pooled)
        if not bool(self.initialized):
            raise ValueError("the Deep SVDD centre is not set: train the model (its first batch sets it) first")
        return (self.net(pooled) - self.centre).pow(2).sum(dim=1)

    def weight_penalty(self) -> Tensor:
        """The objective's regulariser, weight_decay / 2 * sum of squared weights."""
        return self.config.weight_decay / 2 * sum(p.pow(2).sum() for p in self.parameters())
