"""Request bodies -> validated models; images (base64, data URIs, files) -> model input.

Limits: the request's bytes (middleware.BodyLimit), images per request (here, before the schema
is checked), pixels per image (from the header, before the full decode), and the pixels being
decoded at once in the process (DecodeBudget). Decoding and preprocessing run in a thread pool,
so they overlap inference and never block the event loop for long; only small images (a
thumbnail decodes in about 0.1 ms, less than the hand-off to a thread costs) are decoded on the
loop. A JSON body is parsed by orjson, and its keys and image counts are checked before the
schema, so that a hostile body (500,000 unknown keys, a million-item list) costs one parse.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import re
from collections import deque
from concurrent.futures import Executor
from typing import TypeVar

import numpy as np
import orjson
from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from simmim_core.preprocess import (
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    preprocess_image,
    read_header,
)

from .errors import (
    MAX_ERRORS,
    MAX_NAME,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    RequestTimeout,
    TooManyImages,
    UnsupportedMediaType,
    clip,
    invalid_request,
)
from .schemas import RequestBody

Body = TypeVar("Body", bound=RequestBody)
_DATA_URI = re.compile(r"data:[^,;]*(;[^,;]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")

# JSON values (strings and list items, counted by their quotes and commas) allowed in a body per
# image it may hold: room for every image with its options (a data URI, an OpenAI-style
# {"type": "image_url", ...} item), and a bound on what orjson parses on the event loop.
JSON_VALUES_PER_IMAGE = 64

# Decoded on the event loop: images of at most INLINE_PIXELS (from the header), while the
# request's inline images add up to at most INLINE_BYTES encoded; each costs the loop < 0.2 ms.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 16_384


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, model: type[Body], max_images: int) -> Body:
    """Parse a JSON or multipart/form-data body into `model`: 415, 422 or 413 (image count)."""
    kind = media_type(request)
    if kind == "application/json" or kind.endswith("+json"):
        fields = parse_json(await request.body(), max_images)
    elif kind == "multipart/form-data":
        fields = await _form_fields(request, model)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {clip(kind, MAX_NAME) or '(none)'!r} is not accepted; send "
            "application/json or multipart/form-data"
        )
    check_fields(fields, model, max_images)
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise invalid_request(e) from None


def parse_json(raw: bytes, max_images: int) -> object:
    """orjson.loads, after a scan (bytes.count, at memory speed) that refuses bodies of more
    JSON values than JSON_VALUES_PER_IMAGE x (max_images + 1): the parse then takes
    milliseconds, where 500,000 keys would hold the event loop for a second."""
    values = raw.count(b'"') // 2 + raw.count(b",")
    limit = JSON_VALUES_PER_IMAGE * (max_images + 1)
    if values > limit:
        raise InvalidRequest(
            f"body: about {values} JSON values, more than a request of {max_images} images "
            f"holds ({limit})"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"body: not valid JSON ({clip(str(e), 200)})") from None


def check_fields(fields, model: type[RequestBody], max_images: int) -> None:
    """What the schema would reject at length, rejected cheaply first: a body that is not an
    object (422), unknown keys (422, naming the first few), more than max_images images (413)."""
    if not isinstance(fields, dict):
        raise InvalidRequest(f"body: a JSON object is expected, not {type(fields).__name__}")
    unknown = fields.keys() - model.model_fields.keys()
    if unknown:
        first = itertools.islice((k for k in fields if k in unknown), MAX_ERRORS)
        names = ", ".join(repr(clip(k, MAX_NAME)) for k in first)
        more = f" and {len(unknown) - MAX_ERRORS} more" if len(unknown) > MAX_ERRORS else ""
        raise InvalidRequest(
            f"unknown fields {names}{more}; expected {', '.join(model.model_fields)}",
            param=clip(next(k for k in fields if k in unknown), MAX_NAME),
        )
    count = sum(
        len(value) if isinstance(value, list) else 1
        for name in model.files
        if (value := fields.get(name)) is not None
    )
    if count > max_images:
        raise TooManyImages(f"{count} images in one request; the limit is {max_images}")


async def _form_fields(request: Request, model: type[RequestBody]) -> dict:
    """Multipart fields as a dict: files read to bytes, `model.lists` fields gathered in lists."""
    fields: dict = {}
    async with request.form() as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = await value.read()
            if key in model.lists:
                fields.setdefault(key, []).append(value)
            elif key in fields:
                raise InvalidRequest(f"{clip(key, MAX_NAME)}: given more than once")
            else:
                fields[key] = value
    return fields


class DecodeBudget:
    """The pixels being decoded at once in one process: take() waits for room, give() makes
    it. Not first-come-first-served: a small image passes a large one that waits. Used from
    one event loop."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._waiters: deque[asyncio.Future] = deque()

    async def take(self, pixels: int) -> None:
        """Wait until `pixels` fit (pixels <= limit, or this never returns)."""
        while self.used + pixels > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.used += pixels

    def give(self, pixels: int) -> None:
        self.used -= pixels
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class InvalidBase64(ValueError):
    """Text that is not base64 (or is a URL)."""


def decode_base64(text: str) -> bytes:
    """base64 text, with or without a data: URI prefix -> bytes. Raises InvalidBase64."""
    prefix = _DATA_URI.match(text)
    if prefix:
        text = text[prefix.end() :]
    elif text.startswith(("http://", "https://")):
        raise InvalidBase64("URLs are not fetched; send the image itself, base64-encoded")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        pass  # line-wrapped? (the regex costs ms on photographs)
    try:
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except binascii.Error:
        raise InvalidBase64("not valid base64") from None


def decode_image(source: str | bytes, spec: Preprocessing, max_pixels: int) -> np.ndarray:
    """One request image -> float32 [C, H, W], normalised per `spec`."""
    data = decode_base64(source) if isinstance(source, str) else source
    return preprocess_image(data, spec, max_pixels)


def open_source(source: str | bytes, spec: Preprocessing, max_pixels: int) -> Image.Image:
    """One request image, its header read (pixels not decoded yet; JPEG draft applied)."""
    data = decode_base64(source) if isinstance(source, str) else source
    draft = (spec.color_mode, spec.resize_size) if spec.jpeg_draft else None
    return read_header(data, max_pixels, draft)


async def decode_images(
    sources: list[str | bytes],
    field: str,
    spec: Preprocessing,
    max_pixels: int,
    pool: Executor,
    budget: DecodeBudget,
    deadline: float,
) -> list[np.ndarray]:
    """Decode and preprocess every image: small ones here (see INLINE_PIXELS), the rest in
    `pool`, each once its pixels fit in `budget` (waiting until the loop time `deadline` at
    most: 504). The first bad one (by index) raises ImageTooLarge (413) or InvalidImage (400)
    naming it; any other exception is a bug and propagates."""
    results: list = [None] * len(sources)
    pooled, room = [], INLINE_BYTES
    for i, source in enumerate(sources):
        if len(source) <= room:
            room -= len(source)
            try:
                results[i] = decode_image(source, spec, min(max_pixels, INLINE_PIXELS))
                continue
            except ImageTooLargeError:  # too large for the loop: the pool applies max_pixels
                pass
            except (ImageDecodeError, InvalidBase64) as e:  # reported below, in index order
                results[i] = e
                continue
        pooled.append(i)
    if pooled:
        done = await asyncio.gather(
            *(_decode_pooled(sources[i], spec, max_pixels, pool, budget, deadline) for i in pooled),
            return_exceptions=True,
        )
        for i, result in zip(pooled, done):
            results[i] = result
    for i, result in enumerate(results):
        if isinstance(result, ImageTooLargeError):
            raise ImageTooLarge(f"{field}[{i}]: {result}", index=i, param=f"{field}[{i}]")
        if isinstance(result, (ImageDecodeError, InvalidBase64)):
            raise InvalidImage(f"{field}[{i}]: {result}", index=i, param=f"{field}[{i}]")
        if isinstance(result, BaseException):
            raise result
    return results


async def _decode_pooled(
    source: str | bytes,
    spec: Preprocessing,
    max_pixels: int,
    pool: Executor,
    budget: DecodeBudget,
    deadline: float,
) -> np.ndarray:
    """Read the header on the pool, wait for the image's pixels to fit in the budget, decode
    on the pool; the pixels are given back when the decode ends (even if the request is gone
    by then)."""
    loop = asyncio.get_running_loop()
    img = await loop.run_in_executor(pool, open_source, source, spec, max_pixels)
    pixels = img.width * img.height
    if pixels > budget.limit:
        raise ImageTooLargeError(
            f"image is {img.width}x{img.height} = {pixels} pixels, more than a server process "
            f"decodes at once ({budget.limit}, max_decode_pixels)"
        )
    try:
        await asyncio.wait_for(budget.take(pixels), deadline - loop.time())
    except asyncio.TimeoutError:
        raise RequestTimeout(
            "the images waited past the request timeout for their turn to be decoded; "
            "the server is overloaded"
        ) from None
    try:
        work = pool.submit(preprocess_image, img, spec, max_pixels)
    except BaseException:
        budget.give(pixels)
        raise
    work.add_done_callback(lambda _: loop.call_soon_threadsafe(budget.give, pixels))
    return await asyncio.wrap_future(work)
