"""End to end: conformal p-values in the score output, NaN scores that get no verdict, the drift check at the
end of a run, and `flowood calibrate` (refusals, and a new version with the same weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from typer.testing import CliRunner

from flowood_ray.cli import app
from flowood_ray.cluster.recalibrate import recalibrate
from flowood_ray.cluster.score import SUMMARY_FILE, read_scores, run_score
from flowood_ray.media.datasets import build_manifest
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.registry import configure, load_registered, register_bundle
from flowood_ray.scoring.calibration import Calibration

pytestmark = pytest.mark.e2e
GLOW = "models:/flowood-glow@candidate"


@pytest.fixture(scope="module")
def manifest(synth_crops: Path):
    return build_manifest(synth_crops.parent / "archive")


def test_every_row_gets_its_exact_conformal_p_value_and_the_verdict_follows_it(
    manifest, trained_models: dict, tmp_path: Path
) -> None:
    """p = (1 + #{calibration reals >= s}) / (n + 1), recomputed here from the registered calibration:
    catches p-values against the wrong level, a >/>= slip, and verdicts that ignore them."""
    uri = trained_models["tracking_uri"]
    test = manifest.filter(pc.equal(manifest.column("split"), "test"))
    videos = run_score(test, tmp_path / "s", [GLOW], SamplingConfig(num_frames=6), local=True, tracking_uri=uri)
    _, frames = read_scores(tmp_path / "s")
    configure(uri)
    bundle = load_registered(GLOW)
    primary = bundle.calibration["primary"]
    for level, table in (("video", videos.filter(pc.field("frames_scored") > 0)), ("frame", frames)):
        calibration = Calibration.model_validate(bundle.calibration[level][primary])
        reals = np.asarray(calibration.scores)
        # Frame level: each calibration frame weighs 1/(frames of its clip), and n counts the clips.
        weights = np.asarray(calibration.weights) if level == "frame" else np.ones_like(reals)
        assert weights.sum() == pytest.approx(calibration.n) and len(reals) == (calibration.samples or calibration.n)
        scores = table.column(primary).to_numpy()
        expected = (1 + ((reals[None, :] >= scores[:, None]) * weights).sum(axis=1)) / (calibration.n + 1)
        np.testing.assert_allclose(table.column(f"{primary}_p").to_numpy(), expected)
    for row in videos.to_pylist():
        if row["frames_scored"]:
            assert row["p_value"] == row[f"{primary}_p"] and row["calibration_n"] == len(reals_of(bundle))
            assert row["verdict"] == ("fake" if row["p_value"] <= 0.01 else "real")
    summary = json.loads((tmp_path / "s" / SUMMARY_FILE).read_text())
    check = next(iter(summary["drift"].values()))
    # The synthetic validation split has a handful of videos: too few to resolve 1%, and the run says so.
    assert "cannot resolve fpr=0.01" in check["warning"] and sum(summary["verdicts"].values()) == test.num_rows


def reals_of(bundle) -> list[float]:
    return bundle.calibration["video"][bundle.calibration["primary"]]["scores"]


def test_a_nan_score_is_unscored_never_real(manifest, trained_models: dict, tmp_path: Path) -> None:
    """A model whose weights went NaN gives NaN scores: those videos are `unscored`, not `real`."""
    import mlflow

    uri = trained_models["tracking_uri"]
    configure(uri)
    bundle = load_registered(GLOW)
    with torch.no_grad():
        next(bundle.modules["glow"].parameters()).fill_(float("nan"))
    with mlflow.start_run() as run:
        pass
    version = register_bundle(bundle, run.info.run_id, "flowood-glow-broken", alias="broken")
    test = manifest.filter(pc.equal(manifest.column("split"), "test")).slice(0, 2)
    videos = run_score(test, tmp_path / "nan", [f"models:/flowood-glow-broken/{version}"],
                       SamplingConfig(num_frames=4), local=True, tracking_uri=uri)
    assert set(videos.column("verdict").to_pylist()) == {"unscored"}


def test_calibrate_refuses_fakes_and_too_few_reals_then_registers_same_weights_new_thresholds(
    manifest, trained_models: dict, tmp_path: Path
) -> None:
    uri = trained_models["tracking_uri"]
    reals = manifest.filter(pc.equal(manifest.column("label"), 0))
    with pytest.raises(ValueError, match="labelled fake"):
        recalibrate(GLOW, manifest, tmp_path / "fakes", "archive-test", tracking_uri=uri, local=True)
    with pytest.raises(ValueError, match=r"need at least 99 scored real videos for fpr=0.01, got \d+"):
        recalibrate(GLOW, reals, tmp_path / "few", "archive-test", tracking_uri=uri, local=True,
                    sampling=SamplingConfig(num_frames=4))
    shutil.rmtree(tmp_path / "few")
    # 12 real videos resolve a 10% rate (n >= 1/0.1 - 1 = 9): the recalibration goes through.
    summary = recalibrate(GLOW, reals, tmp_path / "ok", "archive-test", fprs=(0.1,), tracking_uri=uri, local=True,
                          sampling=SamplingConfig(num_frames=4))
    configure(uri)
    old, new = load_registered(GLOW), load_registered("models:/flowood-glow@archive-test")
    assert new.version == summary["version"] != old.version and summary["videos"] == reals.num_rows
    for name, module in old.modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, new.modules[name].state_dict()[key]), (name, key)
    assert new.extra["entropy_bpd"] == old.extra["entropy_bpd"]  # the score itself is unchanged
    scores, _ = read_scores(tmp_path / "ok")
    primary = old.calibration["primary"]
    video = Calibration.model_validate(new.calibration["video"][primary])
    assert video.n == reals.num_rows and sorted(video.scores) == sorted(scores.column(primary).to_pylist())
    frame = Calibration.model_validate(new.calibration["frame"][primary])
    # Frame thresholds stand on the clips, not on their frames (up to 4 each), and `models list` says so.
    assert (frame.n, frame.samples) == (reals.num_rows, summary["frames"]) and summary["frames"] > reals.num_rows
    listing = CliRunner().invoke(app, ["models", "list", "--tracking-uri", uri])
    assert listing.exit_code == 0, listing.output
    entry = next(e for e in ("\n" + listing.output).split("\nflowood-") if e.startswith("glow ") and f" v{new.version} " in e)
    assert f"frame: {reals.num_rows} clips ({summary['frames']} frames), thresholds 0.1: " in entry
    assert list(video.thresholds) == [0.1]
