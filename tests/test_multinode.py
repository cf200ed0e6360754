"""A two-node local Ray cluster: preprocessing and scoring spread over both nodes and finish complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from flowood_ray.cluster.preprocess import run_preprocess
from flowood_ray.cluster.score import read_scores, run_score
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig

pytestmark = pytest.mark.e2e


def _nodes(out: Path) -> set[str]:
    return set(json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["nodes"])


def test_preprocess_and_score_use_both_nodes(synth_crops: Path, trained_models: dict, tmp_path: Path) -> None:
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        manifest = build_manifest(synth_crops.parent / "archive")
        videos = run_preprocess(manifest, tmp_path / "crops", SamplingConfig(num_frames=4), CropConfig(size=32),
                                workers=2, videos_per_shard=1)
        assert sorted(videos.column("video_id").to_pylist()) == sorted(manifest.column("video_id").to_pylist())
        assert len(_nodes(tmp_path / "crops")) == 2
        scored = run_score(manifest, tmp_path / "scores", ["models:/flowood-glow@candidate"],
                           SamplingConfig(num_frames=4), workers=2, videos_per_shard=1,
                           tracking_uri=trained_models["tracking_uri"])
        assert scored.num_rows == manifest.num_rows
        assert set(scored.column("verdict").to_pylist()) <= {"real", "fake"}
        assert len(_nodes(tmp_path / "scores")) == 2
        _, frames = read_scores(tmp_path / "scores")
        assert set(frames.column("video_id").to_pylist()) == set(manifest.column("video_id").to_pylist())
    finally:
        ray.shutdown()
        cluster.shutdown()
