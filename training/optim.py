"""Optimizer parameter groups: no weight decay where SimMIM has none, and layer-wise lr decay."""

from __future__ import annotations

import torch

NO_DECAY_SUFFIXES = ("mask_token", "cls_token", "reg_token", "dist_token", "pos_embed")


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Biases, norms, tokens, position embeddings and relative position bias tables, as SimMIM's
    no_weight_decay() and no_weight_decay_keywords()."""
    return p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) or "relative_position_bias_table" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the rest at weight decay 0."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def layer_id(name: str, depths: list[int]) -> int:
    """0 for what comes before the first block (patch embedding, tokens, positions), k + 1 for
    the k-th block counted over every stage (ViT `blocks.i`; Swin `layers.s.blocks.b`, whose
    downsampling counts with the stage's last block), sum(depths) + 1 for everything after
    (final norm, head). As BEiT's and SimMIM's get_layer_id."""
    parts = name.split(".")
    stage = 0
    if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
        stage = int(parts[parts.index("layers") + 1])
        if "downsample" in parts:
            return sum(depths[: stage + 1])
    if "blocks" in parts and parts[parts.index("blocks") + 1].isdigit():
        return sum(depths[:stage]) + int(parts[parts.index("blocks") + 1]) + 1
    if any(
        k in name
        for k in (
            "patch_embed",
            "cls_token",
            "pos_embed",
            "mask_token",
            "reg_token",
            "rel_pos",
            "relative_position",
        )
    ):
        return 0
    return sum(depths) + 1


def layer_decay_groups(
    model: torch.nn.Module, weight_decay: float, decay: float, depths: list[int]
) -> list[dict]:
    """Groups per (layer, weight decay); each has `lr_scale` = decay ** (last - layer), last =
    sum(depths) + 1, so the head learns at the full rate and early layers slower."""
    last = sum(depths) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, skip = layer_id(name, depths), no_decay(name, p)
        group = groups.setdefault(
            (layer, skip),
            {
                "params": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "lr_scale": decay ** (last - layer),
                "layer": layer,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
