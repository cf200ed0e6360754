"""Shared set-up for the benchmarks: one synthetic archive and its crops, made once per work directory."""

from __future__ import annotations

from pathlib import Path

from flowood_ray.cluster.preprocess import run_preprocess
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.synth import generate_benchmark
from flowood_ray.media.synth_plan import SynthConfig


def synthetic_archive(workdir: Path, identities: int = 6, frames: int = 48) -> Path:
    archive = workdir / "archive"
    if not (archive / "synth_meta.json").exists():
        generate_benchmark(archive, SynthConfig(identities=identities, videos_per_identity=2, frames=frames,
                                                qualities=("c23",), seed=5))
    return archive


def synthetic_crops(workdir: Path, size: int = 64, identities: int = 6) -> Path:
    crops = workdir / f"crops{size}"
    if not (crops / "preprocess.json").exists():
        run_preprocess(build_manifest(synthetic_archive(workdir, identities)), crops, SamplingConfig(num_frames=24),
                       CropConfig(size=size), workers=2)
    return crops
