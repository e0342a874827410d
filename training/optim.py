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


def layer_id(name: str, depth: int) -> int:
    """0 for what comes before the first block (patch embedding, tokens, positions), i + 1 for
    block i, depth + 1 for everything after (final norm, head)."""
    parts = name.split(".")
    if "blocks" in parts:
        i = parts.index("blocks")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1]) + 1
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
    return depth + 1


def layer_decay_groups(
    model: torch.nn.Module, weight_decay: float, decay: float, depth: int
) -> list[dict]:
    """Groups per (layer, weight decay); each has `lr_scale` = decay ** (depth + 1 - layer), so
    the head learns at the full rate and early layers slower (BEiT/SimMIM fine-tuning)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, skip = layer_id(name, depth), no_decay(name, p)
        group = groups.setdefault(
            (layer, skip),
            {
                "params": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "lr_scale": decay ** (depth + 1 - layer),
                "layer": layer,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
