"""What every importer shares: reading a source's files safely, the result it hands back, and
loading translated weights into our model with errors that name the source's own keys."""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simmim_core.nn.model import ModelConfig, SimMIM
from simmim_core.preprocess import Preprocessing

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# SimMIM evaluates at a center crop of 224/256 of the resized image (data_finetune.py)
SIMMIM_CROP_PCT = 224 / 256


class SourceError(ValueError):
    """A source we cannot read or map; the message names the key or field we do not understand."""


@dataclass
class ImportOptions:
    """What the user may add to a source that lacks it (None: read it from the source)."""

    image_size: int | None = None  # when the source does not say (Swin without attention masks)
    arch: str | None = None  # timm format: the timm architecture when the file does not name it


@dataclass
class Imported:
    """A source read into our model: the SimMIM module with the source's weights loaded."""

    model: SimMIM
    preprocessing: Preprocessing
    source: dict  # format, path, what the architecture was read from, notes
    fresh: list[str] = field(default_factory=list)  # our weights the source lacks (initialised)
    domain: str = ""  # one line: what images the model is for


class _CfgNode:
    """Stands in for yacs' CfgNode while unpickling official SimMIM checkpoints (their `config`):
    its items land in a plain OrderedDict, and no code of the checkpoint's runs."""

    def __new__(cls, *args):
        return OrderedDict()


# Classes a weights-only load may build besides tensors and containers: plain attribute bags.
SAFE_GLOBALS = [(_CfgNode, "yacs.config.CfgNode"), argparse.Namespace]


def load_torch_file(path: Path) -> dict:
    """A .pth/.pt/.bin file loaded with weights_only=True (no code runs); the yacs config of an
    official checkpoint and an argparse namespace are read as plain data."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise SourceError(
                f"{path} holds Python objects a weights-only load refuses ({unsafe[0]}); "
                "save its state dict alone (torch.save(ckpt['model'], 'weights.pth'))"
            ) from None
        raise SourceError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _unsafe_globals(path: Path) -> list[str]:
    allowed = {"yacs.config.CfgNode", "argparse.Namespace"}
    try:
        return [
            g
            for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if g not in allowed
        ]
    except Exception:  # not a zip checkpoint at all
        return []


def load_weights_file(path: Path) -> dict:
    """Tensors of a .safetensors file, or the dict of a PyTorch file."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path} is not a readable safetensors file ({e})") from None
    return load_torch_file(path)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return value


def state_dict_of(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint dict: itself, or its 'model' / 'state_dict' entry."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SourceError(f"{path} holds no tensors (keys: {', '.join(list(obj)[:5])})")
    other = next((k for k in obj if k not in tensors), None)
    if other is not None:
        raise SourceError(f"{path}: {other!r} is not a tensor; expected a state dict")
    return tensors


def square_side(n: int, what: str) -> int:
    """sqrt(n) when n is a square number, else a SourceError naming `what`."""
    side = math.isqrt(n)
    if side * side != n:
        raise SourceError(f"{what} has {n} entries, not a square grid; only square inputs import")
    return side


def imagenet_preprocessing(
    image_size: int, interpolation: str = "bicubic", crop_pct: float = SIMMIM_CROP_PCT
) -> Preprocessing:
    """RGB, shorter side resized to image_size / crop_pct, center crop, ImageNet mean/std."""
    return Preprocessing(
        "RGB",
        int(image_size / crop_pct),
        image_size,
        interpolation,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )


def reshaped(value: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    """`value` in the shape of `like` (the same numbers: a mask token [1, 1, D] as [1, 1, 1, D])."""
    if value.numel() != like.numel():
        raise SourceError(f"{what} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    return value.reshape(like.shape)


def default_mask_patch_size(image_size: int, patch_size: int) -> int:
    """SimMIM's 32 px mask cells where they fit the image and the patch grid, else one patch."""
    return 32 if image_size % 32 == 0 and 32 % patch_size == 0 else patch_size


def build_model(cfg: ModelConfig) -> SimMIM:
    """Our SimMIM for `cfg`, initialised from seed 0 (what the source lacks keeps these values)."""
    torch.manual_seed(0)
    try:
        return SimMIM(cfg).eval()
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"cannot build {cfg.arch} {cfg.encoder_kwargs}: {first}") from None


def load_translated(
    model: SimMIM,
    state: dict[str, torch.Tensor],
    origin: dict[str, str],
    source: Path,
    fresh: tuple[str, ...] = (),
) -> list[str]:
    """Copy `state` (our key -> tensor) into `model`; origin maps our keys to the source's.

    Every key of the source must find a place of the same shape, and every weight of the model
    must come from the source unless its name starts with one of `fresh`. Returns the weights
    that kept their initial values. Raises SourceError naming the first key that does not fit.
    """
    own = model.state_dict()
    for key, value in state.items():
        name = origin.get(key, key)
        if key not in own:
            raise SourceError(f"{source}: key {name!r} has no place in {model.cfg.arch}")
        if tuple(value.shape) != tuple(own[key].shape):
            raise SourceError(
                f"{source}: key {name!r} has shape {tuple(value.shape)}, "
                f"{model.cfg.arch} needs {tuple(own[key].shape)} for it"
            )
    missing = [k for k in own if k not in state]
    unexpected_missing = [k for k in missing if not k.startswith(fresh)]
    if unexpected_missing:
        raise SourceError(f"{source} has no weights for {unexpected_missing[0]} of our model")
    model.load_state_dict({**own, **state})
    return missing
