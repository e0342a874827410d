"""Tiny models and in-process runs for the core and training tests (seconds on two CPU cores).

Tiny encoders (one per family), each small enough to train a few steps in about a second:
  vit:  timm ViT, dim 32, depth 1, patch 4, at 32 px (8 x 8 tokens, mask cells of 8 px)
  swin: timm Swin, dim 16, depths (1, 1, 1, 1), window 4, at 64 px (stride 32)
  cnn:  timm resnet10t at 64 px, pixel-space masking on a grid of 8 px cells
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import simmim_cli
from simmim_core.nn.model import ModelConfig, SimMIM

# Tiny models run several times faster on one thread than on two (and the CI machine may be
# busy with other work): thread start-up and contention outweigh the arithmetic.
torch.set_num_threads(1)

TINY_ENCODERS = {
    "vit": dict(
        family="vit",
        arch="vit_tiny_patch16_224",
        image_size=32,
        encoder_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
    ),
    "swin": dict(
        family="swin",
        arch="swin_tiny_patch4_window7_224",
        image_size=64,
        encoder_kwargs=dict(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4
        ),
    ),
    "cnn": dict(family="cnn", arch="resnet10t", image_size=64, encoder_kwargs=dict(patch_size=8)),
}


def tiny_config(family: str = "vit", **overrides) -> ModelConfig:
    """A ModelConfig for one of TINY_ENCODERS: 1 channel, mask cells of 8 px, ratio 0.6."""
    return ModelConfig(
        **{**TINY_ENCODERS[family], "in_chans": 1, "mask_patch_size": 8, **overrides}
    )


def tiny_model(family: str = "vit", seed: int = 0, **overrides) -> SimMIM:
    torch.manual_seed(seed)
    return SimMIM(tiny_config(family, **overrides))


def tiny_cli_args(family: str = "vit") -> list[str]:
    """`simmim pretrain` options that select a tiny encoder of `family`."""
    e = TINY_ENCODERS[family]
    return [
        "--family",
        e["family"],
        "--arch",
        e["arch"],
        "--image-size",
        str(e["image_size"]),
        "--in-chans",
        "1",
        "--mask-patch-size",
        "8",
        "--pooling",
        "mean",
        "--encoder-kwargs",
        json.dumps(e["encoder_kwargs"]),
    ]


# Fast and quiet defaults for every test run: synthetic shapes, no workers, a line per step.
RUN_DEFAULTS = [
    "--data",
    "synthetic:64",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--sim-loss",
    "none",
    "--log-every",
    "1",
    "--no-progress",
]


def pretrain(out: Path, *args: str, family: str = "vit") -> int:
    """Run `simmim pretrain` in this process (through the `simmim` entry point)."""
    return simmim_cli.main(
        ["pretrain", "--out", str(out), *tiny_cli_args(family), *RUN_DEFAULTS, *args]
    )


def read_metrics(run: Path) -> list[dict]:
    """The per-step rows of RUN/metrics.jsonl (the final `done` row left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r]
