"""SimMIM losses. Pixels are in normalised space; masks are 1 = masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """mask [N, h, w] at the patch grid -> [N, 1, h*p, w*p] at pixel resolution."""
    m = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return m.unsqueeze(1)


def reconstruction_loss(
    pixels: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, patch_size: int, kind: str = "l1"
) -> torch.Tensor:
    """Mean L1 (or squared error) over masked pixels only.

    pixels, recon: [N, C, H, W]; mask: [N, h, w]. Returns
    sum(err * M) / (sum(M) + 1e-5) / C, as in SimMIM, a scalar.
    """
    m = upsample_mask(mask, patch_size).type_as(recon)
    if kind == "l1":
        err = (pixels - recon).abs()
    elif kind == "mse":
        err = (pixels - recon) ** 2
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose 'l1' or 'mse'")
    return (err * m).sum() / (m.sum() + 1e-5) / pixels.shape[1]


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity of rows. a, b: [N, D]; b is the target (detached here)."""
    return 1.0 - F.cosine_similarity(a, b.detach(), dim=-1).mean()


def perceptual_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 between feature maps of a frozen network. a, b: [N, D, h, w]."""
    return (a - b.detach()).abs().mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of a matches row i of b, other rows are negatives. a, b: [N, D]."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature  # [N, N]
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
