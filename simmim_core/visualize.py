"""Pictures of masked image modeling, and the masked loss (numpy + Pillow).

What `/reconstruct` answers and the training grid show: the masked input, the reconstruction
with the visible patches pasted back (paste_visible: SimMIM's loss ignores the decoder's output
there, so it is meaningless to look at), side-by-side panels, and SimMIM's masked L1.

Shapes: pixels, reconstruction float32 [C, H, W] normalised; mask uint8 [h, w] at the encoder's
patch grid (1 = masked), h = H // patch_size.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from .masking import block_mask
from .preprocess import Preprocessing, denormalize

PANEL_MIN = 256  # side-by-side panels are scaled up (nearest) to at least this many pixels
GAP = 4  # pixels of white between panels


def random_mask(card: dict, ratio: float, seed: int | None) -> np.ndarray:
    """SimMIM block mask for one image: uint8 [h, w], ceil(ratio * cells) mask patches set."""
    rng = np.random.default_rng(seed)
    return block_mask(
        rng, 1, card["image_size"], card["mask_patch_size"], card["patch_size"], ratio
    )[0]


def pixel_mask(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """[h, w] patch mask -> float32 [h * patch_size, w * patch_size] pixel mask."""
    return np.kron(mask, np.ones((patch_size, patch_size), np.float32)).astype(np.float32)


def masked_l1(
    pixels: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray, patch_size: int
) -> float:
    """Mean absolute error over masked pixels and channels (SimMIM's loss)."""
    m = pixel_mask(mask, patch_size)[None]  # [1, H, W]
    channels = pixels.shape[0]
    return float((np.abs(reconstruction - pixels) * m).sum() / (m.sum() * channels))


def masked_input(pixels: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """The input with masked patches set to 0, i.e. the dataset mean once denormalised."""
    return pixels * (1.0 - pixel_mask(mask, patch_size))[None]


def paste_visible(
    pixels: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray, patch_size: int
) -> np.ndarray:
    """The reconstruction shown as the training grid shows it: the input's own pixels where the
    model saw them, the model's output where they were masked. [C, H, W] like `pixels`."""
    masked = pixel_mask(mask, patch_size)[None]  # [1, H, W], 1 = masked
    return pixels * (1.0 - masked) + reconstruction * masked


def png(pixels: np.ndarray, spec: Preprocessing) -> bytes:
    """Normalised [C, H, W] -> PNG bytes (L or RGB)."""
    buf = io.BytesIO()
    Image.fromarray(denormalize(pixels, spec)).save(buf, "PNG")
    return buf.getvalue()


def panel_scale(size: int) -> int:
    """How many times a size x size image is scaled up to be at least PANEL_MIN pixels."""
    return max(1, math.ceil(PANEL_MIN / size))


def side_by_side(
    pixels: np.ndarray,
    mask: np.ndarray,
    reconstruction: np.ndarray,
    spec: Preprocessing,
    patch_size: int,
) -> bytes:
    """One PNG: original | masked input | reconstruction (as given: paste_visible() first to show
    it as the training grid does), each scaled by panel_scale(H), GAP white pixels apart:
    (3 * H * s + 2 * GAP) wide, H * s high."""
    channels, height, _ = pixels.shape
    s = panel_scale(height)
    gap_value = (1.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    gap = np.broadcast_to(gap_value[:, None, None], (channels, height * s, GAP))
    panels = [
        p.repeat(s, axis=1).repeat(s, axis=2)
        for p in (pixels, masked_input(pixels, mask, patch_size), reconstruction)
    ]
    return png(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=2), spec)


def reconstruction_grid(
    pixels: np.ndarray,
    mask: np.ndarray,
    recon: np.ndarray,
    spec: Preprocessing,
    patch_size: int,
    scale: int = 1,
) -> Image.Image:
    """Rows of original | masked | reconstruction (visible pixels pasted back).

    pixels, recon: float32 [N, C, H, W] normalised; mask: [N, h, w] at the patch grid, 1 = masked.
    """
    rows = []
    for x, m, r in zip(pixels, mask, recon):
        panels = [x, masked_input(x, m, patch_size), paste_visible(x, m, r, patch_size)]
        rows.append(np.concatenate([denormalize(p, spec) for p in panels], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid
