"""Part 4, in process: what each stage of one /embed request costs on one thread, through the
service's own functions (request model, base64, Pillow decode, preprocessing, the onnxruntime
session at batch 1, normalisation and JSON rendering, with base64 embeddings as requested by the
load, and as lists of numbers, the API's default), on the same request bodies as the load.

The service's response headers time decode + preprocessing together (wall time on its decode
pool); this splits them, and prices the HTTP-side stages the headers do not cover.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.app import embeddings_body, l2_normalize, to_json
from service.inputs import decode_base64
from service.schemas import EmbedRequest
from simmim_core.preprocess import (
    Preprocessing,
    normalize,
    open_image,
    resize_center_crop,
    to_color_mode,
)

from .model_speed import OrtEncoder
from .models import BenchModel


def per_item_ms(fn: Callable[[object], object], items: list, min_seconds: float) -> float:
    """Mean milliseconds of fn(item), cycling through items for at least min_seconds."""
    fn(items[0])
    n, start = 0, time.perf_counter()
    while n < len(items) or time.perf_counter() - start < min_seconds:
        fn(items[n % len(items)])
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def stage_costs(
    model: BenchModel,
    bodies: Path,
    provider: str,
    min_seconds: float = 0.5,
    originals: list[bytes] | None = None,
) -> dict:
    """Milliseconds per image for each stage (requests of one image each)."""
    spec = Preprocessing.from_dict(model.card["preprocessing"])
    lines = [json.loads(line) for line in bodies.read_text().splitlines() if line][:64]
    raw = [json.dumps(line["body"]).encode() for line in lines]
    texts = [EmbedRequest.model_validate_json(r).images[0] for r in raw]
    files = [decode_base64(t) for t in texts]
    draft = (spec.color_mode, spec.resize_size)
    decoded = [open_image(f, None, draft) for f in files]

    def prepare(img):
        img = resize_center_crop(
            to_color_mode(img, spec.color_mode),
            spec.resize_size,
            spec.crop_size,
            spec.interpolation,
        )
        return normalize(np.asarray(img), spec)

    engine = OrtEncoder(model, int8=False, provider=provider)
    pixels = np.stack([prepare(img) for img in decoded[:1]])
    vector = engine.session.run(["embedding"], {"pixels": pixels})[0]

    def render(v, encoding):
        return to_json(embeddings_body(l2_normalize(v), encoding, model.card["name"]))

    out = {
        "request_bytes_mean": float(np.mean([len(r) for r in raw])),
        "image_bytes_mean": float(np.mean([len(f) for f in files])),
        "parse_json_ms": per_item_ms(EmbedRequest.model_validate_json, raw, min_seconds),
        "base64_ms": per_item_ms(decode_base64, texts, min_seconds),
        "decode_ms": per_item_ms(lambda f: open_image(f, None, draft), files, min_seconds),
        "preprocess_ms": per_item_ms(prepare, decoded, min_seconds),
        "inference_b1_ms": per_item_ms(
            lambda p: engine.session.run(["embedding"], {"pixels": p}), [pixels], min_seconds
        ),
        "serialize_ms": per_item_ms(lambda v: render(v, "base64"), [vector], min_seconds),
        "serialize_float_ms": per_item_ms(lambda v: render(v, "float"), [vector], min_seconds),
    }
    if originals:
        out["originals"] = {
            "image_bytes_mean": float(np.mean([len(f) for f in originals])),
            "decode_ms": per_item_ms(lambda f: open_image(f, None, draft), originals, min_seconds),
            "preprocess_ms": per_item_ms(
                prepare, [open_image(f, None, draft) for f in originals], min_seconds
            ),
        }
    return out
