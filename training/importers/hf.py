"""Hugging Face `save_pretrained` folders of ViTForMaskedImageModeling and
SwinForMaskedImageModeling (config.json + model.safetensors or pytorch_model.bin, and
preprocessor_config.json when the image processor was saved too).

ViT lands on timm's VisionTransformer (q/k/v fused into qkv, LayerNorm eps from the config),
Swin on timm's SwinTransformer: its keys are renamed to the original Swin names and go through
timm's converter like an official checkpoint. Config fields are checked against what we map:
an unknown field, or a value we cannot reproduce, is an error naming the field.
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
    reshaped,
    state_dict_of,
)
from .translate import rename, timm_translate

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ARCHITECTURES = {"vit": "ViTForMaskedImageModeling", "swin": "SwinForMaskedImageModeling"}
# PretrainedConfig's own fields, dropout and initialisation: nothing that changes a forward pass
# in eval mode.
GENERIC_FIELDS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "id2label", "label2id", "num_labels", "problem_type", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "pruned_heads",
    "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tf_legacy_loss", "finetuning_task", "initializer_range",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
}  # fmt: skip
VIT_FIELDS = GENERIC_FIELDS | {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
    "encoder_stride", "pooler_output_size", "pooler_act",
}  # fmt: skip
SWIN_FIELDS = GENERIC_FIELDS | {
    "image_size", "patch_size", "num_channels", "embed_dim", "depths", "num_heads",
    "window_size", "mlp_ratio", "qkv_bias", "hidden_act", "use_absolute_embeddings",
    "layer_norm_eps", "encoder_stride", "out_features", "out_indices", "stage_names",
    "hidden_size", "num_layers", "path_norm",
}  # fmt: skip
# transformers' activation names -> timm's (None: timm's default, exact GELU)
ACTIVATIONS = {"gelu": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# PIL resampling codes in preprocessor_config.json
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

L = r"vit\.encoder\.layer\.(\d+)"
VIT_RULES = [
    (r"vit\.embeddings\.cls_token", "encoder.vit.cls_token"),
    (r"vit\.embeddings\.mask_token", "encoder.mask_token"),
    (r"vit\.embeddings\.position_embeddings", "encoder.vit.pos_embed"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.(weight|bias)",
     r"encoder.vit.patch_embed.proj.\1"),
    (rf"{L}\.attention\.attention\.query\.(weight|bias)", r"encoder.vit.blocks.\1.attn.qkv.q.\2"),
    (rf"{L}\.attention\.attention\.key\.(weight|bias)", r"encoder.vit.blocks.\1.attn.qkv.k.\2"),
    (rf"{L}\.attention\.attention\.value\.(weight|bias)", r"encoder.vit.blocks.\1.attn.qkv.v.\2"),
    (rf"{L}\.attention\.output\.dense\.(weight|bias)", r"encoder.vit.blocks.\1.attn.proj.\2"),
    (rf"{L}\.intermediate\.dense\.(weight|bias)", r"encoder.vit.blocks.\1.mlp.fc1.\2"),
    (rf"{L}\.output\.dense\.(weight|bias)", r"encoder.vit.blocks.\1.mlp.fc2.\2"),
    (rf"{L}\.layernorm_before\.(weight|bias)", r"encoder.vit.blocks.\1.norm1.\2"),
    (rf"{L}\.layernorm_after\.(weight|bias)", r"encoder.vit.blocks.\1.norm2.\2"),
    (r"vit\.layernorm\.(weight|bias)", r"encoder.vit.norm.\1"),
    (r"decoder\.0\.(weight|bias)", r"decoder.proj.\1"),
]  # fmt: skip
B = r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)"
SWIN_RULES = [  # to the original Swin names, which timm's checkpoint filter converts
    (r"swin\.embeddings\.mask_token", "mask_token"),
    (r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"swin\.embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (rf"{B}\.layernorm_before\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
    (rf"{B}\.attention\.self\.query\.(weight|bias)", r"layers.\1.blocks.\2.attn.qkv.q.\3"),
    (rf"{B}\.attention\.self\.key\.(weight|bias)", r"layers.\1.blocks.\2.attn.qkv.k.\3"),
    (rf"{B}\.attention\.self\.value\.(weight|bias)", r"layers.\1.blocks.\2.attn.qkv.v.\3"),
    (rf"{B}\.attention\.self\.relative_position_bias_table",
     r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (rf"{B}\.attention\.self\.relative_position_index", None),
    (rf"{B}\.attention\.output\.dense\.(weight|bias)", r"layers.\1.blocks.\2.attn.proj.\3"),
    (rf"{B}\.layernorm_after\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
    (rf"{B}\.intermediate\.dense\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (rf"{B}\.output\.dense\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
     r"layers.\1.downsample.\2.\3"),
    (r"swin\.layernorm\.(weight|bias)", r"norm.\1"),
    (r"decoder\.0\.(weight|bias)", r"decoder.\1"),
]  # fmt: skip


def read_hf(folder: Path, obj: dict | None, options: ImportOptions) -> Imported:
    """A save_pretrained folder of a *ForMaskedImageModeling model -> Imported."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder} has no config.json (not a Hugging Face model folder)")
    config = read_json(config_path)
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise SourceError(
            f"{config_path}: field model_type is {kind!r}; we import 'vit' and 'swin' "
            "(ViTForMaskedImageModeling, SwinForMaskedImageModeling)"
        )
    wanted = ARCHITECTURES[kind]
    if wanted not in (config.get("architectures") or []):
        raise SourceError(
            f"{config_path}: field architectures is {config.get('architectures')!r}; "
            f"we import {wanted} (it has the pixel decoder)"
        )
    unknown = next(
        (f for f in config if f not in (VIT_FIELDS if kind == "vit" else SWIN_FIELDS)), None
    )
    if unknown is not None:
        raise SourceError(f"{config_path}: field {unknown!r} is not one we know how to map")
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise SourceError(f"{folder} has no {' or '.join(WEIGHTS)} (sharded weights do not import)")
    state = state_dict_of(load_weights_file(weights), weights)
    image_size = _square(config, "image_size", config_path)
    patch = _square(config, "patch_size", config_path)
    act = _field(config, "hidden_act", ACTIVATIONS, config_path, "gelu")
    if kind == "vit":
        model, translated, origin = _vit(
            config, state, image_size, patch, act, config_path, weights
        )
    else:
        model, translated, origin = _swin(
            config, state, image_size, patch, act, config_path, weights
        )
    load_translated(model, translated, origin, weights)
    spec, how = preprocessing(folder, image_size)
    return Imported(
        model=model,
        preprocessing=spec,
        source={
            "format": "hf",
            "architecture": f"{wanted} as timm {model.cfg.arch}",
            "preprocessing": how,
        },
        domain=f"RGB images at {image_size} px; imported from the Hugging Face model "
        f"{folder.resolve().name} (its model card says what it was pretrained on)",
    )


def _vit(config, state, image_size, patch, act, config_path, weights):
    if config.get("encoder_stride", patch) != patch:
        raise SourceError(
            f"{config_path}: field encoder_stride is {config['encoder_stride']}, "
            f"the patch size {patch}; SimMIM's decoder needs them equal"
        )
    dim = config.get("hidden_size", 768)
    kwargs = dict(
        patch_size=patch,
        embed_dim=dim,
        depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12),
        mlp_ratio=config.get("intermediate_size", 3072) / dim,
        qkv_bias=config.get("qkv_bias", True),
        norm_eps=config.get("layer_norm_eps", 1e-12),
    )
    if act is not None:
        kwargs["act_layer"] = act
    cfg = _model_config("vit", "vit_base_patch16_224", kwargs, image_size, patch, config)
    model = build_model(cfg)
    translated, origin = rename(state, VIT_RULES, str(weights))
    if "encoder.mask_token" in translated:
        translated["encoder.mask_token"] = reshaped(
            translated["encoder.mask_token"], model.encoder.mask_token, "vit.embeddings.mask_token"
        )
    return model, translated, origin


def _swin(config, state, image_size, patch, act, config_path, weights):
    if config.get("use_absolute_embeddings"):
        raise SourceError(
            f"{config_path}: field use_absolute_embeddings is true; timm's Swin has none"
        )
    if not config.get("path_norm", True):
        raise SourceError(
            f"{config_path}: field path_norm is false; timm's Swin always norms patches"
        )
    if config.get("layer_norm_eps", 1e-5) != 1e-5:
        raise SourceError(
            f"{config_path}: field layer_norm_eps is {config['layer_norm_eps']}; "
            "Swin imports with 1e-5"
        )
    depths = list(config.get("depths", [2, 2, 6, 2]))
    stride = patch * 2 ** (len(depths) - 1)
    if config.get("encoder_stride", stride) != stride:
        raise SourceError(
            f"{config_path}: field encoder_stride is {config['encoder_stride']}; "
            f"{len(depths)} stages of patch {patch} give {stride}"
        )
    kwargs = dict(
        patch_size=patch,
        window_size=config.get("window_size", 7),
        embed_dim=config.get("embed_dim", 96),
        depths=depths,
        num_heads=list(config.get("num_heads", [3, 6, 12, 24])),
        mlp_ratio=config.get("mlp_ratio", 4.0),
        qkv_bias=config.get("qkv_bias", True),
    )
    if act is not None:
        raise SourceError(
            f"{config_path}: field hidden_act is {config['hidden_act']!r}; timm's Swin uses gelu"
        )
    cfg = _model_config("swin", "swin_tiny_patch4_window7_224", kwargs, image_size, patch, config)
    model = build_model(cfg)
    renamed, source_names = rename(state, SWIN_RULES, str(weights))
    mask = renamed.pop("mask_token", None)
    decoder = {k: renamed.pop(k) for k in [k for k in renamed if k.startswith("decoder.")]}
    translated, via = timm_translate(model, renamed, prefix="")
    origin = {ours: source_names.get(name, name) for ours, name in via.items()}
    if mask is not None:
        translated["encoder.mask_token"] = reshaped(
            mask, model.encoder.mask_token, "swin.embeddings.mask_token"
        )
        origin["encoder.mask_token"] = "swin.embeddings.mask_token"
    for key, value in decoder.items():
        ours = key.replace("decoder.", "decoder.proj.")
        translated[ours], origin[ours] = value, source_names[key]
    return model, translated, origin


def _model_config(family, arch, kwargs, image_size, patch, config) -> ModelConfig:
    return ModelConfig(
        family=family,
        arch=arch,
        image_size=image_size,
        in_chans=config.get("num_channels", 3),
        encoder_kwargs=kwargs,
        mask_patch_size=default_mask_patch_size(image_size, patch),
        pooling="mean",
    )


def _square(config: dict, field: str, path: Path) -> int:
    value = config.get(field, 224 if field == "image_size" else 16)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise SourceError(f"{path}: field {field} is {value}; only square sizes import")
        value = value[0]
    return int(value)


def _field(config: dict, field: str, table: dict, path: Path, default):
    value = config.get(field, default)
    if value not in table:
        raise SourceError(f"{path}: field {field} is {value!r}; we map {sorted(table)}")
    return table[value]


def preprocessing(folder: Path, image_size: int) -> tuple[Preprocessing, str]:
    """(preprocessing, where it came from): preprocessor_config.json when the folder has one
    (mean, std, resampling; resize then center crop where it crops), else SimMIM's defaults
    (ImageNet mean/std, bicubic)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        spec = Preprocessing("RGB", image_size, image_size, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
        return (
            spec,
            "SimMIM's defaults (no preprocessor_config.json): RGB, ImageNet mean/std, bicubic",
        )
    p = read_json(path)
    if p.get("do_rescale", True) and abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise SourceError(
            f"{path}: field rescale_factor is {p['rescale_factor']}; we scale by 1/255"
        )
    mean, std = p.get("image_mean", IMAGENET_MEAN), p.get("image_std", IMAGENET_STD)
    if not p.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = p.get("resample", 3)
    if resample not in RESAMPLE:
        raise SourceError(f"{path}: field resample is {resample!r}; we map {sorted(RESAMPLE)}")
    resize = image_size
    if p.get("do_center_crop"):
        size = p.get("size", image_size)
        resize = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    spec = Preprocessing(
        "RGB", int(resize), image_size, RESAMPLE[resample], tuple(mean), tuple(std)
    )
    how = "preprocessor_config.json: mean, std, resampling"
    if not p.get("do_center_crop"):
        how += " (it resizes to a square; we resize the shorter side and center-crop)"
    return spec, how
