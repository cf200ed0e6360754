"""Request bodies of the scoring API, checked before they cost anything: the bearer token and the declared
length from the headers alone, the body streamed in under a byte cap (Serve itself has no body limit), its
content type dispatched, and an image's dimensions read from its header before a pixel is decoded.

Imports neither Ray nor Serve: everything here runs on a plain Starlette request."""

from __future__ import annotations

import hmac
import io
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from flowood_ray.cluster.serve_schemas import ApiError

OCTET_STREAM = "application/octet-stream"
# Content types we accept -> the format Pillow must find in the bytes.
IMAGE_TYPES: dict[str, str] = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
# Pillow's format names -> ours: phone cameras write multi-picture JPEGs, which Pillow calls MPO.
_PIL_FORMATS: dict[str, str] = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
# PyAV recognises a container from its bytes; the suffix only sends the file down probe()'s video path.
VIDEO_TYPES: dict[str, str] = {
    "video/mp4": ".mp4", "video/quicktime": ".mov", "video/x-msvideo": ".avi", "video/avi": ".avi",
    "video/webm": ".webm", "video/x-matroska": ".mkv", "video/mpeg": ".mpg", OCTET_STREAM: ".mp4",
}
_SPOOL_CHUNK = 1 << 16


def check_bearer_token(credentials: HTTPAuthorizationCredentials | None, token: str | None) -> None:
    """Refuse a request without the server's bearer token; a server without a token takes every request."""
    if token is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, token.encode()):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <FLOWOOD_API_TOKEN>",
                       headers={"WWW-Authenticate": "Bearer"})


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body exceeds the {limit} byte limit")


class _CappedReceive:
    """ASGI receive that refuses a body growing past `limit`: Content-Length may be absent (chunked) or wrong."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._received = 0

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise _too_large(self._limit)
        return message


def check_declared_length(request: Request, limit: int) -> None:
    """Refuse from the headers alone, before a byte of an oversized body is read."""
    header = request.headers.get("content-length")
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise ApiError(400, "bad_content_length", f"Content-Length {header!r} is not a number") from None
    if length < 0:
        raise ApiError(400, "bad_content_length", f"Content-Length {length} is negative")
    if length > limit:
        raise _too_large(limit)


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _unsupported(got: str | None, accepted: Iterable[str]) -> ApiError:
    return ApiError(415, "unsupported_media_type",
                    f"content type {got or '(none)'} is not accepted; send one of {sorted(accepted)} "
                    "or multipart/form-data with a `file` field")


@asynccontextmanager
async def _form_file(request: Request) -> AsyncIterator[UploadFile]:
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_file", "the multipart body needs a `file` field holding the media")
        yield upload
    finally:
        await form.close()


@asynccontextmanager
async def _capped_body(request: Request, limit: int) -> AsyncIterator[Request]:
    """`request` whose body is refused past `limit` bytes; a client gone before the end is a 400."""
    try:
        yield Request(request.scope, _CappedReceive(request.receive, limit))
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None


async def read_image_body(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The image bytes and the content type the client declared for them (None: unknown)."""
    media_type = _media_type(request.headers.get("content-type"))
    accepted = [*IMAGE_TYPES, OCTET_STREAM]
    async with _capped_body(request, limit) as capped:
        if media_type == "multipart/form-data":
            async with _form_file(capped) as upload:
                declared = _media_type(upload.content_type)
                if declared is not None and declared not in accepted:
                    raise _unsupported(declared, accepted)
                data = await upload.read()
        elif media_type in accepted:
            declared = media_type
            data = b"".join([chunk async for chunk in capped.stream()])
        else:
            raise _unsupported(media_type, accepted)
    if not data:
        raise ApiError(400, "empty_body", "the request carries no image bytes")
    return data, None if declared == OCTET_STREAM else declared


async def spool_video_body(request: Request, limit: int, directory: Path) -> Path:
    """Stream the clip into a file under `directory`; nothing beyond `limit` bytes is accepted."""
    media_type = _media_type(request.headers.get("content-type"))
    async with _capped_body(request, limit) as capped:
        if media_type == "multipart/form-data":
            async with _form_file(capped) as upload:
                declared = _media_type(upload.content_type) or OCTET_STREAM
                if declared not in VIDEO_TYPES:
                    raise _unsupported(declared, VIDEO_TYPES)
                path = directory / f"upload{VIDEO_TYPES[declared]}"
                with path.open("wb") as out:
                    while chunk := await upload.read(_SPOOL_CHUNK):
                        out.write(chunk)
        elif media_type in VIDEO_TYPES:
            path = directory / f"upload{VIDEO_TYPES[media_type]}"
            with path.open("wb") as out:
                async for chunk in capped.stream():
                    out.write(chunk)
        else:
            raise _unsupported(media_type, VIDEO_TYPES)
    if path.stat().st_size == 0:
        raise ApiError(400, "empty_body", "the request carries no video bytes")
    return path


def decode_image(data: bytes, declared: str | None, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels of a JPEG, PNG or WebP; the size is checked from the header before decoding."""
    try:
        # Only these decoders ever see client bytes: fewer parsers, less attack surface.
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"]) as image:
            found = _PIL_FORMATS.get(str(image.format))
            if found is None:
                raise ApiError(415, "unsupported_media_type", f"{image.format} images are not accepted")
            if declared is not None and IMAGE_TYPES[declared] != found:
                raise ApiError(415, "content_type_mismatch", f"declared {declared} but the bytes are {found}")
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large", f"{width}x{height} pixels exceed the {max_pixels} pixel limit")
            image.load()  # the full decode: a truncated file fails here instead of decoding grey
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", "the bytes are not a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "invalid_image", f"the image is truncated or corrupt: {exc}") from None

