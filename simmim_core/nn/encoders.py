"""Encoders from timm with SimMIM masking.

Each encoder exposes the same small contract:
  forward_features(pixels [N, C, H, W], mask [N, h, w] or None) -> tokens [N, D, h', w']
  pool(features [N, D, h', w'], prefix [N, P, D] or None) -> [N, D]
and the attributes `patch_size` (the mask grid cell in pixels), `stride` (total downsampling of
the feature map), `embed_dim` (D), `grid` (h, w of the mask) and `poolings` (what `pool` accepts).

ViT and Swin replace masked patch tokens by one learned `mask_token` after patch embedding,
before position embeddings (`x * (1 - w) + mask_token * w`); CNNs fill masked pixels in input
space (`x * (1 - M) + C * M`, C the dataset mean, i.e. 0 after normalisation, or noise).

The "vit" family takes timm's VisionTransformer (absolute position embeddings) or timm's BEiT
(`beit_*` architectures: relative position bias shared by all blocks or one per block, layer
scale), which is the official SimMIM ViT.
"""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm, trunc_normal_


class ViTEncoder(nn.Module):
    """timm VisionTransformer with a mask token. Mask grid = patch grid; stride = patch size."""

    poolings = ("mean", "cls")

    def __init__(self, arch: str, image_size: int, in_chans: int, **kwargs) -> None:
        super().__init__()
        if "norm_eps" in kwargs:  # JSON-friendly stand-in for norm_layer (HF ViT uses 1e-12)
            kwargs["norm_layer"] = partial(LayerNorm, eps=kwargs.pop("norm_eps"))
        self.vit = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            img_size=image_size,
            in_chans=in_chans,
            global_pool="token",
            **kwargs,
        )
        self.embed_dim = self.vit.num_features
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.stride = self.patch_size
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def masked_patches(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """pixels [N, C, H, W], mask [N, h, w] -> patch tokens [N, h*w, D], masked ones replaced
        by the mask token."""
        x = self.vit.patch_embed(x)  # [N, L, D]
        if mask is None:
            return x
        w = mask.flatten(1).unsqueeze(-1).type_as(x)  # [N, L, 1]
        return x * (1 - w) + self.mask_token.type_as(x) * w

    def embed_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [N, C, H, W], mask [N, h, w] -> tokens entering block 1 [N, P + h*w, D]."""
        x = self.vit._pos_embed(self.masked_patches(x, mask))  # prepends cls
        return self.vit.norm_pre(x)

    def iter_blocks(self, x: torch.Tensor, n: int | None = None):
        """tokens [N, P + h*w, D] -> the tokens after each of the first n blocks (all: None)."""
        for block in self.vit.blocks[:n]:
            x = block(x)
            yield x

    def run_blocks(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """tokens [N, P + h*w, D] through the first n blocks."""
        out = x
        for out in self.iter_blocks(x, n):  # noqa: B007 (the last one is the answer)
            pass
        return out

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, layer: int = 0, norm: bool = True
    ) -> torch.Tensor:
        """-> tokens [N, P + h*w, D] after block `layer` (1..depth; 0: the last), passed
        through the final norm when `norm`."""
        x = self.run_blocks(self.embed_tokens(x, mask), layer or self.depth)
        return self.vit.norm(x) if norm else x

    def to_map(self, tokens: torch.Tensor):
        """tokens [N, P + h*w, D] -> (patch tokens as a map [N, D, h, w], prefix [N, P, D])."""
        P = self.vit.num_prefix_tokens
        N, L, D = tokens.shape
        h, w = self.grid
        fmap = tokens[:, P:].transpose(1, 2).reshape(N, D, h, w)  # NLC -> NCHW
        return fmap, tokens[:, :P]

    def forward_features(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, layer: int = 0, norm: bool = True
    ):
        """-> (patch tokens as a map [N, D, h, w], prefix tokens [N, P, D]) after block `layer`
        (0: the last), through the final norm when `norm`."""
        return self.to_map(self.forward_tokens(x, mask, layer, norm))

    def pool(self, fmap: torch.Tensor, prefix: torch.Tensor | None, pooling: str) -> torch.Tensor:
        if pooling == "cls":
            return prefix[:, 0]
        return fmap.mean(dim=(2, 3))


class BEiTEncoder(ViTEncoder):
    """timm's BEiT-style ViT with a mask token: the official SimMIM ViT.

    Relative position bias shared by all blocks (`use_shared_rel_pos_bias`) or one per block
    (`use_rel_pos_bias`), absolute position embeddings optional (`use_abs_pos_emb`), layer scale
    (`init_values`); the mask token replaces patch tokens before the class token is prepended.
    """

    def embed_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.masked_patches(x, mask)
        x = torch.cat((self.vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.vit.pos_embed is not None:
            x = x + self.vit.pos_embed
        return self.vit.pos_drop(x)

    def iter_blocks(self, x: torch.Tensor, n: int | None = None):
        bias = self.vit.rel_pos_bias() if self.vit.rel_pos_bias is not None else None
        for block in self.vit.blocks[:n]:
            x = block(x, shared_rel_pos_bias=bias)
            yield x


class SwinEncoder(nn.Module):
    """timm SwinTransformer with a mask token after the patch-embed norm. Stride 32 for Swin-B."""

    poolings = ("mean",)

    def __init__(self, arch: str, image_size: int, in_chans: int, **kwargs) -> None:
        super().__init__()
        self.swin = timm.create_model(
            arch, pretrained=False, num_classes=0, img_size=image_size, in_chans=in_chans, **kwargs
        )
        self.embed_dim = self.swin.num_features
        self.patch_size = self.swin.patch_embed.patch_size[0]
        self.stride = self.swin.feature_info[-1]["reduction"]
        self.grid = tuple(self.swin.patch_embed.grid_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.swin.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """pixels [N, C, H, W], mask [N, h, w] -> (map [N, D, H/32, W/32], None)."""
        x = self.swin.patch_embed(x)  # [N, h, w, C0] (NHWC)
        if mask is not None:
            w = mask.unsqueeze(-1).type_as(x)  # [N, h, w, 1]
            x = x * (1 - w) + self.mask_token.type_as(x) * w
        x = self.swin.layers(x)
        x = self.swin.norm(x)  # [N, h', w', D]
        return x.permute(0, 3, 1, 2), None  # NHWC -> NCHW

    def pool(self, fmap: torch.Tensor, prefix: torch.Tensor | None, pooling: str) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))


class CNNEncoder(nn.Module):
    """Any timm CNN; masked pixels are filled with the mean (0 after normalisation) or noise.

    `patch_size` is the mask grid cell in pixels (the CNN has no tokens); noise filling is used
    in training mode only, evaluation fills with the mean so that outputs are deterministic.
    """

    poolings = ("mean",)

    def __init__(
        self,
        arch: str,
        image_size: int,
        in_chans: int,
        patch_size: int = 8,
        fill: str = "mean",
        **kwargs,
    ) -> None:
        super().__init__()
        if fill not in ("mean", "noise"):
            raise ValueError(f"CNN fill must be 'mean' or 'noise', not {fill!r}")
        self.cnn = timm.create_model(
            arch, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans, **kwargs
        )
        self.embed_dim = self.cnn.num_features
        self.patch_size = patch_size
        self.stride = self.cnn.feature_info[-1]["reduction"]
        if image_size % self.stride or image_size % patch_size:
            raise ValueError(
                f"image size {image_size} must divide by the CNN stride "
                f"{self.stride} and the mask cell {patch_size}"
            )
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.fill = fill
        self._freeze_unused(in_chans, image_size)

    def _freeze_unused(self, in_chans: int, image_size: int) -> None:
        """Freeze parameters that forward_features never uses (e.g. ConvNeXt's head norm,
        MobileNetV3's conv_head): they would get no gradient, which DDP refuses."""
        params = [p for p in self.cnn.parameters() if p.requires_grad]
        was_training = self.cnn.training
        self.cnn.eval()  # no BN statistics update, no random drops
        out = self.cnn.forward_features(torch.zeros(1, in_chans, image_size, image_size))
        grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
        self.cnn.train(was_training)
        for p, g in zip(params, grads):
            if g is None:
                p.requires_grad_(False)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """pixels [N, C, H, W], mask [N, h, w] -> (map [N, D, H/stride, W/stride], None)."""
        if mask is not None:
            m = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
            m = m.unsqueeze(1).type_as(x)  # [N, 1, H, W]
            filler = torch.randn_like(x) if (self.fill == "noise" and self.training) else 0.0
            x = x * (1 - m) + filler * m
        return self.cnn.forward_features(x), None

    def pool(self, fmap: torch.Tensor, prefix: torch.Tensor | None, pooling: str) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))


FAMILIES = {"vit": ViTEncoder, "swin": SwinEncoder, "cnn": CNNEncoder}


def create_encoder(family: str, arch: str, image_size: int, in_chans: int, **kwargs) -> nn.Module:
    """Build an encoder of `family` ('vit', 'swin' or 'cnn') from the timm architecture `arch`
    (a 'vit' whose arch is one of timm's beit_* models is a BEiTEncoder)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {sorted(FAMILIES)}")
    if family == "vit" and timm.models.is_model_in_modules(arch, ["beit"]):
        return BEiTEncoder(arch, image_size, in_chans, **kwargs)
    return FAMILIES[family](arch, image_size, in_chans, **kwargs)
