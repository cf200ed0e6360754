"""Nearest-normal-patch distance (Patch SVDD's anomaly score, Yi & Yoon, ACCV 2020) on frozen ImageNet fibres.

Patch SVDD scores every patch of a test image by the L2 distance of its feature to the nearest
feature of a normal training patch. Here the patch features are the frozen encoder's fibres (the
feature vector at one position of the stride-8, optionally stride-16, map; Patch SVDD learns its own
patch encoder, which this baseline leaves to the ImageNet weights), and "training" fills a memory bank
with a uniform random sample of at most ``bank_size`` real training fibres per scale: reservoir
sampling (Vitter's Algorithm R) over every fibre the training loop offers. Memory: bank_size x
channels x 4 bytes per scale, 3.2 MB (stride 8) and 9 MB (stride 16) at the Lite0 default of 20,000,
saved with the weights; the search holds at most CHUNK_ELEMENTS distances (64 MB) at a time.

Under torch.distributed every rank offers its fibres to all: the batch's fibres are gathered from
every rank in rank order and the reservoir's draws are seeded by the number of fibres seen so far, so
every rank keeps the identical bank (DDP, which re-broadcasts rank 0's buffers at every step, then
has nothing to correct).

The map standardises each scale's distance map with the mean and std of real training crops'
distances, upsamples it bilinearly and averages the scales, as CFLOW's map (so every crop's map is
batch-independent); the image scores are its maximum, top-k mean and mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from flowood_ray.models.cflow import anomaly_map, image_scores
from flowood_ray.models.differnet import Strides
from flowood_ray.models.efficientnet import Variant, stride_channels

CHUNK_ELEMENTS = 2**24
# Nearest-neighbour candidates per query from the fast matrix-product distances, then measured exactly.
CANDIDATES = 8


class PatchSVDDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(128, ge=32, le=512)
    variant: Variant = "lite0"
    strides: Strides = (8,)
    bank_size: int = Field(20_000, ge=1, description="real training fibres kept per scale")
    top_k_fraction: float = Field(0.01, gt=0.0, le=1.0, description="share of map pixels in the top-k image score")


def gather_from_ranks(rows: Tensor) -> Tensor:
    """Every torch.distributed rank's rows, concatenated in rank order (``rows`` itself when not
    distributed); ranks may hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    padded = rows.new_zeros((int(max(sizes)), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])


def reservoir_slots(seen: int, count: int, capacity: int, generator: torch.Generator) -> Tensor:
    """(count,) bank slot of each of `count` new items after `seen` earlier ones under Algorithm R, -1 for
    an item not kept: item t (0-based) fills slot t while the bank has room, later replaces a uniform
    slot with probability capacity / (t + 1). Within one offer a later item replacing an earlier one in
    the same slot wins, as it would item by item."""
    index = seen + torch.arange(count, dtype=torch.float64)
    draw = torch.floor(torch.rand(count, generator=generator, dtype=torch.float64) * (index + 1))
    slots = torch.where(index < capacity, index, draw).long()
    order = torch.arange(count)
    kept = slots < capacity
    last = torch.full((capacity,), -1, dtype=torch.long).scatter_reduce(0, slots[kept], order[kept], reduce="amax")
    kept &= last[slots.clamp(max=capacity - 1)] == order
    return torch.where(kept, slots, -1)


