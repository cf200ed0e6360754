"""Seeking to keyframes yields exactly the frames sequential decoding does, and skips the decoding."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from conftest import write_video
from flowood_ray.media import decode
from flowood_ray.media.decode import DecodeOutcome, iter_frames, probe
from flowood_ray.media.facecrop import frames_to_sample
from flowood_ray.media.sampling import SamplingConfig, sample_indices
from flowood_ray.media.seeking import PacketIndex


def _moving_frames(count: int, side: int = 96) -> list[np.ndarray]:
    """Frames that differ from each other, so that a frame yielded under the wrong index is caught."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(count)]


def _sequential(path: Path, wanted: list[int]) -> list[tuple[int, np.ndarray]]:
    info = probe(path)
    every = list(iter_frames(path, info, None, DecodeOutcome()))
    return [(i, rgb) for i, _, rgb in every if i in set(wanted)]


@pytest.mark.parametrize(
    ("codec", "options", "name"),
    [
        # H.264 with B-frames: display order differs from decode order.
        ("libx264", {"g": "8", "keyint_min": "8", "bf": "2", "sc_threshold": "0"}, "v.mp4"),
        # MPEG-2 with B-frames and open GOPs, as in older broadcast archives: after a seek the decoder
        # may emit frames shown before the keyframe, which must not be taken for wanted ones.
        ("mpeg2video", {"g": "6", "bf": "2"}, "v.mkv"),
    ],
)
def test_seeking_yields_the_frames_and_indices_of_sequential_decoding(
    tmp_path: Path, codec: str, options: dict[str, str], name: str
) -> None:
    path = write_video(tmp_path / name, _moving_frames(64), codec, options=options)
    wanted = [1, 14, 15, 30, 47, 63]
    outcome = DecodeOutcome()
    sought = list(iter_frames(path, probe(path), wanted, outcome))
    assert outcome.backend == "pyav-seek" and outcome.error is None and outcome.frames_decoded == len(wanted)
    expected = _sequential(path, wanted)
    assert [i for i, _, _ in sought] == [i for i, _ in expected] == wanted
    for (_, _, got), (_, want) in zip(sought, expected):
        np.testing.assert_array_equal(got, want)


