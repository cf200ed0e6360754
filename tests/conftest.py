"""Shared fixtures: small media files built by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from flowood_ray.cluster.serve_ingress import free_port  # noqa: F401  (the tests import it from here)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two cores shared with Ray workers: more intra-op threads only make small tensors slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Tests start their own local Ray; never join a cluster from the environment by accident.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def face_frames(n: int, width: int = 320, height: int = 240, seed: int = 0) -> list[np.ndarray]:
    """A real face (scikit-image's astronaut photo) drifting and zooming slowly, as RGB frames."""
    rng = np.random.default_rng(seed)
    photo = skimage.data.astronaut()
    frames = []
    for i in range(n):
        dx, dy = int(10 * np.sin(i / 6)), int(6 * np.cos(i / 9))
        zoom = 1.0 + 0.05 * np.sin(i / 11)
        side = int(300 / zoom)
        x0, y0 = 90 + dx, 10 + dy
        frame = cv2.resize(photo[y0 : y0 + side, x0 : x0 + side], (width, height), interpolation=cv2.INTER_AREA)
        noise = rng.normal(0, 2, frame.shape)
        frames.append(np.clip(frame + noise, 0, 255).astype(np.uint8))
    return frames


def write_video(path: Path, frames: list[np.ndarray], codec: str = "libx264", fps: int = 25,
                options: dict[str, str] | None = None) -> Path:
    """`options` are the encoder's (GOP length, B-frames, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_mixed_archive(root: Path, good_videos: int = 3, frames: int = 30) -> dict[str, str]:
    """Valid face videos and images beside every kind of broken input; returns name -> expected status."""
    expected: dict[str, str] = {}
    for i in range(good_videos):
        write_video(root / f"real/clip{i}.mp4", face_frames(frames, seed=i))
        expected[f"real/clip{i}.mp4"] = "ok"
    cv2.imwrite(str(root / "real/still.jpg"), cv2.cvtColor(face_frames(1)[0], cv2.COLOR_RGB2BGR))
    expected["real/still.jpg"] = "ok"
    cv2.imwrite(str(root / "real/still.webp"), cv2.cvtColor(face_frames(1, seed=5)[0], cv2.COLOR_RGB2BGR))
    expected["real/still.webp"] = "ok"
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "real/noface.png"), cv2.GaussianBlur(noise, (31, 31), 10))
    expected["real/noface.png"] = "no_face"
    (root / "real/zero.mp4").write_bytes(b"")
    expected["real/zero.mp4"] = "empty"
    (root / "real/notes.mp4").write_text("this is a text file, not a video\n" * 20)
    expected["real/notes.mp4"] = "decode_error"
    whole = write_video(root / "tmp_whole.mp4", face_frames(frames, seed=9)).read_bytes()
    (root / "tmp_whole.mp4").unlink()
    (root / "real/truncated.mp4").write_bytes(whole[: len(whole) // 2])
    expected["real/truncated.mp4"] = "decode_error"
    # MJPEG in AVI with its second half scrambled: the first frames decode, then the decoder fails.
    broken = bytearray(write_video(root / "real/midway.avi", face_frames(frames, seed=3), codec="mjpeg").read_bytes())
    for i in range(len(broken) // 2, len(broken) * 4 // 5):
        broken[i] = (broken[i] * 7 + 13) % 256
    (root / "real/midway.avi").write_bytes(bytes(broken))
    expected["real/midway.avi"] = "decode_error"
    (root / "real/unreadable.mp4").mkdir(parents=True)
    expected["real/unreadable.mp4"] = "decode_error"
    return expected


@pytest.fixture(scope="session")
def mixed_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("mixed_archive")
    return root, build_mixed_archive(root)


@pytest.fixture(scope="session")
def synth_crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic benchmark, preprocessed into 32 px crops with face meshes on a local Ray (shared by
    e2e tests)."""
    from flowood_ray.cluster.preprocess import run_preprocess
    from flowood_ray.media.datasets import build_manifest
    from flowood_ray.media.faces import CropConfig
    from flowood_ray.media.sampling import SamplingConfig
    from flowood_ray.media.synth import generate_benchmark
    from flowood_ray.media.synth_plan import SynthConfig

    root = tmp_path_factory.mktemp("synth")
    generate_benchmark(
        root / "archive",
        SynthConfig(identities=6, videos_per_identity=2, frames=16, size=192, qualities=("c23",), seed=11),
    )
    run_preprocess(
        build_manifest(root / "archive"), root / "crops", SamplingConfig(num_frames=8), CropConfig(size=32, face_mesh=True),
        workers=2, videos_per_shard=4,
    )
    return root / "crops"


TINY_MODELS = {
    "glow": {"glow": {"image_size": 32, "levels": 2, "steps_per_level": 2, "hidden_channels": 16}},
    "vqvae": {
        "vqvae": {"image_size": 32, "hidden_channels": 32, "res_channels": 16, "n_res_blocks": 1,
                  "codebook_size": 32, "code_dim": 16},
        "prior": {"channels": 32, "n_blocks": 1, "n_res_blocks": 1, "key_channels": 16, "n_heads": 2},
    },
    "clip": {
        "encoder": {"image_size": 32, "clip_frames": 4, "encoder": {"widths": [8, 16], "embed_dim": 8}},
        "flow": {"n_layers": 4, "hidden": 32},
    },
    "patch": {"patch": {"image_size": 32, "patch": 4, "stride": 4, "n_layers": 2, "hidden": 16}},
    "classifier": {"classifier": {"image_size": 32, "decoder_widths": [32, 16, 16, 8, 8]}, "abnormality": {"hidden": 16}},
    "blend": {"detector": {"image_size": 32}},
    "cflow": {"cflow": {"image_size": 32, "strides": [8, 16], "coupling_layers": 2, "condition_dim": 8,
                        "fibers_per_image": 8}},
    "differnet": {"differnet": {"image_size": 32, "coupling_layers": 2, "hidden": 32}},
    "svdd": {"svdd": {"image_size": 32, "widths": [32, 8]}},
    "patchsvdd": {"patchsvdd": {"image_size": 32, "strides": [8, 16], "bank_size": 500}},
}
# Trained end to end on Ray (trained_models): the demo's families. DifferNet, Deep SVDD and Patch SVDD are
# baselines that train through the same loop on the same frozen encoder as CFLOW; their own tests train
# them in-process (Patch SVDD's bank also under torch.distributed), which keeps a Ray Train start-up
# (about 45 s on 2 cores) per family out of CI.
E2E_FAMILIES = ("glow", "vqvae", "clip", "patch", "classifier", "blend", "cflow")


@pytest.fixture(scope="session")
def trained_models(synth_crops: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The E2E_FAMILIES, tiny, trained for 2 epochs per phase with 2 DDP workers and registered in a session
    SQLite MLflow."""
    from flowood_ray.cluster.train import TrainConfig
    from flowood_ray.cluster.train_job import train_and_register

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summaries = {
        name: train_and_register(
            synth_crops, TrainConfig(family=name, epochs=2, batch_size=16, workers=2), TINY_MODELS[name],
            f"test-{name}", root / "ray_results", uri,
        )
        for name in E2E_FAMILIES
    }
    return {"tracking_uri": uri, "summaries": summaries, "root": root}


def phase_loss_before_and_after(family_name: str, phase_index: int, modules: dict, batch: dict, steps: int,
                                lr: float = 3e-3, seed: int | None = None) -> tuple[float, float]:
    """Loss of one training phase on `batch` ({"image": ..., "label": ...}) before and after `steps` Adam
    steps on that phase's component; with a seed, every evaluation draws the same random numbers."""
    import torch

    from flowood_ray.models.catalog import family

    phase = family(family_name).phases[phase_index]
    def generator() -> torch.Generator | None:
        return None if seed is None else torch.Generator().manual_seed(seed)

    with torch.no_grad():
        before, _ = phase.loss(modules, batch, generator())
    optimizer = torch.optim.Adam(modules[phase.trains].parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = phase.loss(modules, batch, generator())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after, _ = phase.loss(modules, batch, generator())
    return float(before), float(after)


def kill_after_commits(cmd: list[str], commits: Path, count: int, timeout_s: float = 300) -> int:
    """Run `cmd` in its own session, SIGKILL the whole group once `count` shards are committed in
    `commits`, and return how many were committed by then."""
    import signal
    import subprocess
    import time

    job = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and len(list(commits.glob("part-*.parquet"))) < count:
        assert job.poll() is None, "the job finished before it could be killed"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    return len(list(commits.glob("part-*.parquet")))