def nearest_distances(queries: Tensor, bank: Tensor, skip_copies: bool = False) -> Tensor:
    """(M,) L2 distance of each query (M, C) to its nearest bank row (B, C).

    Candidates come from the matrix-product form of the squared distance, which is fast but loses
    precision to cancellation; their distances are then measured directly, so a query that is in the
    bank scores exactly 0. ``skip_copies`` passes over bank rows identical to the query (a training
    crop's own fibres, when statistics are measured on training crops); a query with CANDIDATES or more
    copies keeps 0."""
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty: train the model first")
    k = min(CANDIDATES, bank.shape[0])
    bank_norms = bank.pow(2).sum(dim=1)
    rows = max(1, CHUNK_ELEMENTS // bank.shape[0])
    nearest = []
    for chunk in queries.split(rows):
        approx = chunk.pow(2).sum(dim=1, keepdim=True) - 2.0 * chunk @ bank.T + bank_norms
        candidates = approx.topk(k, dim=1, largest=False).indices
        exact = (chunk[:, None, :] - bank[candidates]).norm(dim=2)
        if skip_copies:
            exact = exact.masked_fill(exact == 0, float("inf")).min(dim=1).values
            nearest.append(exact.nan_to_num(posinf=0.0))
        else:
            nearest.append(exact.min(dim=1).values)
    return torch.cat(nearest) if nearest else queries.new_zeros(0)


class PatchBank(nn.Module):
    """Memory banks of real fibres, one per scale; ``forward(features)`` is the training step (it offers
    every fibre of the batch), :meth:`distance_maps` the test."""

    def __init__(self, config: PatchSVDDConfig) -> None:
        super().__init__()
        self.config = config
        channels = stride_channels(config.variant)
        for s in config.strides:
            self.register_buffer(f"bank_{s}", torch.zeros(config.bank_size, channels[s]))
            self.register_buffer(f"seen_{s}", torch.tensor(0, dtype=torch.long))
        # The training loop wraps (DDP) and optimises (Adam) a component with a trainable parameter only,
        # and the bank learns nothing by gradient: the training step's loss is this zero times zero.
        self.anchor = nn.Parameter(torch.zeros(()))

    def fibres(self, stride: int) -> Tensor:
        """The filled rows of a scale's bank."""
        filled = min(int(getattr(self, f"seen_{stride}")), self.config.bank_size)
        return getattr(self, f"bank_{stride}")[:filled]

    @torch.no_grad()
    def offer(self, features: dict[int, Tensor]) -> None:
        """Offer every fibre of {stride: (N, C, h, w)} maps (gathered from all ranks) to the reservoirs."""
        for s in self.config.strides:
            fmap = features[s]
            new = gather_from_ranks(fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]))
            seen = getattr(self, f"seen_{s}")
            generator = torch.Generator().manual_seed(int(seen))
            slots = reservoir_slots(int(seen), new.shape[0], self.config.bank_size, generator).to(new.device)
            kept = slots >= 0
            getattr(self, f"bank_{s}")[slots[kept]] = new[kept].to(getattr(self, f"bank_{s}").dtype)
            seen.add_(new.shape[0])

    def forward(self, features: dict[int, Tensor]) -> Tensor:
        """The training step: a zero loss. The training loop's first pass of a phase runs under no_grad on
        the batch it then trains on, so only passes with gradients offer fibres (none is offered twice)."""
        if self.training and torch.is_grad_enabled():
            self.offer(features)
        return self.anchor * 0.0

    def distance_maps(self, features: dict[int, Tensor]) -> dict[int, Tensor]:
        """{stride: (N, h, w) distance of every fibre to its nearest bank fibre}."""
        maps = {}
        for s in self.config.strides:
            n, c, h, w = features[s].shape
            queries = features[s].permute(0, 2, 3, 1).reshape(-1, c)
            maps[s] = nearest_distances(queries, self.fibres(s)).view(n, h, w)
        return maps


def patch_anomaly_map(distances: dict[int, Tensor], reference: dict[int, tuple[float, float]], size: int) -> Tensor:
    """(N, size, size): each scale's distance map standardised with real training (mean, std) of the
    distance, bilinearly upsampled, averaged over scales."""
    # CFLOW's map standardises log-likelihood maps (higher = more normal); a negated distance is one.
    negated = {s: -d for s, d in distances.items()}
    return anomaly_map(negated, {s: (-mean, std) for s, (mean, std) in reference.items()}, size)


def patch_image_scores(maps: Tensor, top_k_fraction: float) -> dict[str, Tensor]:
    """patchsvdd_max, patchsvdd_topk, patchsvdd_mean of (N, H, W) anomaly maps."""
    scores = image_scores(maps, top_k_fraction)
    return {name.replace("cflow_", "patchsvdd_", 1): value for name, value in scores.items()}
