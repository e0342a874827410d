"""Decoders: encoder feature map [N, D, h', w'] -> reconstruction [N, C, h'*s, w'*s]."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block


class LinearDecoder(nn.Module):
    """SimMIM's decoder: a 1x1 convolution to stride^2 * C channels, then PixelShuffle(stride)."""

    def __init__(self, embed_dim: int, stride: int, in_chans: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, stride**2 * in_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(fmap))


class TransformerDecoder(nn.Module):
    """A light transformer decoder: project to `dim`, `depth` ViT blocks, then the linear head."""

    def __init__(
        self,
        embed_dim: int,
        stride: int,
        in_chans: int,
        grid: tuple[int, int],
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = LinearDecoder(dim, stride, in_chans)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        N, D, h, w = fmap.shape
        x = self.embed(fmap.flatten(2).transpose(1, 2)) + self.pos_embed  # NCHW -> NLC
        x = self.norm(self.blocks(x))
        return self.head(x.transpose(1, 2).reshape(N, -1, h, w))  # NLC -> NCHW


def create_decoder(
    kind: str, embed_dim: int, stride: int, in_chans: int, feature_grid: tuple[int, int]
) -> nn.Module:
    """'linear' (SimMIM) or 'transformer' (light, 2 blocks of width 128)."""
    if kind == "linear":
        return LinearDecoder(embed_dim, stride, in_chans)
    if kind == "transformer":
        return TransformerDecoder(embed_dim, stride, in_chans, feature_grid)
    raise ValueError(f"unknown decoder {kind!r}; choose 'linear' or 'transformer'")
