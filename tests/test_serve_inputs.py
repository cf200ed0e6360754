"""Request bodies of the scoring API without Ray: header checks, the streaming byte cap, content-type
dispatch and image decoding, each on a real Starlette request fed by a plain ASGI receive."""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.security import HTTPAuthorizationCredentials
from PIL import Image
from starlette.requests import Request
from starlette.types import Message

from flowood_ray.cluster.serve_inputs import (check_bearer_token, check_declared_length, decode_image,
                                              read_image_body, spool_video_body)
from flowood_ray.cluster.serve_schemas import ApiError

LIMIT = 4096
BOUNDARY = "flowoodboundary"


class Body:
    """An ASGI receive that hands out `chunks` one message at a time and counts the messages taken."""

    def __init__(self, chunks: list[bytes], disconnect_after: int | None = None) -> None:
        self.chunks = chunks
        self.disconnect_after = disconnect_after
        self.taken = 0

    async def __call__(self) -> Message:
        if self.taken == self.disconnect_after or self.taken >= len(self.chunks):
            return {"type": "http.disconnect"}
        self.taken += 1
        return {"type": "http.request", "body": self.chunks[self.taken - 1], "more_body": self.taken < len(self.chunks)}


def request(body: Body, headers: dict[str, str]) -> Request:
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": raw}, body)


def multipart(data: bytes, content_type: str | None, field: str = "file") -> tuple[bytes, dict[str, str]]:
    part_type = f"Content-Type: {content_type}\r\n" if content_type else ""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"upload\"\r\n{part_type}\r\n"
            ).encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.status, caught.value.code


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_by_hand(rgb: np.ndarray, claimed: tuple[int, int] | None = None) -> bytes:
    """An 8-bit RGB PNG written from the format itself (not by the decoder under test); its header may
    claim a size (width, height) other than the pixels it holds."""
    height, width = rgb.shape[:2]
    claimed_width, claimed_height = claimed or (width, height)
    header = struct.pack(">IIBBBBB", claimed_width, claimed_height, 8, 2, 0, 0, 0)
    scanlines = b"".join(b"\0" + row.tobytes() for row in rgb)  # filter byte 0: raw rows
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(scanlines))
            + _png_chunk(b"IEND", b""))


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


# -- headers ----------------------------------------------------------------------------------


def test_declared_length_is_judged_from_the_headers_alone() -> None:
    # Catches an off-by-one (>= for >) and a check that reads the body before refusing it.
    unread = Body([b"x" * (LIMIT + 1)])
    assert refusal(lambda: check_declared_length(request(unread, {"content-length": str(LIMIT + 1)}), LIMIT)) == (
        413, "payload_too_large")
    assert unread.taken == 0
    check_declared_length(request(Body([]), {"content-length": str(LIMIT)}), LIMIT)
    check_declared_length(request(Body([]), {}), LIMIT)  # chunked: the streaming cap decides
    for bad in ("12abc", "-1"):
        assert refusal(lambda: check_declared_length(request(Body([]), {"content-length": bad}), LIMIT)) == (
            400, "bad_content_length")


def test_bearer_token_must_match_exactly() -> None:
    # Catches a prefix or truncated comparison, and a missing header let through when a token is set.
    token = "s3cret-token"
    for given in (None, "", token[:-1], token + "x", token.upper()):
        credentials = None if given is None else HTTPAuthorizationCredentials(scheme="Bearer", credentials=given)
        with pytest.raises(ApiError) as caught:
            check_bearer_token(credentials, token)
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
        assert caught.value.headers == {"WWW-Authenticate": "Bearer"}
    check_bearer_token(HTTPAuthorizationCredentials(scheme="Bearer", credentials=token), token)
    check_bearer_token(None, None)  # a server without a token is open


# -- the streaming cap and content-type dispatch ------------------------------------------------


