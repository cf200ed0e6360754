"""`flowood glow ...` over a tiny registered Glow and real face crops: every command through the CLI,
with the maths checked against latents computed here, crop by crop, and the transfer archive read
back by the FF++ loader."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import av
import cv2
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import face_frames, write_video
from typer.testing import CliRunner

from flowood_ray.cli import app
from flowood_ray.glow_tasks import (
    GlowSession,
    crop_meshes,
    edit,
    mean_faces,
    open_session,
    read_crops,
)
from flowood_ray.media.datasets import build_manifest, load_faceforensics
from flowood_ray.media.expression import mouth_opening
from flowood_ray.media.facecrop import VideoCropper, resize_crops
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import prepare_output, write_shard
from flowood_ray.models.catalog import build_modules, parse_configs
from flowood_ray.models.glow import postprocess, preprocess
from flowood_ray.registry import ModelBundle, configure, promote, register_bundle

CROP_SIZE, MODEL_SIZE, FRAMES = 64, 32, 6
MODEL = "models:/flowood-glow@champion"
runner = CliRunner()


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 'identities': the astronaut, and the astronaut mirrored with its colour channels reversed."""
    root = tmp_path_factory.mktemp("glow_crops")
    write_video(root / "videos/a.mp4", face_frames(12, seed=0))
    write_video(root / "videos/b.mp4", [np.ascontiguousarray(f[:, ::-1, ::-1]) for f in face_frames(12, seed=1)])
    sampling, crop = SamplingConfig(num_frames=FRAMES), CropConfig(size=CROP_SIZE, face_mesh=True)
    out = root / "crops"
    prepare_output(out, {"sampling": sampling.model_dump(), "crop": crop.model_dump()})
    cropper = VideoCropper(sampling, crop)
    try:
        results = write_shard(out, build_manifest(root / "videos").to_pylist(), cropper)
    finally:
        cropper.close()
    assert [r["faces"] for r in results] == [FRAMES, FRAMES]
    return out


@pytest.fixture(scope="module")
def video_ids(crops_dir: Path) -> tuple[str, str]:
    source, target = sorted(set(read_crops(crops_dir).video_ids))
    return source, target


