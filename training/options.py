"""Command-line options generated from the config dataclasses, each with its help text."""

from __future__ import annotations

import argparse
import dataclasses
import json

MODEL_HELP = {
    "family": "encoder family: vit, swin or cnn",
    "arch": "timm architecture name (e.g. vit_base_patch16_224, swin_base_patch4_window7_224, "
    "resnet50)",
    "image_size": "input size in pixels (square); must divide by --mask-patch-size",
    "in_chans": "input channels: 1 (gray) or 3 (RGB)",
    "encoder_kwargs": "JSON object of extra keyword arguments for timm.create_model (replaces the "
    'preset\'s), e.g. \'{"embed_dim": 192, "depth": 12}\'; for cnn also '
    "patch_size (mask cell in pixels) and fill (mean or noise)",
    "mask_patch_size": "side of one mask block in pixels; must divide by the encoder's patch size",
    "mask_ratio": "fraction of mask blocks masked (ceil(ratio * blocks) of them)",
    "mask_kind": "mask generator: block (SimMIM), square, stripes or hierarchical",
    "decoder": "decoder: linear (1x1 conv + PixelShuffle, SimMIM) or transformer (2 light blocks)",
    "rec_loss": "reconstruction loss on masked pixels: l1 (SimMIM) or mse",
    "sim_loss": "similarity term added to the loss: none (SimMIM alone), cosine, perceptual or "
    "contrastive (the 16-epoch ablation's winner on Fashion-MNIST, about 2.6x the time)",
    "sim_lambda": "weight lambda of the similarity term: loss = L_rec + lambda * L_sim",
    "temperature": "InfoNCE temperature tau (contrastive)",
    "proj_dim": "output size of the contrastive projection head",
    "ema_momentum": "momentum of the EMA encoder used as the frozen network (perceptual)",
    "pooling": "embedding pooling: mean (over patch tokens), cls (ViT class token) or gridK "
    "(the token map average-pooled to K x K cells and flattened, e.g. grid4)",
    "feature_layer": "ViT: embed the tokens after this block (1..depth; 0: the last)",
    "feature_norm": "ViT: pass the embedded tokens through the encoder's final norm (true/false)",
}
TRAIN_HELP = {
    "epochs": "epochs to train (fractions allowed)",
    "steps": "stop after this many optimizer steps (overrides --epochs for the schedule)",
    "batch_size": "images per process per micro-batch",
    "accum_steps": "micro-batches accumulated per optimizer step",
    "base_lr": "learning rate per 512 images; lr = base_lr * total batch / 512",
    "warmup_epochs": "epochs of linear warmup from --warmup-lr",
    "warmup_lr": "learning rate at the start of warmup",
    "min_lr": "final learning rate of the cosine schedule",
    "weight_decay": "AdamW weight decay (not applied to biases, norms, tokens, position "
    "embeddings)",
    "betas": "AdamW betas, two numbers",
    "clip_grad": "gradient norm clipping (0 disables)",
    "crop_scale": "RandomResizedCrop area range, two numbers",
    "crop_ratio": "RandomResizedCrop aspect range, two numbers",
    "hflip": "random horizontal flip (true/false)",
    "mean": "per-channel mean of [0, 1] pixels used for normalisation",
    "std": "per-channel std of [0, 1] pixels used for normalisation",
    "interpolation": "resize interpolation: nearest, bilinear, bicubic or lanczos",
    "amp": "mixed precision: auto (bf16 on a CUDA device that supports it), bf16 or off",
    "workers": "data loader worker processes",
    "seed": "seed for initialisation, data order, augmentation and masks",
    "log_every": "optimizer steps between lines of metrics.jsonl",
}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text!r}")
    return value


def _shown(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":")) if value else "{}"
    if isinstance(value, (tuple, list)):
        return " ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def preset_values(name: str, configs: dict) -> str:
    """'[preset: a X; b Y]' (or '[every preset: X]') for field `name` of each preset's config."""
    values = {preset: _shown(getattr(cfg, name)) for preset, cfg in configs.items()}
    if len(set(values.values())) == 1:
        return f"[every preset: {next(iter(values.values()))}]"
    return "[preset: " + "; ".join(f"{k} {v}" for k, v in values.items()) + "]"


def add_dataclass_options(
    parser: argparse.ArgumentParser, cls, helps: dict, title: str, presets: dict | None = None
) -> None:
    """One --flag per field of `cls`, default None (meaning: keep the preset's value); with
    `presets` ({name: config}), each help ends with the presets' values."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = helps[f.name]
        if presets:
            help_ += " " + preset_values(f.name, presets)
        kw = dict(dest=f.name, default=None, help=help_.replace("%", "%%"))
        if isinstance(default, bool):
            kw["type"] = parse_bool
        elif isinstance(default, dict):
            kw["type"] = _json_object
        elif isinstance(default, tuple):
            kw.update(type=float, nargs="+")
        elif isinstance(default, float) or str(f.type).startswith("float"):
            kw["type"] = float  # by annotation: `epochs: float = 100` takes 0.5
        elif isinstance(default, int) or str(f.type).startswith("int"):
            kw["type"] = int
        group.add_argument(flag, **kw)


def given_options(args: argparse.Namespace, helps: dict) -> dict:
    """The options of `helps` the user gave on the command line (lists as tuples)."""
    given = {k: getattr(args, k) for k in helps if getattr(args, k, None) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def apply_overrides(config, args: argparse.Namespace, helps: dict):
    """A copy of `config` with every option the user gave."""
    return dataclasses.replace(config, **given_options(args, helps))
