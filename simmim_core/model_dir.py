"""The model directory: the artifact between training and serving (torch-free).

model.json  the card (format_version, encoder, preprocessing, embedding_dim, pooling, training,
            evaluation, parity, and the sha256 of every ONNX file under "files")
encoder.onnx, reconstruct.onnx, optional encoder.int8.onnx
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .preprocess import Preprocessing

FORMAT_VERSION = 1
CARD = "model.json"
ENCODER, RECONSTRUCT, ENCODER_INT8 = "encoder.onnx", "reconstruct.onnx", "encoder.int8.onnx"
REQUIRED_FIELDS = (
    "format_version",
    "name",
    "image_size",
    "in_chans",
    "patch_size",
    "mask_patch_size",
    "mask_ratio",
    "preprocessing",
    "embedding_dim",
    "pooling",
    "files",
)


class ModelDirError(ValueError):
    """A model directory that cannot be served; the message names the file and the field."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelDir:
    path: Path
    card: dict
    preprocessing: Preprocessing

    @property
    def name(self) -> str:
        return self.card["name"]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_int8(self) -> bool:
        return ENCODER_INT8 in self.card["files"]


def load_model_dir(path, verify_hashes: bool = True) -> ModelDir:
    """Read and check a model directory: format_version, required fields, files and sha256."""
    path = Path(path)
    card_path = path / CARD
    if not card_path.is_file():
        raise ModelDirError(f"{card_path}: missing (is {path} a model directory?)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{card_path}: not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise ModelDirError(f"{card_path}: expected a JSON object")
    if card.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{card_path}: field format_version is {card.get('format_version')!r}; "
            f"this service reads format_version {FORMAT_VERSION}"
        )
    for field in REQUIRED_FIELDS:
        if field not in card:
            raise ModelDirError(f"{card_path}: required field {field!r} is missing")
    try:
        spec = Preprocessing.from_dict(card["preprocessing"])
    except (TypeError, ValueError, KeyError) as e:
        raise ModelDirError(f"{card_path}: field preprocessing is invalid ({e})") from None
    files = card["files"]
    for name in (ENCODER, RECONSTRUCT):
        if name not in files:
            raise ModelDirError(f"{card_path}: field files lacks {name!r}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise ModelDirError(f"{f}: listed in model.json files but missing")
        if verify_hashes and sha256_file(f) != meta.get("sha256"):
            raise ModelDirError(
                f"{f}: sha256 does not match field files[{name!r}].sha256 "
                "in model.json (corrupt or replaced file)"
            )
    return ModelDir(path, card, spec)
