"""Architectures read off a state dict in the official SimMIM / timm layout (no "encoder."
prefix): widths, depths and heads from the weights' shapes, named timm variants where they fit.

  beit_kwargs(sd)  the official SimMIM ViT (BEiT-style) -> timm beit_* kwargs and image size
  swin_kwargs(sd)  Swin (official or timm key names)    -> timm swin_* kwargs
"""

from __future__ import annotations

import re

import torch

from .source import SourceError, square_side

# timm variants: (arch, the kwargs its entry point sets); an imported model is named after the
# first whose kwargs all match, and only what differs is kept in encoder_kwargs.
BEIT_VARIANTS = (
    ("beit_base_patch16_224", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    ("beit_large_patch16_224", dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)),
)
SWIN_VARIANTS = tuple(
    (f"swin_{size}_patch4_window7_224", dict(embed_dim=dim, depths=depths, num_heads=heads))
    for size, dim, depths, heads in (
        ("tiny", 96, [2, 2, 6, 2], [3, 6, 12, 24]),
        ("small", 96, [2, 2, 18, 2], [3, 6, 12, 24]),
        ("base", 128, [2, 2, 18, 2], [4, 8, 16, 32]),
        ("large", 192, [2, 2, 18, 2], [6, 12, 24, 48]),
    )
)
SWIN_DEFAULTS = dict(patch_size=4, window_size=7, mlp_ratio=4.0)  # set by every swin_* above


def name_variant(variants, kwargs: dict, fallback: str) -> tuple[str, dict]:
    """(arch, kwargs minus what the arch already sets); `fallback` with every kwarg if none fits."""
    for arch, fixed in variants:
        if all(kwargs.get(k) == v for k, v in fixed.items()):
            return arch, {k: v for k, v in kwargs.items() if k not in fixed}
    return fallback, kwargs


def count_indexed(sd: dict, pattern: str) -> int:
    """How many distinct i appear in keys matching `pattern` (a regex with one (\\d+) group)."""
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise SourceError(f"the blocks matching {pattern!r} are not numbered 0..{len(found) - 1}")
    return len(found)


def mlp_ratio(sd: dict, prefix: str, dim: int) -> float:
    return sd[f"{prefix}.mlp.fc1.weight"].shape[0] / dim


def beit_kwargs(sd: dict[str, torch.Tensor]) -> tuple[str, dict, int]:
    """The official SimMIM ViT (BEiT-style, timm key names) -> (timm arch, kwargs, image size).

    Heads and the patch grid come from a relative position bias table ((2g-1)^2 + 3 rows, one
    column per head); layer scale from gamma_1, q/v biases from q_bias.
    """
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = count_indexed(sd, r"blocks\.(\d+)\.norm1\.weight")
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_block = "blocks.0.attn.relative_position_bias_table" in sd
    absolute = "pos_embed" in sd
    table = sd.get(
        "rel_pos_bias.relative_position_bias_table",
        sd.get("blocks.0.attn.relative_position_bias_table"),
    )
    if table is None:
        raise SourceError(
            "this ViT has no relative position bias table, so its number of attention heads "
            "cannot be read from the weights (not an official SimMIM ViT)"
        )
    grid = (square_side(table.shape[0] - 3, "the relative position bias table") + 1) // 2
    if absolute and sd["pos_embed"].shape[1] != grid * grid + 1:
        raise SourceError(
            f"pos_embed has {sd['pos_embed'].shape[1]} positions, the relative position "
            f"bias table fits a {grid}x{grid} grid plus the class token"
        )
    kwargs = dict(
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=table.shape[1],
        mlp_ratio=mlp_ratio(sd, "blocks.0", dim),
        qkv_bias="blocks.0.attn.q_bias" in sd,
        use_abs_pos_emb=absolute,
        use_rel_pos_bias=per_block,
        use_shared_rel_pos_bias=shared,
        init_values=0.1 if "blocks.0.gamma_1" in sd else None,
    )
    if kwargs["mlp_ratio"] == 4.0:
        del kwargs["mlp_ratio"]
    if kwargs["qkv_bias"]:
        del kwargs["qkv_bias"]
    arch, kwargs = name_variant(BEIT_VARIANTS, kwargs, "beit_base_patch16_224")
    return arch, kwargs, grid * patch


def swin_kwargs(sd: dict[str, torch.Tensor]) -> tuple[str, dict, int]:
    """Swin (official or timm key names) -> (timm arch, kwargs, window size).

    Stage i's heads come from its first block's relative position bias table, the window size
    from stage 0's table ((2w-1)^2 rows). Absolute position embeddings (ape) have no place in
    timm's Swin.
    """
    if "absolute_pos_embed" in sd:
        raise SourceError("key 'absolute_pos_embed': Swin with absolute position embeddings")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    stages = count_indexed(sd, r"layers\.(\d+)\.blocks\.0\.norm1\.weight")
    depths = [
        count_indexed(sd, rf"layers\.{i}\.blocks\.(\d+)\.norm1\.weight") for i in range(stages)
    ]
    heads = [
        sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(stages)
    ]
    rows = sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (square_side(rows, "layers.0.blocks.0.attn.relative_position_bias_table") + 1) // 2
    kwargs = dict(
        patch_size=patch,
        window_size=window,
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        mlp_ratio=mlp_ratio(sd, "layers.0.blocks.0", dim),
    )
    if "layers.0.blocks.0.attn.qkv.bias" not in sd:
        kwargs["qkv_bias"] = False
    arch, kwargs = name_variant(SWIN_VARIANTS, kwargs, "swin_tiny_patch4_window7_224")
    return arch, {k: v for k, v in kwargs.items() if SWIN_DEFAULTS.get(k) != v}, window


def swin_image_size(sd: dict, window: int, patch: int) -> int | None:
    """The input size an official Swin was built for, from the shifted-window attention mask of
    stage 0 ([windows, w*w, w*w]); None when the checkpoint holds no such mask."""
    mask = sd.get("layers.0.blocks.1.attn_mask")
    if mask is None:
        return None
    return window * square_side(mask.shape[0], "layers.0.blocks.1.attn_mask") * patch
