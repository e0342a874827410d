"""Pictures of a run: reconstruction grids and loss curves (PNG)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from service.preprocess import Preprocessing, denormalize
from service.reconstruction import masked_input, pixel_mask


def reconstruction_grid(pixels: np.ndarray, mask: np.ndarray, recon: np.ndarray,
                        spec: Preprocessing, patch_size: int, scale: int = 1) -> Image.Image:
    """Rows of original | masked | reconstruction (visible pixels pasted back).

    pixels, recon: float32 [N, C, H, W] normalised; mask: [N, h, w] at the patch grid, 1 = masked.
    """
    rows = []
    for x, m, r in zip(pixels, mask, recon):
        visible = 1.0 - pixel_mask(m, patch_size)[None]               # [1, H, W]
        panels = [x, masked_input(x, m, patch_size), x * visible + r * (1.0 - visible)]
        rows.append(np.concatenate([denormalize(p, spec) for p in panels], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


def loss_curve(metrics_path: Path, out_path: Path) -> None:
    """Plot loss, reconstruction and similarity terms against the step from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "rec", "sim"):
        if any(r.get(key) for r in rows):
            ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
