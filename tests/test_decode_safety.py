"""Hostile media: sizes are refused from headers before any decoder allocates, and bad files give status rows.

Allocation is measured in a fresh subprocess per case, by tracemalloc (Python objects and numpy arrays)
and by the peak RSS, which also sees the buffers OpenCV and FFmpeg allocate for themselves.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from flowood_ray.media.decode import MAX_PIXELS, MediaError, probe, read_image_header
from flowood_ray.media.facecrop import VideoCropper
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.manifest import manifest_table
from flowood_ray.media.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
ALLOWED_GROWTH_MIB = 50
BOMB_SIDE = 9000  # 81M pixels, over MAX_PIXELS; decoded as BGR it is 232 MiB
VIDEO_BOMB_SIDE = 8704  # a multiple of the 16 px macroblock, 75.8M pixels

# Runs one case in a fresh interpreter, after the same case on a small valid file (which pages in the
# decoders' code and initialises them), and prints what the case alone cost, as JSON on the last line.
MEASURE = """
import json, re, sys, tracemalloc
from pathlib import Path
import cv2
from flowood_ray.media.decode import DecodeOutcome, MediaError, MediaInfo, iter_frames, probe

def peak_rss_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

def run(mode, path):
    if mode == "probe":
        try:
            probe(path)
        except MediaError as exc:
            return {"status": exc.status, "reason": exc.reason}
        return {}
    if mode == "image_frames":  # the decode path alone, as if the file changed after probe()
        outcome = DecodeOutcome()
        for _ in iter_frames(path, MediaInfo("image", 0.0, 1, 0.0, "png", 1, 1), None, outcome):
            pass
        return {"error": outcome.error, "frames": outcome.frames_decoded}
    if mode == "video_frames":
        info = probe(path)
        outcome = DecodeOutcome()
        for _ in iter_frames(path, info, None, outcome, threads=1):
            pass
        return {"error": outcome.error, "frames": outcome.frames_decoded, "size": [info.width, info.height]}
    return {"shape": list(cv2.imread(str(path), cv2.IMREAD_COLOR).shape)}  # "opencv"

mode, path, warm_up = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
run(mode, warm_up)
Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current RSS
before = peak_rss_kib()
tracemalloc.start()
result = run(mode, path)
result.update(traced_peak_mib=tracemalloc.get_traced_memory()[1] / 2**20,
              rss_growth_mib=(peak_rss_kib() - before) / 1024)
print(json.dumps(result))
"""


def measure(mode: str, path: Path, warm_up: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path), str(warm_up)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int) -> bytes:
    """A valid black side x side 1-bit PNG, compressed row by row so that no image is ever allocated."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def encoded(extension: str, image: np.ndarray, *params: int) -> bytes:
    ok, data = cv2.imencode(extension, image, list(params))
    assert ok
    return data.tobytes()


