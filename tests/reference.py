"""Reference models no one here wrote, tiny and random, for the import tests.

Hugging Face transformers' ViTForMaskedImageModeling and SwinForMaskedImageModeling, saved with
save_pretrained; and official-format SimMIM checkpoints (microsoft/SimMIM key names and buffers,
`{"model": ..., "config": yacs CfgNode}`) whose numbers come from transformers too: the official
ViT is BEiT-style (shared relative position bias, layer scale, no absolute positions), which is
transformers' BeitModel with a mask token; the official Swin is transformers' Swin. Each
reference answers `forward(pixels, bool_masked_pos) -> (reconstruction, loss)` and
`tokens(pixels) -> (patch tokens [N, L, D] after the final norm, class token [N, D] or None)`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

SIZE, PATCH = 32, 4  # 8 x 8 patch tokens


@dataclass
class Reference:
    source: Path  # what `simmim import` reads
    forward: Callable  # (pixels, bool_masked_pos [N, L]) -> (reconstruction, loss)
    tokens: Callable  # pixels -> (patch tokens [N, L, D], class token [N, D] or None)
    grid: tuple[int, int]  # the mask grid (h, w)


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter, so that no norm is the identity and no bias, mask token or
    relative position table is zero (initial values would hide a mapping mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def masked_l1(pixels, reconstruction, bool_masked_pos, patch: int) -> torch.Tensor:
    """SimMIM's loss (models/simmim.py): L1 over masked pixels / (their count + 1e-5) / C."""
    n, c, h, w = pixels.shape
    m = bool_masked_pos.reshape(n, h // patch, w // patch).float()
    m = m.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
    return ((pixels - reconstruction).abs() * m).sum() / (m.sum() + 1e-5) / c


def hf_vit(folder: Path) -> Reference:
    from transformers import ViTConfig, ViTForMaskedImageModeling

    torch.manual_seed(1)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=PATCH,
        encoder_stride=PATCH,
    )
    model = jitter(ViTForMaskedImageModeling(config), 1)
    model.save_pretrained(folder)

    def tokens(pixels):
        h = model.vit(pixels).last_hidden_state
        return h[:, 1:], h[:, 0]

    return Reference(folder, _outputs(model), _no_grad(tokens), (8, 8))


def hf_swin(folder: Path) -> Reference:
    """Two stages (8 x 8 tokens, then 4 x 4) of two blocks each: the second block of stage 1 uses
    shifted windows; stage 2 fits one window (no shift)."""
    from transformers import SwinConfig, SwinForMaskedImageModeling

    torch.manual_seed(2)
    config = SwinConfig(
        image_size=SIZE,
        patch_size=PATCH,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        encoder_stride=PATCH * 2,
    )
    model = jitter(SwinForMaskedImageModeling(config), 2)
    model.save_pretrained(folder)

    def tokens(pixels):
        return model.swin(pixels).last_hidden_state, None

    return Reference(folder, _outputs(model), _no_grad(tokens), (8, 8))


def _outputs(model):
    @torch.no_grad()
    def forward(pixels, bool_masked_pos):
        out = model(pixels, bool_masked_pos=bool_masked_pos)
        return out.reconstruction, out.loss

    return forward


def _no_grad(fn):
    return torch.no_grad()(fn)


# ---- official microsoft/SimMIM checkpoints -------------------------------------------------


def official_vit(path: Path) -> Reference:
    """The official SimMIM ViT (vision_transformer.py with USE_SHARED_RPB, INIT_VALUES 0.1,
    no APE) as transformers' BeitModel, plus SimMIM's decoder (1x1 conv, PixelShuffle)."""
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(3)
    config = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=PATCH,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        use_mean_pooling=False,
        layer_norm_eps=1e-6,
    )
    beit = jitter(BeitModel(config, add_pooling_layer=False), 3)
    conv = jitter(torch.nn.Conv2d(32, PATCH**2 * 3, 1), 4)
    state = _saved(beit, path.parent / "beit")
    model = {f"encoder.{k}": v for k, v in _beit_to_official(state).items()}
    grid = SIZE // PATCH
    model["encoder.rel_pos_bias.relative_position_index"] = beit_relative_position_index(grid)
    model["decoder.0.weight"], model["decoder.0.bias"] = conv.weight.detach(), conv.bias.detach()
    save_official(path, model, "vit", SIZE)

    @torch.no_grad()
    def forward(pixels, bool_masked_pos):
        h = beit(pixels, bool_masked_pos=bool_masked_pos).last_hidden_state[:, 1:]
        fmap = h.transpose(1, 2).reshape(len(h), -1, grid, grid)
        reconstruction = F.pixel_shuffle(conv(fmap), PATCH)
        return reconstruction, masked_l1(pixels, reconstruction, bool_masked_pos, PATCH)

    def tokens(pixels):
        h = beit(pixels).last_hidden_state
        return h[:, 1:], h[:, 0]

    return Reference(path, forward, _no_grad(tokens), (grid, grid))


