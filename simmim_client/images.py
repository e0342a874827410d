"""Anything image-like -> (filename, bytes, content type) for a multipart upload.

Accepted: a path (str or os.PathLike), encoded bytes (any format the server reads), a PIL image
(sent as PNG, lossless), or a numpy array [H, W], [H, W, 1|2|3|4] (gray, gray+alpha, RGB, RGBA)
of uint8, uint16, bool, or floats in [0, 1] (sent as PNG, encoded here: Pillow not needed).
"""

from __future__ import annotations

import io
import mimetypes
import os
import struct
import zlib
from pathlib import Path

import numpy as np

Upload = tuple[str, bytes, str]
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG color type


def to_upload(image, name: str = "image") -> Upload:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.name, path.read_bytes(), kind
    if isinstance(image, (bytes, bytearray, memoryview)):
        return name, bytes(image), "application/octet-stream"
    if isinstance(image, np.ndarray):
        return f"{name}.png", encode_png(image), "image/png"
    if type(image).__module__.startswith("PIL."):
        return f"{name}.png", _pil_png(image), "image/png"
    raise TypeError(
        f"cannot send {type(image).__name__} as an image; pass a path, bytes, a PIL "
        "image or a numpy array"
    )


def _pil_png(image) -> bytes:
    buf = io.BytesIO()
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, float...: PNG cannot hold
    image.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray) -> bytes:
    """[H, W] or [H, W, C] (C = 1..4) -> PNG bytes, 8 bits (16 for uint16) per channel."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in PNG_COLOR_TYPES or 0 in a.shape:
        raise ValueError(
            f"array of shape {array.shape} is not an image: expected [H, W] or "
            "[H, W, C] with C in 1..4"
        )
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ValueError("float arrays must hold values in [0, 1]")
        a = (a * 255 + 0.5).astype(np.uint8)
    elif a.dtype not in (np.uint8, np.uint16):
        raise TypeError(
            f"unsupported array dtype {a.dtype}; use uint8, uint16, bool or floats in [0, 1]"
        )
    height, width, channels = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    rows = a.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    scanlines = np.hstack([np.zeros((height, 1), np.uint8), rows])  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, depth, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )
