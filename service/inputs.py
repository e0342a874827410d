"""Request bodies -> validated models; images (base64, data URIs, files) -> model input.

Limits: the request's bytes (middleware.BodyLimit), images per request (here), pixels per image
(from the header, before the full decode). Decoding and preprocessing run in a thread pool, so
they overlap inference and never block the event loop for long; only small images (a thumbnail
decodes in about 0.1 ms, less than the hand-off to a thread costs) are decoded on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from concurrent.futures import Executor
from typing import TypeVar

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from simmim_core.preprocess import (
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    preprocess_image,
)

from .errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    TooManyImages,
    UnsupportedMediaType,
    invalid_request,
)
from .schemas import RequestBody

log = logging.getLogger("simmim.inputs")

Body = TypeVar("Body", bound=RequestBody)
_DATA_URI = re.compile(r"data:[^,;]*(;[^,;]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")

# Decoded on the event loop: images of at most INLINE_PIXELS (from the header), while the
# request's inline images add up to at most INLINE_BYTES encoded; each costs the loop < 0.2 ms.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 16_384


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, model: type[Body], max_images: int) -> Body:
    """Parse a JSON or multipart/form-data body into `model`: 415, 422 or 413 (image count)."""
    kind = media_type(request)
    try:
        if kind == "application/json" or kind.endswith("+json"):
            body = model.model_validate_json(await request.body())
        elif kind == "multipart/form-data":
            body = model.model_validate(await _form_fields(request, model))
        else:
            raise UnsupportedMediaType(
                f"Content-Type {kind or '(none)'!r} is not accepted; send "
                "application/json or multipart/form-data"
            )
    except ValidationError as e:
        raise invalid_request(e) from None
    if body.image_count > max_images:
        raise TooManyImages(f"{body.image_count} images in one request; the limit is {max_images}")
    return body


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
                raise InvalidRequest(f"{key}: given more than once")
            else:
                fields[key] = value
    return fields


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


async def decode_images(
    sources: list[str | bytes], field: str, spec: Preprocessing, max_pixels: int, pool: Executor
) -> list[np.ndarray]:
    """Decode and preprocess every image: small ones here (see INLINE_PIXELS), the rest in
    `pool`; the first bad one (by index) raises ImageTooLarge (413) or InvalidImage (400)
    naming it."""
    results: list = [None] * len(sources)
    pooled, budget = [], INLINE_BYTES
    for i, source in enumerate(sources):
        if len(source) <= budget:
            budget -= len(source)
            try:
                results[i] = decode_image(source, spec, min(max_pixels, INLINE_PIXELS))
                continue
            except ImageTooLargeError:  # too large for the loop: the pool applies max_pixels
                pass
            except Exception as e:  # reported below, in index order
                results[i] = e
                continue
        pooled.append(i)
    if pooled:
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(
            *(
                loop.run_in_executor(pool, decode_image, sources[i], spec, max_pixels)
                for i in pooled
            ),
            return_exceptions=True,
        )
        for i, result in zip(pooled, done):
            results[i] = result
    for i, result in enumerate(results):
        if isinstance(result, ImageTooLargeError):
            raise ImageTooLarge(f"{field}[{i}]: {result}", index=i, param=f"{field}[{i}]")
        if isinstance(result, (ImageDecodeError, InvalidBase64)):
            raise InvalidImage(f"{field}[{i}]: {result}", index=i, param=f"{field}[{i}]")
        if isinstance(result, Exception):  # an image Pillow chokes on: still the image's fault
            log.warning("%s[%d] could not be processed", field, i, exc_info=result)
            raise InvalidImage(
                f"{field}[{i}]: image could not be processed ({type(result).__name__})",
                index=i,
                param=f"{field}[{i}]",
            )
        if isinstance(result, BaseException):
            raise result
    return results
