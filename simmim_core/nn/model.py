"""The SimMIM module: masked encoder + light decoder + masked-pixel loss (+ optional similarity).

Shapes: pixels [N, C, H, W] normalised; mask [N, h, w] at the encoder's mask grid, 1 = masked.
`forward` returns (loss, parts, recon): parts holds every loss term as a detached float tensor.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoders import create_decoder
from .encoders import create_encoder
from .losses import cosine_loss, info_nce, perceptual_loss, reconstruction_loss, upsample_mask

SIM_LOSSES = ("none", "cosine", "perceptual", "contrastive")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a SimMIM model; saved as a plain dict in checkpoints."""

    family: str = "vit"  # vit | swin | cnn
    arch: str = "vit_tiny_patch16_224"  # a timm architecture name
    image_size: int = 32
    in_chans: int = 1
    encoder_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    mask_patch_size: int = 8
    mask_ratio: float = 0.6
    mask_kind: str = "block"
    decoder: str = "linear"  # linear | transformer
    rec_loss: str = "l1"  # l1 | mse
    sim_loss: str = "none"  # none | cosine | perceptual | contrastive
    sim_lambda: float = 1.0
    temperature: float = 0.2  # InfoNCE tau
    proj_dim: int = 128  # contrastive projection head output
    ema_momentum: float = 0.996  # perceptual: EMA encoder as the frozen network
    pooling: str = "mean"  # mean | cls | gridK (K x K average grid)
    feature_layer: int = 0  # ViT: embed the tokens after this block (0: last)
    feature_norm: bool = True  # ViT: pass them through the final norm

    def to_dict(self) -> dict:
        return asdict(self)


def grid_size(pooling: str) -> int | None:
    """K for 'gridK' pooling, else None."""
    if pooling.startswith("grid") and pooling[4:].isdigit() and int(pooling[4:]) > 0:
        return int(pooling[4:])
    return None