@pytest.fixture(scope="module")
def tracking_uri(crops_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init Glow (ActNorm initialised on the crops, every weight perturbed) registered as champion."""
    root = tmp_path_factory.mktemp("glow_registry")
    uri = configure(f"sqlite:///{root / 'mlflow.db'}")
    configs = {k: v.model_dump(mode="json") for k, v in parse_configs(
        "glow", {"glow": {"image_size": MODEL_SIZE, "levels": 2, "steps_per_level": 2, "hidden_channels": 16}}).items()}
    torch.manual_seed(0)
    modules = build_modules("glow", configs)
    # face_fraction < 1 makes the crops go through the scoring input pipeline (centre cut, resize).
    bundle = ModelBundle(family="glow", configs=configs, modules=modules, extra={"input": {"face_fraction": 0.8}})
    inputs = resize_crops(read_crops(crops_dir).images[:, 6:57, 6:57].copy(), MODEL_SIZE)
    with torch.no_grad():
        for module in modules.values():
            module.train()(preprocess(torch.from_numpy(inputs), dequantize="center"))
            for param in module.parameters():
                param.add_(0.02 * torch.randn_like(param))
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("glow-latent", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment)
    promote("flowood-glow", register_bundle(bundle, run.info.run_id, name="flowood-glow"))
    client.set_terminated(run.info.run_id, "FINISHED")
    return uri


@pytest.fixture(scope="module")
def session(tracking_uri: str) -> GlowSession:
    return open_session(MODEL, tracking_uri)


def invoke(*args: str | Path) -> str:
    result = runner.invoke(app, ["glow", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def hand_latents(session: GlowSession, inputs: np.ndarray) -> list[torch.Tensor]:
    """Latents computed crop by crop, so no batching in the code under test can hide behind them."""
    with torch.no_grad():
        per_crop = [session.glow.encode(preprocess(torch.from_numpy(inputs[i : i + 1]), dequantize="center"))
                    for i in range(len(inputs))]
    return [torch.cat(level) for level in zip(*per_crop)]


def test_reconstruct_is_exact_and_lands_in_the_gallery(crops_dir: Path, tracking_uri: str, tmp_path: Path) -> None:
    """The flow is invertible: model-space error at float round-off, none in grey levels; the page embeds the grid."""
    stdout = invoke("reconstruct", crops_dir, "--tracking-uri", tracking_uri, "--out", tmp_path)
    report = json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])
    assert report["crops"] == 2 * FRAMES
    assert report["max_abs_error"] < 1e-4 and report["max_grey_error"] == 0
    # Two rows (inputs, reconstructions) of 12 cells, each 32 px enlarged 4x, 2 px apart.
    assert png(tmp_path / "reconstruct.png").shape == (2 * 128 + 2, 12 * 128 + 11 * 2, 3)
    page = (tmp_path / "index.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [(tmp_path / "reconstruct.png").read_bytes()]


def test_mean_face_is_the_decoded_average_latent(crops_dir: Path, session: GlowSession, video_ids: tuple[str, str],
                                                 tmp_path: Path) -> None:
    """Catches a mean over the wrong axis or over pixels instead of latents."""
    target = video_ids[1]
    faces = mean_faces(session, crops_dir, {"target": [target]}, tmp_path)
    latents = hand_latents(session, session.model_inputs(read_crops(crops_dir, [target]).images))
    with torch.no_grad():
        expected = postprocess(session.glow.inverse([z.sum(0, keepdim=True) / FRAMES for z in latents])).numpy()
    assert np.abs(faces.astype(int) - expected.astype(int)).max() <= 1


def test_mean_face_command_takes_an_identity_csv(crops_dir: Path, tracking_uri: str, video_ids: tuple[str, str],
                                                 tmp_path: Path) -> None:
    identities = tmp_path / "identities.csv"
    identities.write_text(f"identity,video_id\nfirst,{video_ids[0]}\nsecond,{video_ids[1]}\n")
    stdout = invoke("mean-face", crops_dir, "--identity", identities, "--tracking-uri", tracking_uri, "--out", tmp_path)
    assert "2 identities" in stdout
    assert png(tmp_path / "mean_faces.png").shape == (2 * 128 + 2, 2 * 128 + 2, 3)  # examples over mean faces


def test_rule_attribute_contrasts_the_top_and_bottom_thirds(crops_dir: Path, tracking_uri: str, session: GlowSession,
                                                            tmp_path: Path) -> None:
    """Catches a reversed vector or the wrong crops in a class: recomputed from the stored meshes by hand."""
    invoke("attribute", crops_dir, "--rule", "mouth-open", "--tracking-uri", tracking_uri, "--out", tmp_path)
    saved = torch.load(tmp_path / "attribute.pt", weights_only=True)
    assert saved["origin"] == "rule mouth-open" and saved["model"] == "flowood-glow/1"
    table = pq.read_table(next((crops_dir / "crops").glob("*.parquet"))).sort_by([("video_id", "ascending"),
                                                                                 ("frame_index", "ascending")])
    # Meshes are stored as the bytes of 468 (x, y) float32 pairs.
    opening = np.array([mouth_opening(np.frombuffer(m, np.float32).astype(np.float64).reshape(468, 2))
                        for m in table.column("mesh").to_pylist()])
    low, high = np.quantile(opening, [1 / 3, 2 / 3])
    positive, negative = opening >= high, opening <= low
    assert (saved["positives"], saved["negatives"]) == (positive.sum(), negative.sum())
    latents = hand_latents(session, session.model_inputs(read_crops(crops_dir).images))
    for vector, z in zip(saved["vector"], latents, strict=True):
        expected = z[torch.from_numpy(positive)].mean(0, keepdim=True) - z[torch.from_numpy(negative)].mean(0, keepdim=True)
        torch.testing.assert_close(vector, expected, rtol=0, atol=1e-5)


def test_csv_attribute_and_edits(crops_dir: Path, tracking_uri: str, session: GlowSession, video_ids: tuple[str, str],
                                 tmp_path: Path) -> None:
    """Labelled crops give mean(pos) - mean(neg); an edit with alpha 0 reproduces the inputs exactly."""
    crops = read_crops(crops_dir)
    rows = [(crops.video_ids[i], crops.frame_indices[i], label) for i, label in ((0, 1), (1, 1), (7, 0), (8, 0))]
    labels = tmp_path / "labels.csv"
    labels.write_text("video_id,frame_index,label\n" + "".join(f"{v},{f},{y}\n" for v, f, y in rows))
    invoke("attribute", crops_dir, "--labels", labels, "--tracking-uri", tracking_uri, "--out", tmp_path)
    vector = torch.load(tmp_path / "attribute.pt", weights_only=True)["vector"]
    latents = hand_latents(session, session.model_inputs(crops.images))
    for v, z in zip(vector, latents, strict=True):
        torch.testing.assert_close(v, (z[0:1] + z[1:2]) / 2 - (z[7:8] + z[8:9]) / 2, rtol=0, atol=1e-5)

    stdout = invoke("edit", crops_dir, "--vector", tmp_path / "attribute.pt", "--alpha", "0,2", "--max-crops", "3",
                    "--tracking-uri", tracking_uri, "--out", tmp_path)
    assert "alpha +0: mean |change| 0.000 grey levels, max 0" in stdout
    edited = edit(session, read_crops(crops_dir, [video_ids[0]], 3), tmp_path / "attribute.pt", [0.0, 2.0], tmp_path)
    inputs = session.model_inputs(read_crops(crops_dir, [video_ids[0]], 3).images)
    assert np.array_equal(edited[0.0], inputs)
    assert np.abs(edited[2.0].astype(int) - inputs.astype(int)).mean() > 1  # the vector does move the faces


def test_transfer_sweep_and_archive(crops_dir: Path, tracking_uri: str, session: GlowSession,
                                    video_ids: tuple[str, str], tmp_path: Path) -> None:
    source, target = video_ids
    stdout = invoke("transfer", crops_dir, "--source", source, "--target", target, "--variant", "linear",
                    "--variant", "variance", "--alphas", "0,1", "--tracking-uri", tracking_uri, "--out", tmp_path)
    assert "variance" in stdout and "linear" in stdout
    result = json.loads((tmp_path / "transfer.json").read_text())
    rows = {(r["variant"], r["alpha"]): r for r in result["rows"]}
    assert set(rows) == {("linear", 0.0), ("linear", 1.0), ("variance", 0.0), ("variance", 1.0)}
    # Alpha 0 outputs *are* the target's mean face, the likeness reference: distance 0. A reference taken
    # from the source, or from anything but the decoded target mean, fails this.
    for variant in ("linear", "variance"):
        assert rows[variant, 0.0]["likeness_distance"] < 1e-4
        assert rows[variant, 1.0]["likeness_distance"] > rows[variant, 0.0]["likeness_distance"]

    archive = load_faceforensics(tmp_path / "archive", "raw")
    by_label = {row["label"]: row for row in archive.to_pylist()}
    assert archive.num_rows == 2 and set(by_label) == {0, 1}
    assert by_label[1]["method"] == "GlowTransfer" and by_label[0]["method"] == "real"
    assert Path(by_label[1]["path"]).name == f"{target}_{source}.mp4" and Path(by_label[0]["path"]).name == f"{target}.mp4"
    assert by_label[0]["split"] == by_label[1]["split"] == "test"
    assert build_manifest(tmp_path / "archive.parquet").num_rows == 2

    def frames(path: str) -> np.ndarray:
        with av.open(path) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    fake, real = frames(by_label[1]["path"]), frames(by_label[0]["path"])
    assert fake.shape == real.shape == (FRAMES, 256, 256, 3)
    # The real video is the target's reconstruction (= its model inputs), enlarged; not the source's.
    target_up = resize_crops(session.model_inputs(read_crops(crops_dir, [target]).images), 256).astype(int)
    source_up = resize_crops(session.model_inputs(read_crops(crops_dir, [source]).images), 256).astype(int)
    assert np.abs(real - target_up).mean() < 2 < np.abs(real - source_up).mean()


def test_samples_grid_has_a_row_per_temperature(tracking_uri: str, tmp_path: Path) -> None:
    invoke("samples", "--temperatures", "0.5,0.7,1.0", "--n", "3", "--tracking-uri", tracking_uri, "--out", tmp_path)
    grid = png(tmp_path / "samples.png")
    assert grid.shape == (3 * 128 + 4, 3 * 128 + 4, 3)
    first, last = grid[:128, :128].astype(int), grid[-128:, :128].astype(int)
    assert np.abs(first - last).mean() > 1  # temperature changes the sample
    assert "samples.png" in (tmp_path / "index.html").read_text()


def test_bad_input_ends_with_a_message(crops_dir: Path, tracking_uri: str, tmp_path: Path) -> None:
    cases = [
        (["reconstruct", crops_dir, "--video-id", "nope"], "no crops of video"),
        (["mean-face", crops_dir], "either --video-id"),
        (["attribute", crops_dir, "--rule", "smile"], "unknown rule"),
        (["transfer", crops_dir, "--source", "x", "--target", "x"], "same video"),
        (["samples", "--temperatures", "warm"], "comma-separated numbers"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["glow", *map(str, args), "--tracking-uri", tracking_uri, "--out", str(tmp_path)])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_crops_without_a_stored_mesh_are_meshed_on_the_fly(crops_dir: Path) -> None:
    """Catches landmarks left in the enlarged image's pixels, or stored meshes overwritten."""
    crops = read_crops(crops_dir)
    blank = np.arange(len(crops.meshes)) % 2 == 0
    meshes = crop_meshes(dataclasses.replace(crops, meshes=np.where(blank[:, None, None], np.nan, crops.meshes)))
    np.testing.assert_array_equal(meshes[~blank], crops.meshes[~blank])
    # Preprocessing meshed the same crops at 64 px; the fallback meshes them enlarged, then scales back.
    assert np.abs(meshes[blank] - crops.meshes[blank]).mean() < 1.0
