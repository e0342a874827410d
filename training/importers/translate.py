"""Key names from a source's layout to ours.

timm_translate  official / timm names -> ours, through timm's own checkpoint filters
rename          regex rules (Hugging Face names), with q/k/v projections fused into timm's qkv
"""

from __future__ import annotations

import re

import torch

from simmim_core.nn.model import SimMIM

from .source import SourceError

QKV = ("q", "k", "v")


def timm_translate(
    model: SimMIM, body: dict[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encoder weights in official/timm key names -> (ours -> tensor, ours -> source key).

    Goes through timm's checkpoint filter for the encoder's architecture: it drops the buffers
    relative_position_index and attn_mask and moves original Swin's downsample layers (end of a
    stage) to timm's order (start of the next). `prefix` is what the source put before each key.
    """
    from timm.models import beit, swin_transformer, vision_transformer

    if model.cfg.family == "swin":
        net, convert, inner = (
            model.encoder.swin,
            swin_transformer.checkpoint_filter_fn,
            "encoder.swin.",
        )
    else:
        net, inner = model.encoder.vit, "encoder.vit."
        is_beit = isinstance(net, beit.Beit)
        convert = (beit if is_beit else vision_transformer).checkpoint_filter_fn
    source_of = {id(v): prefix + k for k, v in body.items()}  # the filters pass tensors through
    converted = convert(dict(body), net)
    state = {inner + k: v for k, v in converted.items()}
    origin = {inner + k: source_of.get(id(v), prefix + k) for k, v in converted.items()}
    return state, origin


def rename(
    state: dict[str, torch.Tensor], rules: list[tuple[str, str | None]], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename every key by the first rule (regex, replacement) that matches it in full.

    A replacement ending in `.q`, `.k` or `.v` before `.weight`/`.bias` (e.g. `attn.qkv.q.weight`)
    marks one of three projections that are concatenated (q, k, v) into one `attn.qkv.weight`.
    A replacement of None drops the key (a buffer we recompute). A key no rule matches raises
    SourceError naming it. Returns (ours -> tensor, ours -> source).
    """
    out, origin, parts = {}, {}, {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                name = None if replacement is None else re.sub(pattern, replacement, key)
                break
        else:
            raise SourceError(f"{source}: key {key!r} is not one we know how to map")
        if name is None:
            continue
        m = re.fullmatch(r"(.*)\.([qkv])\.(weight|bias)", name)
        if m:
            parts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[m.group(2)] = (value, key)
        else:
            out[name], origin[name] = value, key
    for name, qkv in parts.items():
        lacking = [p for p in QKV if p not in qkv]
        if lacking:
            first = next(iter(qkv.values()))[1]
            raise SourceError(f"{source}: {first!r} comes without its {lacking[0]} projection")
        out[name] = torch.cat([qkv[p][0] for p in QKV])
        origin[name] = qkv["q"][1]
    return out, origin