def official_swin(path: Path) -> Reference:
    """The official SimMIM Swin (swin_transformer.py) with transformers' Swin numbers; the file
    also holds the buffers the official code saves (relative_position_index, attn_mask)."""
    folder = path.parent / "swin_source"
    hf = hf_swin(folder)
    state = load_file(folder / "model.safetensors")
    model = {}
    for key, value in state.items():
        name = _swin_to_official(key)
        if name.endswith((".q.weight", ".q.bias")):
            base = key.rsplit(".query.", 1)[0]
            suffix = key.rsplit(".", 1)[1]
            parts = [state[f"{base}.{p}.{suffix}"] for p in ("query", "key", "value")]
            model[name.replace(".q.", ".")] = torch.cat(parts)
        elif not name.endswith((".k.weight", ".k.bias", ".v.weight", ".v.bias")):
            model[name] = value
    for stage, (depth, resolution) in enumerate(((2, 8), (2, 4))):
        window = min(4, resolution)
        for block in range(depth):
            prefix = f"encoder.layers.{stage}.blocks.{block}.attn."
            model[prefix + "relative_position_index"] = swin_relative_position_index(window)
            if block % 2 and resolution > window:
                model[prefix.replace("attn.", "attn_mask")] = swin_attn_mask(resolution, window)
    save_official(path, model, "swin", SIZE)
    return Reference(path, hf.forward, hf.tokens, hf.grid)


def _saved(model, folder: Path) -> dict[str, torch.Tensor]:
    """The state dict as save_pretrained writes it (transformers' stable hub key names)."""
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


BEIT_NAMES = {  # transformers' BEiT hub names -> the official SimMIM ViT's (without encoder.)
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
}