class _CountingContainer:
    """A PyAV container that records every frame its decoder outputs."""

    def __init__(self, container: av.container.InputContainer, decoded: list[int]) -> None:
        self._container, self._decoded = container, decoded

    def __enter__(self) -> _CountingContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._container, name)

    def decode(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for frame in self._container.decode(*args, **kwargs):
            self._decoded.append(frame.pts)
            yield frame


def _assert_sequential_fallback(path: Path, wanted: list[int]) -> None:
    outcome = DecodeOutcome()
    frames = list(iter_frames(path, probe(path), wanted, outcome))
    assert outcome.backend == "pyav" and outcome.error is None
    assert [i for i, _, _ in frames] == wanted
    for (_, _, got), (_, want) in zip(frames, _sequential(path, wanted)):
        np.testing.assert_array_equal(got, want)


def test_a_program_stream_is_decoded_sequentially(tmp_path: Path) -> None:
    """MPEG-PS flags P-frames as keyframes; seeking there would start the decoder on a P-frame."""
    path = write_video(tmp_path / "v.mpg", _moving_frames(40), "mpeg2video", options={"g": "6", "bf": "2"})
    _assert_sequential_fallback(path, [2, 21, 38])


def test_a_seek_that_lands_off_its_keyframe_falls_back_to_sequential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusting the program stream's flags anyway: the decoder, started on a P-frame, skips ahead, and
    the frames must still come out right."""
    from flowood_ray.media import seeking

    monkeypatch.setattr(seeking, "SEEKABLE_FORMATS", seeking.SEEKABLE_FORMATS | {"mpeg"})
    path = write_video(tmp_path / "v.mpg", _moving_frames(40), "mpeg2video", options={"g": "6", "bf": "2"})
    _assert_sequential_fallback(path, [2, 21, 38])


def test_seeking_decodes_fewer_frames_than_sequential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "v.mp4", _moving_frames(80), "libx264",
                       options={"g": "10", "keyint_min": "10", "bf": "0", "sc_threshold": "0"})
    decoded: list[int] = []
    real_open = decode._open_video
    monkeypatch.setattr(decode, "_open_video", lambda p: _CountingContainer(real_open(p), decoded))
    frames = list(iter_frames(path, probe(path), [5, 45, 75], DecodeOutcome()))
    assert [i for i, _, _ in frames] == [5, 45, 75]
    # From keyframes 0, 40 and 70: 6 + 6 + 6 frames, against 76 sequentially.
    assert len(decoded) == 18


def test_packet_index_seek_targets() -> None:
    index = PacketIndex(pts=np.arange(0, 300, 10, dtype=np.int64), keyframes=np.array([0, 8, 16, 24]))
    assert index.index_of(80) == 8 and index.index_of(85) is None and index.index_of(None) is None
    assert index.seek_target(-1, 3) is None  # the decoder starts at frame 0 anyway
    assert index.seek_target(-1, 10) == 8
    assert index.seek_target(9, 12) is None  # decoding on from 10 is cheaper than a seek back to 8
    assert index.seek_target(6, 12) == 8 and index.seek_target(7, 12) is None  # 8 comes next either way
    assert index.seek_target(12, 29) == 24


def test_packet_index_of_an_encoded_file(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", _moving_frames(12), "libx264", options={"g": "4"})
    with av.open(str(path)) as container:
        index = PacketIndex.read(container)
    assert index is not None and len(index.pts) == 12 and index.keyframes[0] == 0
    assert np.all(np.diff(index.pts) > 0)


def test_segment_runs_from_keyframes_decode_only_their_own_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs that start at keyframes cost their frames and nothing more, however long the video: 4 runs of 4
    from a 200-frame video with a keyframe every 20 decode 16 frames, where 16 evenly spaced ones decode 142."""
    path = write_video(tmp_path / "v.mp4", _moving_frames(200, side=32), "libx264",
                       options={"g": "20", "keyint_min": "20", "bf": "0", "sc_threshold": "0"})
    info = probe(path)
    keyframes = decode.keyframe_indices(path, info)
    assert keyframes is not None and keyframes.tolist() == list(range(0, 200, 20))
    runs = sample_indices(info.frame_count, SamplingConfig(mode="segments", num_frames=16, segments=4), keyframes)
    # Runs centred at frames 25, 75, 125 and 175 start at 23, 73, 123, 173, then move back to their keyframes.
    assert runs == [*range(20, 24), *range(60, 64), *range(120, 124), *range(160, 164)]
    decoded: list[int] = []
    real_open = decode._open_video
    monkeypatch.setattr(decode, "_open_video", lambda p: _CountingContainer(real_open(p), decoded))
    assert [i for i, _, _ in iter_frames(path, info, runs, DecodeOutcome())] == runs
    assert len(decoded) == 16
    decoded.clear()
    list(iter_frames(path, info, sample_indices(info.frame_count, SamplingConfig(num_frames=16)), DecodeOutcome()))
    # Frames 6, 18, 31, ..., 193: each decoded on from the last frame or from its keyframe, whichever is later.
    assert len(decoded) == 142


def test_keyframes_are_unknown_where_the_flags_cannot_be_trusted(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mpg", _moving_frames(12, side=32), "mpeg2video", options={"g": "6"})
    assert decode.keyframe_indices(path, probe(path)) is None


def test_segments_sampling_demuxes_a_file_once_and_a_rewritten_file_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyframes that place the runs and the index that seeks to them come from one demux pass."""
    gop = {"keyint_min": "20", "bf": "0", "sc_threshold": "0"}
    path = write_video(tmp_path / "v.mp4", _moving_frames(120, side=32), "libx264", options={"g": "20", **gop})
    reads: list[str] = []
    real_read = PacketIndex.read.__func__
    monkeypatch.setattr(PacketIndex, "read", classmethod(lambda cls, c: reads.append(c.name) or real_read(cls, c)))
    info = probe(path)
    wanted = frames_to_sample(path, info, SamplingConfig(mode="segments", num_frames=8, segments=2))
    assert [i for i, _, _ in iter_frames(path, info, wanted, DecodeOutcome())] == wanted
    assert reads == [str(path)]

    write_video(path, _moving_frames(150, side=32), "libx264", options={"g": "30", **gop})
    assert decode.keyframe_indices(path, probe(path)).tolist() == list(range(0, 150, 30))
    assert len(reads) == 2
