"""Shared set-up for the benchmarks: one synthetic archive and its crops, made once per work directory."""

from __future__ import annotations

from fractions import Fraction
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


def synthetic_crops(workdir: Path, size: int = 64, identities: int = 6, face_mesh: bool = False) -> Path:
    crops = workdir / (f"crops{size}" + ("-mesh" if face_mesh else ""))
    if not (crops / "preprocess.json").exists():
        run_preprocess(build_manifest(synthetic_archive(workdir, identities)), crops, SamplingConfig(num_frames=24),
                       CropConfig(size=size, face_mesh=face_mesh), workers=2)
    return crops


def reencode(source: Path, out: Path, lines: int, seconds: float | None = None, keyint: int | None = None) -> Path:
    """`source` as H.264 MP4 of `lines` lines at its own frame rate (CRF 23, x264 `veryfast`; GOP x264's
    default of 250 frames unless `keyint`). With `seconds`, the clip is played forwards and backwards until
    it lasts that long, so that long videos of real faces can be made from short clips."""
    import av
    import cv2
    import numpy as np

    from flowood_ray.media.decode import DecodeOutcome, iter_frames, probe

    if out.exists():
        return out
    info = probe(source)
    frames = [rgb for _, _, rgb in iter_frames(source, info, None, DecodeOutcome())]
    width = 2 * round(info.width * lines / info.height / 2)
    total = round(seconds * info.fps) if seconds else len(frames)
    cycle = frames + frames[-2:0:-1] if len(frames) > 2 else frames
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(info.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, lines, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"} | ({"g": str(keyint), "keyint_min": str(keyint)}
                                                                if keyint else {})
        for i in range(total):
            frame = cv2.resize(cycle[i % len(cycle)], (width, lines), interpolation=cv2.INTER_CUBIC)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    tmp.rename(out)
    return out