class SimMIM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.sim_loss not in SIM_LOSSES:
            raise ValueError(
                f"unknown similarity loss {cfg.sim_loss!r}; choose one of {SIM_LOSSES}"
            )
        self.cfg = cfg
        self.encoder = create_encoder(
            cfg.family, cfg.arch, cfg.image_size, cfg.in_chans, **cfg.encoder_kwargs
        )
        feature_size = cfg.image_size // self.encoder.stride
        self.grid_pool = grid_size(cfg.pooling)
        if self.grid_pool is None and cfg.pooling not in self.encoder.poolings:
            raise ValueError(
                f"pooling {cfg.pooling!r} is not available for {cfg.arch}; "
                f"choose one of {self.encoder.poolings} or gridK"
            )
        if self.grid_pool is not None and feature_size % self.grid_pool:
            raise ValueError(
                f"pooling {cfg.pooling!r} needs a feature map divisible by "
                f"{self.grid_pool}; {cfg.arch} gives {feature_size}x{feature_size} "
                "(choose another --pooling, e.g. mean)"
            )
        if (cfg.feature_layer or not cfg.feature_norm) and cfg.family != "vit":
            raise ValueError(
                "feature_layer and feature_norm choose ViT blocks; "
                f"{cfg.family} encoders embed their last stage"
            )
        if cfg.family == "vit" and not 0 <= cfg.feature_layer <= self.encoder.depth:
            raise ValueError(
                f"feature_layer {cfg.feature_layer} is outside 0..{self.encoder.depth} "
                f"(the blocks of {cfg.arch}; 0 means the last)"
            )
        if cfg.mask_patch_size % self.encoder.patch_size:
            raise ValueError(
                f"mask_patch_size {cfg.mask_patch_size} is not divisible by the "
                f"model's patch size {self.encoder.patch_size}"
            )
        self.decoder = create_decoder(
            cfg.decoder,
            self.encoder.embed_dim,
            self.encoder.stride,
            cfg.in_chans,
            (feature_size, feature_size),
        )
        self.proj = None
        if cfg.sim_loss == "contrastive":
            D = self.embedding_dim
            self.proj = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.proj_dim))
        self.ema_encoder = None
        if cfg.sim_loss == "perceptual":
            self.ema_encoder = copy.deepcopy(self.encoder).requires_grad_(False)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def embed_dim(self) -> int:
        """Width D of the encoder's tokens."""
        return self.encoder.embed_dim

    @property
    def embedding_dim(self) -> int:
        """Size of `embed`'s output: D, or D * K * K for gridK pooling."""
        return self.embed_dim * (self.grid_pool or 1) ** 2

    def features(self, pixels: torch.Tensor):
        """pixels [N, C, H, W] -> (map [N, D, h, w], prefix tokens) that `embed` pools: after
        block feature_layer, through the final norm if feature_norm (ViT); else the last stage."""
        if self.cfg.family == "vit":
            return self.encoder.forward_features(
                pixels, None, self.cfg.feature_layer, self.cfg.feature_norm
            )
        return self.encoder.forward_features(pixels)

    def pool(
        self, fmap: torch.Tensor, prefix: torch.Tensor | None, pooling: str | None = None
    ) -> torch.Tensor:
        """map [N, D, h, w] -> [N, D'] by `pooling` (default: the configured one).

        mean: average of the patch tokens; cls: the class token; gridK: the map average-pooled
        to K x K cells and flattened (keeps where things are).
        """
        pooling = pooling or self.cfg.pooling
        k = grid_size(pooling)
        if k is not None:
            return F.adaptive_avg_pool2d(fmap, k).flatten(1)
        return self.encoder.pool(fmap, prefix, pooling)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, H, W] -> pooled embedding [N, embedding_dim] (not normalised)."""
        return self.pool(*self.features(pixels))

    def reconstruct(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, H, W], mask [N, h, w] -> reconstruction [N, C, H, W] (normalised)."""
        fmap, _ = self.encoder.forward_features(pixels, mask)
        return self.decoder(fmap)

    def forward(
        self, pixels: torch.Tensor, mask: torch.Tensor, target_pixels: torch.Tensor | None = None
    ):
        """-> (loss, parts {'rec', 'sim', 'loss'}, recon [N, C, H, W]).

        target_pixels: the view whose pooled features the reconstruction's features are compared
        with by the cosine and contrastive terms (a second augmentation; `pixels` if None).
        """
        recon = self.reconstruct(pixels, mask)
        rec = reconstruction_loss(pixels, recon, mask, self.patch_size, self.cfg.rec_loss)
        sim = self.similarity_loss(
            pixels, recon, mask, pixels if target_pixels is None else target_pixels
        )
        loss = rec + self.cfg.sim_lambda * sim
        parts = {"loss": loss.detach(), "rec": rec.detach(), "sim": sim.detach()}
        return loss, parts, recon

    def similarity_loss(self, pixels, recon, mask, target_pixels) -> torch.Tensor:
        """L_sim between the reconstruction (visible pixels pasted back) and the original."""
        if self.cfg.sim_loss == "none":
            return recon.new_zeros(())
        m = upsample_mask(mask, self.patch_size).type_as(recon)
        composite = pixels * (1 - m) + recon * m  # [N, C, H, W]
        if self.cfg.sim_loss == "perceptual":
            self.ema_encoder.eval()
            rec_map, _ = self.ema_encoder.forward_features(composite)
            with torch.no_grad():
                tgt_map, _ = self.ema_encoder.forward_features(pixels)
            return perceptual_loss(rec_map, tgt_map)
        z_rec = self.embed(composite)
        if self.cfg.sim_loss == "cosine":
            with torch.no_grad():
                z_tgt = self.embed(target_pixels)
            return cosine_loss(z_rec, z_tgt)
        z_tgt = self.embed(target_pixels)
        return info_nce(self.proj(z_rec), self.proj(z_tgt), self.cfg.temperature)

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA encoder <- m * EMA + (1 - m) * encoder (perceptual loss only)."""
        if self.ema_encoder is None:
            return
        m = self.cfg.ema_momentum
        for e, p in zip(self.ema_encoder.parameters(), self.encoder.parameters()):
            e.mul_(m).add_(p.detach(), alpha=1 - m)
        for e, b in zip(self.ema_encoder.buffers(), self.encoder.buffers()):
            e.copy_(b)