def test_a_body_without_content_length_is_cut_off_at_the_cap() -> None:
    # Catches a cap that counts one message instead of the running total, or that reads everything first.
    chunk = LIMIT // 4
    body = Body([b"\0" * chunk] * 40)
    status_code = refusal(lambda: asyncio.run(read_image_body(request(body, {"content-type": "image/jpeg"}), LIMIT)))
    assert status_code == (413, "payload_too_large")
    assert body.taken == LIMIT // chunk + 1  # the first message past the limit, and no further
    exactly = Body([b"\0" * chunk] * (LIMIT // chunk))
    data, _ = asyncio.run(read_image_body(request(exactly, {"content-type": "image/jpeg"}), LIMIT))
    assert len(data) == LIMIT


def test_image_content_types_are_dispatched() -> None:
    # Catches parameters or case breaking the match, octet-stream taken as a declared format, and a
    # multipart part's type going unchecked.
    png = png_by_hand(gradient())

    def read(data: bytes, headers: dict[str, str]) -> tuple[bytes, str | None]:
        return asyncio.run(read_image_body(request(Body([data]), headers), LIMIT * 4))

    assert read(png, {"content-type": "IMAGE/PNG; charset=binary"}) == (png, "image/png")
    assert read(png, {"content-type": "application/octet-stream"}) == (png, None)
    assert read(*multipart(png, "image/webp")) == (png, "image/webp")
    assert read(*multipart(png, None)) == (png, None)
    for headers in ({"content-type": "text/plain"}, {"content-type": "video/mp4"}, {}):
        assert refusal(lambda: read(png, headers)) == (415, "unsupported_media_type")
    assert refusal(lambda: read(*multipart(png, "text/plain"))) == (415, "unsupported_media_type")
    assert refusal(lambda: read(*multipart(png, "image/png", field="other"))) == (400, "missing_file")
    assert refusal(lambda: read(b"", {"content-type": "image/png"})) == (400, "empty_body")


def test_a_client_gone_mid_body_is_a_400_on_both_routes(tmp_path: Path) -> None:
    # Catches the disconnect escaping as a 500 on either route (they share the capped body).
    def gone() -> Body:
        return Body([b"\0" * 100] * 3, disconnect_after=1)

    image = request(gone(), {"content-type": "image/png"})
    assert refusal(lambda: asyncio.run(read_image_body(image, LIMIT))) == (400, "client_disconnected")
    video = request(gone(), {"content-type": "video/mp4"})
    assert refusal(lambda: asyncio.run(spool_video_body(video, LIMIT, tmp_path))) == (400, "client_disconnected")


def test_a_clip_is_spooled_under_its_containers_suffix(tmp_path: Path) -> None:
    # Catches a wrong suffix (probe() takes the video path by it), lost bytes, and images let in.
    clip = bytes(range(256)) * 40

    def spool(data: bytes, headers: dict[str, str], name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)] or [b""]
        return asyncio.run(spool_video_body(request(Body(chunks), headers), LIMIT * 4, directory))

    mov = spool(clip, {"content-type": "video/quicktime"}, "raw")
    assert (mov.name, mov.read_bytes()) == ("upload.mov", clip)
    untyped = spool(*multipart(clip, None), "multipart")
    assert (untyped.name, untyped.read_bytes()) == ("upload.mp4", clip)
    assert refusal(lambda: spool(clip, {"content-type": "image/jpeg"}, "image")) == (415, "unsupported_media_type")
    assert refusal(lambda: spool(b"", {"content-type": "video/mp4"}, "empty")) == (400, "empty_body")
    assert refusal(lambda: spool(clip * 2, {"content-type": "video/mp4"}, "big")) == (413, "payload_too_large")


# -- decoding -----------------------------------------------------------------------------------


def test_decoded_pixels_are_the_rgb_that_was_sent() -> None:
    # Catches a BGR/RGB swap and an alpha channel kept.
    rgb = gradient()
    np.testing.assert_array_equal(decode_image(png_by_hand(rgb), "image/png", LIMIT), rgb)
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA")
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), None, LIMIT), rgb)


def test_bomb_headers_are_refused_before_decoding() -> None:
    # The files hold 8x8 pixels: a decode would fail as truncated (400), so a 413 proves the header was
    # judged first. 5000x5000 is under Pillow's own bomb limit (our pixel check); 100000x100000 is over it.
    pixels = gradient(8, 8)
    max_pixels = 4096 * 4096
    assert refusal(lambda: decode_image(png_by_hand(pixels, (5000, 5000)), "image/png", max_pixels)) == (
        413, "image_too_large")
    assert refusal(lambda: decode_image(png_by_hand(pixels, (100_000, 100_000)), "image/png", max_pixels)) == (
        413, "image_too_large")
    small = bytearray(jpeg(pixels))
    sof = small.index(b"\xff\xc0")
    small[sof + 5 : sof + 9] = struct.pack(">HH", 6000, 6000)
    assert refusal(lambda: decode_image(bytes(small), "image/jpeg", max_pixels)) == (413, "image_too_large")
    # The same check counts pixels, not sides: 64x64 passes a 64*64 budget, 65x64 does not.
    assert decode_image(png_by_hand(gradient(64, 64)), "image/png", 64 * 64).shape == (64, 64, 3)
    assert refusal(lambda: decode_image(png_by_hand(gradient(64, 65)), "image/png", 64 * 64)) == (
        413, "image_too_large")


def test_truncated_and_foreign_bytes_are_refused() -> None:
    # Catches a decoder that tolerates truncation (it would score grey pixels) and formats beyond the three.
    data = jpeg(gradient())
    assert refusal(lambda: decode_image(data[: len(data) // 2], "image/jpeg", LIMIT)) == (400, "invalid_image")
    png = png_by_hand(gradient())
    assert refusal(lambda: decode_image(png[: len(png) // 2], "image/png", LIMIT)) == (400, "invalid_image")
    gif = io.BytesIO()
    Image.fromarray(gradient()).save(gif, "GIF")
    assert refusal(lambda: decode_image(gif.getvalue(), None, LIMIT)) == (400, "invalid_image")
    assert refusal(lambda: decode_image(b"hello, not an image" * 20, None, LIMIT)) == (400, "invalid_image")


def test_the_declared_type_must_match_the_bytes() -> None:
    # Catches the declared type being ignored, and phone cameras' multi-picture JPEGs (Pillow: MPO) refused.
    png = png_by_hand(gradient())
    assert refusal(lambda: decode_image(png, "image/jpeg", LIMIT)) == (415, "content_type_mismatch")
    assert refusal(lambda: decode_image(jpeg(gradient()), "image/png", LIMIT)) == (415, "content_type_mismatch")
    picture = Image.fromarray(gradient())
    mpo = io.BytesIO()
    picture.save(mpo, "MPO", save_all=True, append_images=[picture])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    assert decode_image(mpo.getvalue(), "image/jpeg", LIMIT).shape == (48, 64, 3)


def test_exif_orientation_is_applied() -> None:
    # Catches a photo scored on its side: orientation 6 means "rotate 90 degrees clockwise to display".
    rgb = gradient(8, 12)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG", exif=exif)
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "image/png", LIMIT), np.rot90(rgb, k=-1))


def test_the_module_imports_neither_ray_nor_serve() -> None:
    # Catches a Ray import slipping in: these checks must stay testable (and importable) without Ray.
    code = ("import sys, flowood_ray.cluster.serve_inputs; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
