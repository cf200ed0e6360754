"""What the synthetic benchmark renders: its configuration, and identities -> splits -> videos ->
[target, source] pairs. Every choice derives from the seed, never from the number of workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydantic

from flowood_ray.media.ffpp_layout import QUALITY_CRF
from flowood_ray.media.manipulations import METHODS

_SALT_SPLIT = 11  # keeps the split stream independent of the identity and scene streams


class SynthConfig(pydantic.BaseModel):
    """What to render; saved into synth_meta.json so a benchmark can be reproduced."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    identities: int = pydantic.Field(8, ge=1)
    videos_per_identity: int = pydantic.Field(2, ge=1)
    seed: int = pydantic.Field(0, ge=0)
    frames: int = pydantic.Field(48, ge=8, le=10_000)
    fps: int = pydantic.Field(25, ge=1, le=120)
    size: int = pydantic.Field(256, ge=128, le=1024)
    qualities: tuple[str, ...] = ("c23", "c40")
    workers: int = pydantic.Field(2, ge=1)

    @pydantic.field_validator("identities")
    @classmethod
    def _enough_identities(cls, value: int) -> int:
        if value < 6:
            raise ValueError(f"identities must be >= 6, got {value}: splits are by identity and train, val and "
                             "test each need 2 identities so that every fake pairs two different people")
        return value

    @pydantic.field_validator("size")
    @classmethod
    def _even_size(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"size must be even (yuv420p halves the chroma planes), got {value}")
        return value

    @pydantic.field_validator("qualities")
    @classmethod
    def _known_qualities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value) or not set(value) <= QUALITY_CRF.keys():
            raise ValueError(f"qualities must be distinct names from {sorted(QUALITY_CRF)}, got {value!r}")
        return value


@dataclass(frozen=True)
class Video:
    vid: str
    identity: int
    split: str


@dataclass(frozen=True)
class FakeJob:
    method: str
    target: str
    source: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.target}_{self.source}"


@dataclass(frozen=True)
class Plan:
    videos: tuple[Video, ...]
    pairs: dict[str, list[tuple[str, str]]]

    def fakes(self) -> list[FakeJob]:
        """Both directions of every split pair, for every method, as the FF++ loader expects."""
        return [FakeJob(method, target, source, split)
                for split, pairs in self.pairs.items() for a, b in pairs
                for target, source in ((a, b), (b, a)) for method in METHODS]


def _pair_videos(videos: Sequence[Video]) -> list[tuple[str, str]]:
    """Pair videos of different identities, each video in exactly one pair (or in the one triple).

    Videos are grouped by identity and video k is paired with video k + n/2: no identity holds more
    than half of a split, so the two halves never meet an identity of their own. An odd count
    takes its first three videos from three different identities as a rotation a-b, b-c, c-a.
    """
    pending = list(videos)
    pairs: list[tuple[str, str]] = []
    if len(pending) % 2:
        triple: list[Video] = []
        for identity in dict.fromkeys(v.identity for v in pending):
            if len(triple) < 3:
                triple.append(next(v for v in reversed(pending) if v.identity == identity))
        if len(triple) < 3:
            raise ValueError("an odd number of videos in a split needs 3 identities in it")
        pending = [v for v in pending if v not in triple]
        a, b, c = (v.vid for v in triple)
        pairs += [(a, b), (b, c), (c, a)]
    half = len(pending) // 2
    pairs += [(pending[k].vid, pending[k + half].vid) for k in range(half)]
    return sorted(pairs)


def plan_benchmark(config: SynthConfig) -> Plan:
    """Split identities about 60/20/20 (at least 2 each in val and test), then pair within splits."""
    n = config.identities
    order = np.random.default_rng([config.seed, _SALT_SPLIT]).permutation(n)
    n_val = n_test = max(2, round(0.2 * n))
    split_of = {int(i): ("val" if k < n_val else "test" if k < n_val + n_test else "train")
                for k, i in enumerate(order)}
    videos = tuple(Video(f"{i * config.videos_per_identity + j:03d}", i, split_of[i])
                   for i in range(n) for j in range(config.videos_per_identity))
    pairs = {split: _pair_videos([v for v in videos if v.split == split]) for split in ("train", "val", "test")}
    identity = {v.vid: v.identity for v in videos}
    if any(identity[a] == identity[b] for split_pairs in pairs.values() for a, b in split_pairs):
        raise RuntimeError("pairing produced a same-identity pair")  # _pair_videos rules this out
    return Plan(videos, pairs)