def _beit_to_official(state: dict) -> dict:
    out = {
        "cls_token": state["embeddings.cls_token"],
        "mask_token": state["embeddings.mask_token"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "rel_pos_bias.relative_position_bias_table": state[
            "encoder.relative_position_bias.relative_position_bias_table"
        ],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        qkv = [state[f"{layer}attention.attention.{p}.weight"] for p in ("query", "key", "value")]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv)
        for key, value in state.items():
            if (
                not key.startswith(layer)
                or ".attention.attention." in key
                and key.endswith("weight")
            ):
                continue
            rest = key[len(layer) :]
            hf_name = next(n for n in BEIT_NAMES if rest.startswith(n))
            out[f"blocks.{i}.{BEIT_NAMES[hf_name]}{rest[len(hf_name) :]}"] = value
    return out


def _swin_to_official(key: str) -> str:
    name = key.replace("swin.embeddings.patch_embeddings.projection", "encoder.patch_embed.proj")
    name = name.replace("swin.embeddings.norm", "encoder.patch_embed.norm")
    name = name.replace("swin.embeddings.mask_token", "encoder.mask_token")
    name = name.replace("swin.encoder.layers", "encoder.layers").replace(
        "swin.layernorm", "encoder.norm"
    )
    for hf_name, official in (
        ("layernorm_before", "norm1"),
        ("layernorm_after", "norm2"),
        ("attention.self.query", "attn.qkv.q"),
        ("attention.self.key", "attn.qkv.k"),
        ("attention.self.value", "attn.qkv.v"),
        ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
        ("attention.output.dense", "attn.proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ):
        name = name.replace(hf_name, official)
    return name


def beit_relative_position_index(grid: int) -> torch.Tensor:
    """The official RelativePositionBias buffer: [grid^2 + 1, grid^2 + 1] indices into the table,
    whose last three rows are cls-to-token, token-to-cls and cls-to-cls."""
    n = (2 * grid - 1) ** 2 + 3
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = swin_relative_position_index(grid)
    index[0, :], index[:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


def swin_relative_position_index(window: int) -> torch.Tensor:
    """The official WindowAttention buffer: [window^2, window^2] indices into the table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def swin_attn_mask(resolution: int, window: int) -> torch.Tensor:
    """The official shifted-window mask buffer: [windows, window^2, window^2], 0 or -100."""
    shift = window // 2
    region = torch.zeros(resolution, resolution)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        region[h, w] = i
    n = resolution // window
    windows = region.reshape(n, window, n, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def save_official(path: Path, model: dict, kind: str, size: int) -> None:
    """torch.save as main_simmim.py does: the state dict, the yacs config and training state.
    A stand-in yacs module exists only while saving, as on the machine that trained it."""
    cfg_node = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    yacs_config.CfgNode = cfg_node
    sys.modules.update({"yacs": yacs, "yacs.config": yacs_config})
    try:
        config = cfg_node(
            DATA=cfg_node(
                IMG_SIZE=size, INTERPOLATION="bicubic", MASK_PATCH_SIZE=32, MASK_RATIO=0.6
            ),
            MODEL=cfg_node(TYPE=kind),
        )
        torch.save({"model": model, "optimizer": {}, "epoch": 99, "config": config}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


# ---- the official architectures' key names and shapes (no weights) -----------------------


def official_vit_shapes(
    dim=768, depth=12, heads=12, patch=16, grid=14, mlp_ratio=4, in_chans=3
) -> dict[str, tuple[int, ...]]:
    """Every key of an official SimMIM ViT pretraining checkpoint and its shape, as
    models/vision_transformer.py and models/simmim.py build it with configs/vit_base__800ep
    (QKV_BIAS, INIT_VALUES 0.1, USE_SHARED_RPB, no APE, no mean pooling): defaults are ViT-B/16."""
    tokens = grid * grid + 1
    shapes = {
        "encoder.cls_token": (1, 1, dim),
        "encoder.mask_token": (1, 1, dim),
        "encoder.patch_embed.proj.weight": (dim, in_chans, patch, patch),
        "encoder.patch_embed.proj.bias": (dim,),
        "encoder.rel_pos_bias.relative_position_bias_table": ((2 * grid - 1) ** 2 + 3, heads),
        "encoder.rel_pos_bias.relative_position_index": (tokens, tokens),  # a buffer
    }
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        shapes |= {
            b + "gamma_1": (dim,),
            b + "gamma_2": (dim,),
            b + "norm1.weight": (dim,),
            b + "norm1.bias": (dim,),
            b + "attn.q_bias": (dim,),
            b + "attn.v_bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.proj.weight": (dim, dim),
            b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,),
            b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (mlp_ratio * dim, dim),
            b + "mlp.fc1.bias": (mlp_ratio * dim,),
            b + "mlp.fc2.weight": (dim, mlp_ratio * dim),
            b + "mlp.fc2.bias": (dim,),
        }
    shapes |= {
        "encoder.norm.weight": (dim,),
        "encoder.norm.bias": (dim,),
        "decoder.0.weight": (patch**2 * 3, dim, 1, 1),
        "decoder.0.bias": (patch**2 * 3,),
    }
    return shapes


def official_swin_shapes(
    dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=6, patch=4, image=192
) -> dict[str, tuple[int, ...]]:
    """Every key of an official SimMIM Swin pretraining checkpoint and its shape, as
    models/swin_transformer.py and models/simmim.py build it (downsampling at the end of each
    stage but the last; attn_mask buffers in shifted blocks): defaults are Swin-B, window 6,
    192 px (configs/swin_base__100ep)."""
    shapes = {
        "encoder.mask_token": (1, 1, dim),
        "encoder.patch_embed.proj.weight": (dim, 3, patch, patch),
        "encoder.patch_embed.proj.bias": (dim,),
        "encoder.patch_embed.norm.weight": (dim,),
        "encoder.patch_embed.norm.bias": (dim,),
    }
    resolution = image // patch
    for s, (depth, h) in enumerate(zip(depths, heads)):
        width, w = dim * 2**s, min(window, resolution)
        for i in range(depth):
            b = f"encoder.layers.{s}.blocks.{i}."
            shapes |= {
                b + "norm1.weight": (width,),
                b + "norm1.bias": (width,),
                b + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, h),
                b + "attn.relative_position_index": (w * w, w * w),
                b + "attn.qkv.weight": (3 * width, width),
                b + "attn.qkv.bias": (3 * width,),
                b + "attn.proj.weight": (width, width),
                b + "attn.proj.bias": (width,),
                b + "norm2.weight": (width,),
                b + "norm2.bias": (width,),
                b + "mlp.fc1.weight": (4 * width, width),
                b + "mlp.fc1.bias": (4 * width,),
                b + "mlp.fc2.weight": (width, 4 * width),
                b + "mlp.fc2.bias": (width,),
            }
            if i % 2 and resolution > w:
                shapes[b + "attn_mask"] = ((resolution // w) ** 2, w * w, w * w)
        if s < len(depths) - 1:
            d = f"encoder.layers.{s}.downsample."
            shapes |= {
                d + "reduction.weight": (2 * width, 4 * width),
                d + "norm.weight": (4 * width,),
                d + "norm.bias": (4 * width,),
            }
            resolution //= 2
    last = dim * 2 ** (len(depths) - 1)
    stride = patch * 2 ** (len(depths) - 1)
    shapes |= {
        "encoder.norm.weight": (last,),
        "encoder.norm.bias": (last,),
        "decoder.0.weight": (stride**2 * 3, last, 1, 1),
        "decoder.0.bias": (stride**2 * 3,),
    }
    return shapes


def meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of these shapes that hold no memory (device "meta")."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
