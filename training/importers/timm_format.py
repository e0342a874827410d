"""timm checkpoints: a state dict in timm's key names (a .pth/.pt/.bin/.safetensors file, bare or
under "state_dict"/"model", as timm's train.py saves it with its "arch"), or a folder as timm
pushes to the Hugging Face hub (config.json with "architecture", "model_args" and
"pretrained_cfg", + model.safetensors or pytorch_model.bin).

Supported: timm's VisionTransformer, BEiT (both our "vit" family) and SwinTransformer ("swin").
A timm checkpoint has no SimMIM mask token and no pixel decoder: they start from our
initialisation (seed 0), so embeddings are the checkpoint's and reconstructions mean nothing until
the model is pretrained further. The classifier head is left out.
"""

from __future__ import annotations

from pathlib import Path

from simmim_core.nn.model import ModelConfig
from simmim_core.preprocess import Preprocessing

from .source import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Imported,
    ImportOptions,
    SourceError,
    build_model,
    default_mask_patch_size,
    load_translated,
    load_weights_file,
    read_json,
    state_dict_of,
)
from .translate import timm_translate

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FAMILIES = {"vision_transformer": "vit", "beit": "vit", "swin_transformer": "swin"}
CLASSES = ("VisionTransformer", "Beit", "SwinTransformer")
# set by our encoders, not by the checkpoint
OWN_ARGS = ("img_size", "in_chans", "num_classes", "global_pool")
FRESH = ("encoder.mask_token", "decoder.")


def read_timm(path: Path, obj: dict | None, options: ImportOptions) -> Imported:
    """A timm state dict file or hub folder -> Imported (mask token and decoder initialised)."""
    import timm

    pretrained_cfg, model_args = {}, {}
    if path.is_dir():
        config = read_json(path / "config.json")
        arch = options.arch or config.get("architecture")
        model_args = dict(config.get("model_args") or {})
        pretrained_cfg = config.get("pretrained_cfg") or {}
        weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise SourceError(f"{path} has no {' or '.join(WEIGHTS)}")
        obj = load_weights_file(weights)
    else:
        weights = path
        obj = load_weights_file(path) if obj is None else obj
        arch = options.arch or obj.get("arch")
    if not arch:
        raise SourceError(
            f"{path} does not name its timm architecture: give --arch (e.g. vit_base_patch16_224)"
        )
    if not timm.is_model(arch):
        raise SourceError(f"{arch!r} is not a timm architecture (timm {timm.__version__})")
    module = next((m for m in FAMILIES if timm.models.is_model_in_modules(arch, [m])), None)
    if module is None:
        raise SourceError(
            f"timm architecture {arch!r} is not one we import "
            f"(modules {', '.join(FAMILIES)}: {', '.join(CLASSES)})"
        )
    state = state_dict_of(obj, weights)
    default_cfg = timm.models.get_pretrained_cfg(arch)
    default_cfg = default_cfg.to_dict() if default_cfg is not None else {}
    pcfg = {**default_cfg, **pretrained_cfg}
    image_size = (
        options.image_size
        or model_args.get("img_size")
        or pcfg.get("input_size", [3, 224, 224])[-1]
    )
    patch_weight = state.get("patch_embed.proj.weight")
    if patch_weight is None:
        raise SourceError(f"{weights} has no patch_embed.proj.weight (not a {arch} state dict)")
    if patch_weight.shape[1] != 3:
        raise SourceError(
            f"{weights}: patch_embed.proj.weight takes {patch_weight.shape[1]} channels; "
            "RGB (3) imports"
        )
    cfg = ModelConfig(
        family=FAMILIES[module],
        arch=arch,
        image_size=int(image_size),
        in_chans=patch_weight.shape[1],
        encoder_kwargs={k: v for k, v in model_args.items() if k not in OWN_ARGS},
        mask_patch_size=default_mask_patch_size(int(image_size), patch_weight.shape[-1]),
        pooling="mean",
    )
    model = build_model(cfg)
    net = model.encoder.swin if cfg.family == "swin" else model.encoder.vit
    if type(net).__name__ not in CLASSES:
        raise SourceError(
            f"timm architecture {arch!r} builds a {type(net).__name__}; "
            f"we import {', '.join(CLASSES)}"
        )
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    translated, origin = timm_translate(model, body, prefix="")
    fresh = load_translated(model, translated, origin, weights, fresh=FRESH)
    crop_pct = pcfg.get("crop_pct") or 1.0
    spec = Preprocessing(
        "RGB",
        int(cfg.image_size / crop_pct),
        cfg.image_size,
        pcfg.get("interpolation") or "bicubic",
        tuple(pcfg.get("mean") or IMAGENET_MEAN),
        tuple(pcfg.get("std") or IMAGENET_STD),
    )
    return Imported(
        model=model,
        preprocessing=spec,
        source={
            "format": "timm",
            "architecture": f"timm {arch} ({type(net).__name__})",
            "left_out": sorted({k.split(".")[0] + ".*" for k in state if k.startswith("head.")}),
            "preprocessing": "the pretrained_cfg of its config.json"
            if pretrained_cfg
            else f"timm's default pretrained_cfg for {arch}",
        },
        fresh=fresh,
        domain=f"RGB images at {cfg.image_size} px; imported from the timm model "
        f"{arch} ({path.name}); see its pretrained_cfg for what it was trained on",
    )
