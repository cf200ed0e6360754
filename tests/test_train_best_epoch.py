"""Each training phase keeps the weights of its best validation epoch."""

from __future__ import annotations

import math

import torch

from flowood_ray.cluster.train import _keep_best


def test_keep_best_holds_the_lowest_finite_metric_and_a_copy_of_its_weights() -> None:
    module = torch.nn.Linear(2, 1)
    best: dict = {}
    history = [(math.nan, 1.0), (3.0, 2.0), (2.0, 3.0), (2.5, 4.0), (math.nan, 5.0), (2.0, 6.0)]
    for epoch, (metric, weight) in enumerate(history, start=1):
        with torch.no_grad():
            module.weight.fill_(weight)
        _keep_best(best, "phase", metric, epoch, module)
    # Epoch 3 had the lowest metric; a NaN never displaces a finite one, and a tie keeps the earlier epoch.
    assert best["phase"]["metric"] == 2.0 and best["phase"]["epoch"] == 3
    assert torch.equal(best["phase"]["state"]["weight"], torch.full((1, 2), 3.0))
    assert torch.equal(module.weight, torch.full((1, 2), 6.0))  # a copy, not the live tensor
