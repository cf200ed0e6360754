"""Clip models are scored with the frame sampling of their training crops (stored in the bundle's
`extra`), because a clip is a window of consecutive sampled crops and the sampling sets its frame
spacing; a run that asks for a sampling spacing frames otherwise is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TINY_MODELS, face_frames, write_video
from flowood_ray.cluster.score import CONFIG_FILE, FRAMES_DIR, clip_sampling, run_score, sampling_of
from flowood_ray.cluster.train_job import calibrate_bundle
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.models.catalog import build_modules, family, parse_configs
from flowood_ray.registry import ModelBundle, configure, register_bundle

UNIFORM_6 = SamplingConfig(num_frames=6)


def _bundle(family_name: str, sampling: SamplingConfig | None, name: str = "m") -> ModelBundle:
    """Only what sampling decisions read: the family and `extra` (no weights)."""
    extra = {} if sampling is None else {"sampling": sampling.model_dump(mode="json")}
    return ModelBundle(family=family_name, configs={}, modules={}, extra=extra, name=name, version="1")


def test_scoring_takes_the_clip_models_training_sampling_by_default() -> None:
    # Catches the run's default (uniform 32) being used for a clip model trained on another sampling.
    assert sampling_of([_bundle("glow", None), _bundle("clip", UNIFORM_6)], None) == UNIFORM_6
    stride = SamplingConfig(mode="stride", stride=3, max_frames=40)
    assert sampling_of([_bundle("clip", stride)], None) == stride


def test_frame_models_take_any_sampling() -> None:
    assert sampling_of([_bundle("glow", None)], None) == SamplingConfig()
    asked = SamplingConfig(mode="stride", stride=5, max_frames=10)
    assert sampling_of([_bundle("glow", None), _bundle("vqvae", None)], asked) is asked
    # A frame model's recorded sampling (none is recorded today) constrains nothing.
    assert clip_sampling(_bundle("glow", UNIFORM_6)) is None


@pytest.mark.parametrize(
    ("trained", "asked"),
    [(UNIFORM_6, SamplingConfig(num_frames=32)),
     (UNIFORM_6, SamplingConfig(mode="stride", stride=2, max_frames=6)),
     (SamplingConfig(mode="stride", stride=3), SamplingConfig(mode="stride", stride=2, max_frames=40)),
     (SamplingConfig(mode="all", max_frames=64), SamplingConfig(num_frames=64)),
     (UNIFORM_6, SamplingConfig(mode="segments", num_frames=6, segments=2)),
     (SamplingConfig(mode="segments", num_frames=32), SamplingConfig(mode="segments", num_frames=32, segments=8))],
)
def test_a_request_that_spaces_frames_otherwise_is_refused(trained: SamplingConfig, asked: SamplingConfig) -> None:
    with pytest.raises(ValueError, match="clip model trained on frames sampled"):
        sampling_of([_bundle("clip", trained)], asked)


@pytest.mark.parametrize(
    ("trained", "asked"),
    [(UNIFORM_6, SamplingConfig(num_frames=6)),
     # A frame cap drops whole clips at the end; the clips themselves are spaced as in training.
     (SamplingConfig(mode="stride", stride=3), SamplingConfig(mode="stride", stride=3, max_frames=40)),
     (SamplingConfig(mode="all"), SamplingConfig(mode="stride", stride=1, max_frames=100)),
     (SamplingConfig(mode="segments", num_frames=16), SamplingConfig(mode="segments", num_frames=16))],
)
def test_a_request_with_the_trained_spacing_is_kept(trained: SamplingConfig, asked: SamplingConfig) -> None:
    assert sampling_of([_bundle("clip", trained)], asked) is asked


def test_an_uncapped_stride_training_sampling_needs_a_cap_to_score() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        sampling_of([_bundle("clip", SamplingConfig(mode="stride", stride=2))], None)
    # Segment runs have a fixed count, like uniform sampling: the trained sampling is used as it is.
    runs = SamplingConfig(mode="segments", num_frames=16, segments=2)
    assert sampling_of([_bundle("clip", runs)], None) == runs


def test_clip_models_trained_on_different_samplings_cannot_share_a_run() -> None:
    bundles = [_bundle("clip", UNIFORM_6, "a"), _bundle("clip", SamplingConfig(num_frames=8), "b")]
    with pytest.raises(ValueError, match="separate runs"):
        sampling_of(bundles, None)


def test_a_clip_model_registered_without_its_sampling_is_scored_as_asked_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked = SamplingConfig(num_frames=12)
    with caplog.at_level(logging.WARNING, logger="flowood_ray.cluster.score"):
        assert sampling_of([_bundle("clip", None)], asked) is asked
    assert "cannot be checked" in caplog.text


@pytest.fixture(scope="module")
def clip_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A SQLite registry with an (untrained, calibrated) tiny clip model whose training sampling was
    uniform 6 frames, and a folder archive of one 25-frame real face video."""
    root = tmp_path_factory.mktemp("clip_registry")
    uri = configure(f"sqlite:///{root / 'mlflow.db'}")
    torch.manual_seed(0)
    modules = build_modules("clip", TINY_MODELS["clip"])
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():  # ActNorm's data-dependent initialisation, as the first training step would do
        clips = torch.from_numpy(crops[:24].reshape(6, 4, 32, 32, 3))
        family("clip").phases[-1].loss(modules, {"image": clips}, None)
    configs = {k: v.model_dump(mode="json") for k, v in parse_configs("clip", TINY_MODELS["clip"]).items()}
    bundle = ModelBundle(family="clip", configs=configs, modules=modules, code_version="test", extra={
        "crop": CropConfig(size=32).model_dump(), "sampling": UNIFORM_6.model_dump(mode="json"),
    })
    calibrate_bundle(bundle, crops[:8], crops, np.repeat(np.array(["a", "b", "c", "d"]), 8))
    experiment = mlflow.create_experiment("clip-sampling", artifact_location=(root / "artifacts").as_uri())
    register_bundle(bundle, mlflow.MlflowClient().create_run(experiment).info.run_id, alias="champion")
    write_video(root / "archive" / "real" / "face.mp4", face_frames(25, seed=2))
    return uri, root / "archive"


def test_run_score_samples_a_clip_models_videos_as_it_was_trained(clip_registry: tuple[str, Path],
                                                                   tmp_path: Path) -> None:
    uri, archive = clip_registry
    manifest = build_manifest(archive)
    videos = run_score(manifest, tmp_path / "scores", ["models:/flowood-clip@champion"], None, local=True,
                       tracking_uri=uri)
    assert videos.column("status").to_pylist() == ["ok"]
    assert json.loads((tmp_path / "scores" / CONFIG_FILE).read_text())["sampling"] == UNIFORM_6.model_dump()
    frames = pq.ParquetDataset(sorted((tmp_path / "scores" / FRAMES_DIR).glob("*.parquet"))).read()
    # Uniform 6 of 25 frames, by hand: the centres of six equal segments, floor((i + 0.5) * 25 / 6).
    assert sorted(frames.column("frame_index").to_pylist()) == [2, 6, 10, 14, 18, 22]

    with pytest.raises(ValueError, match="clip model trained on frames sampled"):
        run_score(manifest, tmp_path / "other", ["models:/flowood-clip@champion"], SamplingConfig(num_frames=32),
                  local=True, tracking_uri=uri)
    assert not (tmp_path / "other").exists()