NOISE = np.random.default_rng(0).integers(0, 255, (23, 37, 3), dtype=np.uint8)  # 37 wide, 23 high


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(encoded(".jpg", NOISE))
    sof = data.index(b"\xff\xc0")
    assert data[sof + 2 : sof + 9] == struct.pack(">HBHH", 17, 8, 23, 37)  # length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_vp8x(canvas_width: int, canvas_height: int, flags: int = 0) -> bytes:
    """An extended WebP: a VP8X chunk with this canvas around the lossless bitstream of NOISE."""
    lossless = encoded(".webp", NOISE, cv2.IMWRITE_WEBP_QUALITY, 101)
    vp8x = b"VP8X" + struct.pack("<IB3x", 10, flags)
    vp8x += (canvas_width - 1).to_bytes(3, "little") + (canvas_height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + lossless[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(".bmp", NOISE))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def os2_bmp(width: int, height: int) -> bytes:
    """A black 24-bit BMP with the old 12-byte OS/2 info header, which OpenCV cannot write."""
    pixels = bytes((width * 3 + 3) // 4 * 4 * height)
    file_header = struct.pack("<2sIHHI", b"BM", 26 + len(pixels), 0, 0, 26)
    return file_header + struct.pack("<IHHHH", 12, width, height, 1, 24) + pixels


def h264_stream(frames: int) -> bytes:
    """A grey 64x64 H.264 baseline stream in Annex B form (SPS and PPS in-band)."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width = encoder.height = 64
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = {"profile": "baseline"}
    grey = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 90, np.uint8), format="rgb24")
    packets = [packet for _ in range(frames) for packet in encoder.encode(grey)] + list(encoder.encode(None))
    return b"".join(bytes(packet) for packet in packets)


def _exp_golomb(bits: str, position: int) -> tuple[int, int]:
    zeros = bits.index("1", position) - position
    end = position + 2 * zeros + 1
    return int(bits[position + zeros : end], 2) - 1, end


def _exp_golomb_bits(value: int) -> str:
    binary = f"{value + 1:b}"
    return "0" * (len(binary) - 1) + binary


def _sps_claiming(nal: bytes, width: int, height: int) -> bytes:
    body = nal.rstrip(b"\x00")  # a following 4-byte start code leaves a zero here
    rbsp = body.replace(b"\x00\x00\x03", b"\x00\x00")
    assert rbsp[1] == 66  # baseline: no chroma or bit depth fields before the size
    bits = "".join(f"{byte:08b}" for byte in rbsp)
    position = 32  # NAL header, profile, constraint flags, level
    _, position = _exp_golomb(bits, position)  # seq_parameter_set_id
    _, position = _exp_golomb(bits, position)  # log2_max_frame_num_minus4
    order_type, position = _exp_golomb(bits, position)
    assert order_type == 2  # nothing follows pic_order_cnt_type 2
    _, position = _exp_golomb(bits, position)  # max_num_ref_frames
    start = position + 1  # gaps_in_frame_num_allowed_flag
    _, end = _exp_golomb(bits, start)
    _, end = _exp_golomb(bits, end)
    bits = bits[:start] + _exp_golomb_bits(width // 16 - 1) + _exp_golomb_bits(height // 16 - 1) + bits[end:]
    bits = bits.rstrip("0")  # keep the stop bit, then pad to a byte again
    bits += "0" * (-len(bits) % 8)
    raw = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    escaped = bytearray()
    for byte in raw:
        if len(escaped) >= 2 and escaped[-2:] == b"\x00\x00" and byte <= 3:
            escaped.append(3)
        escaped.append(byte)
    return bytes(escaped) + nal[len(body) :]


def h264_claiming(stream: bytes, width: int, height: int) -> bytes:
    """The stream with every SPS rewritten to claim width x height (multiples of 16)."""
    units = stream.split(b"\x00\x00\x01")
    return b"\x00\x00\x01".join(_sps_claiming(u, width, height) if u and u[0] & 0x1F == 7 else u for u in units)


@pytest.fixture(scope="module")
def png_bomb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bombs") / "bomb.png"
    path.write_bytes(png_bomb(BOMB_SIDE))
    return path


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small valid files of each kind the measurements use, to warm the decoders up on."""
    folder = tmp_path_factory.mktemp("valid")
    files = {kind: folder / f"small.{kind}" for kind in ("png", "jpg", "mp4")}
    files["png"].write_bytes(encoded(".png", NOISE))
    files["jpg"].write_bytes(encoded(".jpg", NOISE))
    files["mp4"].write_bytes(h264_stream(10))
    return files


@pytest.fixture(scope="module")
def cropper() -> Iterator[VideoCropper]:
    cropper = VideoCropper(SamplingConfig(), CropConfig(size=32))
    yield cropper
    cropper.close()


def status_row(cropper: VideoCropper, path: Path) -> dict:
    row = manifest_table([{"video_id": path.stem, "path": str(path), "source": "test"}]).to_pylist()[0]
    return cropper.process(row, lambda table: pytest.fail("a bad file produced crops"))


@pytest.mark.parametrize(("data", "expected"), [
    (encoded(".png", NOISE), ("png", 37, 23)),
    (encoded(".jpg", NOISE), ("jpeg", 37, 23)),
    (encoded(".bmp", NOISE), ("bmp", 37, 23)),
    (os2_bmp(5, 3), ("bmp", 5, 3)),
    (encoded(".webp", NOISE, cv2.IMWRITE_WEBP_QUALITY, 80), ("webp", 37, 23)),  # VP8
    (encoded(".webp", NOISE, cv2.IMWRITE_WEBP_QUALITY, 101), ("webp", 37, 23)),  # VP8L
    (encoded(".webp", np.dstack([NOISE, NOISE[..., :1]]), cv2.IMWRITE_WEBP_QUALITY, 80), ("webp", 37, 23)),  # VP8X
], ids=["png", "jpeg", "bmp", "bmp-os2", "webp-vp8", "webp-vp8l", "webp-vp8x"])
def test_header_size_is_the_decoded_size(data: bytes, expected: tuple[str, int, int]) -> None:
    # Catches swapped width/height, a wrong field offset or byte order, VP8L's missing +1, the VP8 scale bits
    # left in, and a header kind not read at all. OpenCV's decode is the independent reference.
    header = read_image_header(data)
    assert (header.format, header.width, header.height) == expected
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (expected[2], expected[1], 3)


def test_webp_kinds_are_all_exercised() -> None:
    # Guards the test above: each WebP case must really start with the chunk its id names.
    kinds = [encoded(".webp", image, cv2.IMWRITE_WEBP_QUALITY, quality)[12:16] for image, quality in (
        (NOISE, 80), (NOISE, 101), (np.dstack([NOISE, NOISE[..., :1]]), 80))]
    assert kinds == [b"VP8 ", b"VP8L", b"VP8X"]


@pytest.mark.parametrize("insert", [
    b"\xff\xfe\x00\x0b" + b"\xff\xc0\x00\x11\x08\xff\xf0\xff\xf0",  # a comment holding a SOF claiming 65520 px
    b"\x12\x34\xff\x00\x56",  # stray bytes and a stuffed FF 00 before the next marker, skipped by libjpeg
], ids=["sof-inside-comment", "stray-bytes"])
def test_jpeg_header_walks_segments_like_libjpeg(insert: bytes) -> None:
    # Catches a parser that searches for the first FF C0 (it would read 65520 x 65520 from the comment) or
    # one that refuses what libjpeg decodes; the decoded shape is the reference.
    original = encoded(".jpg", NOISE)
    app0_end = 4 + struct.unpack(">H", original[4:6])[0]
    data = original[:app0_end] + insert + original[app0_end:]
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (23, 37, 3)
    assert read_image_header(data) == read_image_header(original)


@pytest.mark.parametrize(("data", "size"), [
    (png_bomb(BOMB_SIDE), (BOMB_SIDE, BOMB_SIDE)),
    (jpeg_claiming(12000, 12000), (12000, 12000)),
    (webp_vp8x(16384, 16384), (16384, 16384)),
    (bmp_claiming(20000, -20000), (20000, 20000)),
], ids=["png", "jpeg", "webp-vp8x", "bmp-top-down"])
def test_oversized_images_are_refused_from_the_header(tmp_path: Path, data: bytes, size: tuple[int, int]) -> None:
    # Catches a format whose size is not checked, or misread (the reason must name the claimed size).
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert size[0] * size[1] > MAX_PIXELS
    with pytest.raises(MediaError) as err:
        probe(path)
    assert err.value.status == "unsupported" and f"{size[0]}x{size[1]} exceeds" in err.value.reason


def test_rss_measure_sees_a_decoded_bomb(png_bomb_path: Path, valid_files: dict[str, Path]) -> None:
    # The control for the measurements below: the hand-built bomb is a valid image that really costs
    # hundreds of MiB to decode (232 MiB of BGR pixels), and the measure sees it.
    cost = measure("opencv", png_bomb_path, valid_files["png"])
    assert cost["shape"] == [BOMB_SIDE, BOMB_SIDE, 3] and cost["rss_growth_mib"] > 200


def test_image_bombs_are_refused_without_a_large_allocation(png_bomb_path: Path, tmp_path: Path,
                                                            valid_files: dict[str, Path]) -> None:
    # Catches a size check that runs after a (full or reduced) decode: the old probe decoded a 9000 x 9000
    # PNG before refusing it. Both entry points are checked: probe() and iter_frames() without probe().
    jpeg = tmp_path / "bomb.jpg"
    jpeg.write_bytes(jpeg_claiming(12000, 12000))
    cases = (("probe", png_bomb_path, "png"), ("probe", jpeg, "jpg"), ("image_frames", png_bomb_path, "png"))
    for mode, path, kind in cases:
        cost = measure(mode, path, valid_files[kind])
        assert "pixel limit" in (cost.get("reason") if mode == "probe" else cost["error"]), (mode, cost)
        assert cost["rss_growth_mib"] < ALLOWED_GROWTH_MIB and cost["traced_peak_mib"] < 1, (mode, path, cost)


def test_video_header_bomb_is_refused_at_probe(tmp_path: Path, valid_files: dict[str, Path]) -> None:
    # Catches opening the container without FFmpeg's max_pixels: stream probing then decodes frames at
    # the claimed size (about 350 MiB here) before probe() can refuse it. The container is sniffed from the
    # bytes, so an Annex B stream named .mp4 is what an upload can be.
    path = tmp_path / "bomb.mp4"
    path.write_bytes(h264_claiming(h264_stream(5), VIDEO_BOMB_SIDE, VIDEO_BOMB_SIDE))
    cost = measure("probe", path, valid_files["mp4"])
    assert cost.get("status") == "unsupported" and f"{VIDEO_BOMB_SIDE}x{VIDEO_BOMB_SIDE}" in cost["reason"], cost
    assert cost["rss_growth_mib"] < ALLOWED_GROWTH_MIB, cost


def test_video_growing_mid_stream_stops_the_decoder(tmp_path: Path, valid_files: dict[str, Path]) -> None:
    # Catches a decoder opened without max_pixels: probe() sees only the first 64 x 64 SPS (250 frames is
    # past FFmpeg's probing window), then the stream switches to a huge size, which would be decoded and
    # converted to RGB frame by frame. The frames before the switch are kept and the failure is recorded.
    path = tmp_path / "grows.mp4"
    path.write_bytes(h264_stream(250) + h264_claiming(h264_stream(5), VIDEO_BOMB_SIDE, VIDEO_BOMB_SIDE))
    cost = measure("video_frames", path, valid_files["mp4"])
    assert cost["size"] == [64, 64] and cost["frames"] == 250 and cost["error"], cost
    assert cost["rss_growth_mib"] < ALLOWED_GROWTH_MIB, cost


@pytest.mark.parametrize("extension", [".png", ".bmp", ".webp", ".jpg"])
def test_tiny_images_decode_to_a_no_face_row(cropper: VideoCropper, tmp_path: Path, extension: str) -> None:
    # Catches the old 1/8-scale header probe, which raised cv2.error on images under 8 px a side and
    # crashed the actor: a 2 x 3 image decodes, holds no face and says so.
    path = tmp_path / f"tiny{extension}"
    assert cv2.imwrite(str(path), np.full((3, 2, 3), 128, np.uint8))
    result = status_row(cropper, path)
    assert (result["status"], result["frames_decoded"], result["width"], result["height"]) == ("no_face", 1, 2, 3)


def _corrupt_ihdr_crc(png: bytes) -> bytes:
    return png[:29] + bytes([png[29] ^ 1]) + png[30:]


PNG = encoded(".png", NOISE)


@pytest.mark.parametrize(("data", "status", "reason"), [
    (PNG[:20], "decode_error", "truncated PNG header"),
    (PNG[: len(PNG) // 2], "decode_error", "truncated or corrupt"),
    (_corrupt_ihdr_crc(PNG), "decode_error", "CRC"),
    (PNG[:33] + png_chunk(b"acTL", bytes(8)) + PNG[33:], "unsupported", "animated"),
    (webp_vp8x(37, 23, flags=0x02), "unsupported", "animated"),
    (webp_vp8x(100, 100), "decode_error", "truncated or corrupt"),  # libwebp refuses a canvas unlike its image
    (jpeg_claiming(37, 0), "decode_error", "invalid frame size 37x0"),  # height 0 (DNL) is not supported
    (encoded(".tiff", NOISE), "unsupported", "not a PNG, JPEG, WebP or BMP"),  # OpenCV would decode these two
    (encoded(".ppm", NOISE), "unsupported", "not a PNG, JPEG, WebP or BMP"),
    (png_bomb(BOMB_SIDE), "unsupported", "pixel limit"),
], ids=["cut-in-ihdr", "cut-in-idat", "ihdr-crc", "apng", "animated-webp", "webp-canvas", "jpeg-height-0", "tiff",
        "ppm", "bomb"])
def test_broken_images_give_a_status_row(cropper: VideoCropper, tmp_path: Path, data: bytes, status: str,
                                         reason: str) -> None:
    # Catches any bad image that escapes VideoCropper.process as an exception (an actor crash) or gets a
    # status that hides why; every file is named .png, so the bytes, not the name, must decide.
    path = tmp_path / "broken.png"
    path.write_bytes(data)
    result = status_row(cropper, path)
    assert result["status"] == status and reason in result["reason"], result
