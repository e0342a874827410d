"""Official microsoft/SimMIM pretraining checkpoints (.pth): {"model": {encoder.*, decoder.*},
"config": yacs config, ...}, for ViT (BEiT-style) and Swin.

The ViT lands on timm's BEiT (our BEiTEncoder), whose key names are the official ones; Swin on
timm's SwinTransformer through timm's own converter for the original Swin key names. The
decoder (`decoder.0`, a 1x1 convolution before PixelShuffle) is ours, `decoder.proj`.
"""

from __future__ import annotations

from pathlib import Path

from simmim_core.nn.model import ModelConfig, SimMIM

from .layouts import beit_kwargs, swin_image_size, swin_kwargs
from .source import (
    Imported,
    ImportOptions,
    SourceError,
    build_model,
    default_mask_patch_size,
    imagenet_preprocessing,
    load_torch_file,
    load_translated,
    reshaped,
)
from .translate import timm_translate

DECODER = {"decoder.0.weight": "decoder.proj.weight", "decoder.0.bias": "decoder.proj.bias"}


def is_official(state: dict) -> bool:
    """Keys under encoder. and decoder. only, with the decoder's 1x1 convolution."""
    return "decoder.0.weight" in state and all(
        k.startswith(("encoder.", "decoder.")) for k in state
    )


def read_official(path: Path, obj: dict | None, options: ImportOptions) -> Imported:
    """An official SimMIM .pth (already loaded as `obj`, or read here) -> Imported."""
    obj = load_torch_file(path) if obj is None else obj
    state = obj.get("model", obj)
    config = obj.get("config") or {}
    stray = next((k for k in state if not k.startswith(("encoder.", "decoder."))), None)
    if stray is not None:
        raise SourceError(
            f"{path}: key {stray!r} is neither encoder.* nor decoder.* (an official SimMIM "
            "pretraining checkpoint holds only those; fine-tuned checkpoints have no decoder)"
        )
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
    unknown = next((k for k in decoder if k not in DECODER), None)
    if unknown is not None or "decoder.0.weight" not in decoder:
        raise SourceError(
            f"{path}: key {unknown or 'decoder.0.weight'!r}: expected decoder.0.* only"
        )
    if "mask_token" not in encoder:
        raise SourceError(f"{path} has no encoder.mask_token (not a SimMIM checkpoint)")
    section = _section(config)
    try:
        if "layers.0.blocks.0.norm1.weight" in encoder:
            model, arch_note = _swin(path, encoder, section, options)
        elif "blocks.0.norm1.weight" in encoder:
            model, arch_note = _vit(encoder, section)
        else:
            raise SourceError(
                f"{path}: key 'encoder.{next(iter(encoder))}' is neither ViT nor Swin"
            )
    except KeyError as e:
        raise SourceError(
            f"{path} has no encoder.{e.args[0]} (an official SimMIM layout has)"
        ) from None
    body = {k: v for k, v in encoder.items() if k != "mask_token"}
    translated, origin = timm_translate(model, body, prefix="encoder.")
    translated["encoder.mask_token"] = reshaped(
        encoder["mask_token"], model.encoder.mask_token, f"{path}: encoder.mask_token"
    )
    for key, ours in DECODER.items():
        if key in decoder:
            translated[ours], origin[ours] = decoder[key], key
    load_translated(model, translated, origin, path)
    spec = imagenet_preprocessing(model.cfg.image_size, _interpolation(section))
    return Imported(
        model=model,
        preprocessing=spec,
        source={
            "format": "official",
            "architecture": arch_note,
            "epoch": obj.get("epoch"),
            "config": "the checkpoint's config" if config else "read from the weights",
            "preprocessing": "SimMIM's: RGB, ImageNet mean/std, resize to 256/224 of the "
            "input size, center crop",
        },
        domain=f"RGB photographs at {model.cfg.image_size} px if these are published SimMIM "
        f"weights (pretrained on ImageNet-1k); imported from {path.name}",
    )


def _section(config: dict) -> dict:
    """The DATA and MODEL entries of an official config (empty when the file has none)."""
    data, model = config.get("DATA") or {}, config.get("MODEL") or {}
    return {
        "image_size": data.get("IMG_SIZE"),
        "interpolation": data.get("INTERPOLATION"),
        "mask_patch_size": data.get("MASK_PATCH_SIZE"),
        "mask_ratio": data.get("MASK_RATIO"),
        "type": model.get("TYPE"),
    }


def _interpolation(section: dict) -> str:
    value = section["interpolation"] or "bicubic"
    return "bicubic" if value == "random" else value  # "random" picks one per training image


def _config(
    family: str, arch: str, kwargs: dict, size: int, encoder: dict, section: dict
) -> ModelConfig:
    """Our ModelConfig for the encoder read off the weights; the config, where the file has
    one, must agree with them and gives the mask settings (else SimMIM's 32 px, 0.6)."""
    if section["image_size"] is not None and section["image_size"] != size:
        raise SourceError(
            f"the checkpoint's config says DATA.IMG_SIZE {section['image_size']}, "
            f"its weights fit {size} px"
        )
    if section["type"] is not None and section["type"] != family:
        raise SourceError(
            f"the checkpoint's config says MODEL.TYPE {section['type']!r}, its weights are {family}"
        )
    patch = encoder["patch_embed.proj.weight"].shape[-1]
    return ModelConfig(
        family=family,
        arch=arch,
        image_size=size,
        in_chans=encoder["patch_embed.proj.weight"].shape[1],
        encoder_kwargs=kwargs,
        mask_patch_size=section["mask_patch_size"] or default_mask_patch_size(size, patch),
        mask_ratio=section["mask_ratio"] or 0.6,
        pooling="mean",
    )


def _vit(encoder: dict, section: dict) -> tuple[SimMIM, str]:
    arch, kwargs, size = beit_kwargs(encoder)
    model = build_model(_config("vit", arch, kwargs, size, encoder, section))
    bias = "shared" if kwargs.get("use_shared_rel_pos_bias") else "per-block"
    return model, f"SimMIM ViT (BEiT-style, {bias} relative position bias) as timm {arch}"


def _swin(path: Path, encoder: dict, section: dict, options: ImportOptions) -> tuple[SimMIM, str]:
    arch, kwargs, window = swin_kwargs(encoder)
    patch = encoder["patch_embed.proj.weight"].shape[-1]
    size = swin_image_size(encoder, window, patch) or section["image_size"] or options.image_size
    if size is None:
        raise SourceError(
            f"{path} does not say its input size (no attention masks, no config): "
            "give --image-size (192 for the published Swin checkpoints)"
        )
    model = build_model(_config("swin", arch, kwargs, size, encoder, section))
    return model, f"Swin, window {window}, as timm {arch}"
