"""Mask generators for masked image modeling (numpy only, so the service can use them too).

Every generator returns `mask: uint8 [N, h, w]` at the encoder's patch grid, 1 = masked,
0 = visible, with h = w = input_size // model_patch_size. Generators are seeded through the
`numpy.random.Generator` passed in, so a mask is reproducible from (seed, arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK_KINDS = ("block", "square", "stripes", "hierarchical")


def check_sizes(input_size: int, mask_patch_size: int, model_patch_size: int) -> None:
    """Raise ValueError naming the numbers unless input % mask_patch == 0 and
    mask_patch % model_patch == 0."""
    sizes = {
        "input size": input_size,
        "mask_patch_size": mask_patch_size,
        "model patch size": model_patch_size,
    }
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be a positive number of pixels, not {value}")
    if input_size % mask_patch_size:
        raise ValueError(
            f"input size {input_size} is not divisible by mask_patch_size {mask_patch_size}"
        )
    if mask_patch_size % model_patch_size:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} is not divisible by the model's patch size "
            f"{model_patch_size}"
        )


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio} is outside [0, 1]")


def _expand(cells: np.ndarray, scale: int) -> np.ndarray:
    """[N, r, r] mask-patch cells -> [N, r*scale, r*scale] model-patch grid."""
    return cells.repeat(scale, axis=1).repeat(scale, axis=2)


def block_mask(
    rng: np.random.Generator,
    n: int,
    input_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    ratio: float,
) -> np.ndarray:
    """SimMIM's random block masking: exactly ceil(ratio * r*r) of the r x r mask patches.

    r = input_size // mask_patch_size; the cells are chosen uniformly without replacement per
    image. Returns uint8 [n, h, w] at the model-patch grid.
    """
    check_sizes(input_size, mask_patch_size, model_patch_size)
    check_ratio(ratio)
    r = input_size // mask_patch_size
    count = math.ceil(ratio * r * r)
    order = np.argsort(rng.random((n, r * r)), axis=1)[:, :count]  # [n, count] cell indices
    cells = np.zeros((n, r * r), dtype=np.uint8)
    np.put_along_axis(cells, order, 1, axis=1)
    return _expand(cells.reshape(n, r, r), mask_patch_size // model_patch_size)


def square_mask(
    rng: np.random.Generator,
    n: int,
    input_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    ratio: float,
) -> np.ndarray:
    """One contiguous k x k square of mask patches per image, k = round(sqrt(ratio) * r), >= 1."""
    check_sizes(input_size, mask_patch_size, model_patch_size)
    r = input_size // mask_patch_size
    k = min(r, max(1, round(math.sqrt(ratio) * r)))
    top = rng.integers(0, r - k + 1, size=n)
    left = rng.integers(0, r - k + 1, size=n)
    idx = np.arange(r)
    rows = (idx[None, :] >= top[:, None]) & (idx[None, :] < top[:, None] + k)  # [n, r]
    cols = (idx[None, :] >= left[:, None]) & (idx[None, :] < left[:, None] + k)  # [n, r]
    cells = (rows[:, :, None] & cols[:, None, :]).astype(np.uint8)
    return _expand(cells, mask_patch_size // model_patch_size)


def stripes_mask(
    rng: np.random.Generator,
    n: int,
    input_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    ratio: float,
) -> np.ndarray:
    """k = ceil(ratio * r) full rows of mask patches, or full columns (a coin flip per image)."""
    check_sizes(input_size, mask_patch_size, model_patch_size)
    r = input_size // mask_patch_size
    k = math.ceil(ratio * r)
    chosen = np.argsort(rng.random((n, r)), axis=1)[:, :k]
    lines = np.zeros((n, r), dtype=np.uint8)
    np.put_along_axis(lines, chosen, 1, axis=1)
    cells = np.repeat(lines[:, :, None], r, axis=2)  # rows masked
    columns = rng.random(n) < 0.5
    cells[columns] = cells[columns].transpose(0, 2, 1)  # columns masked
    return _expand(cells, mask_patch_size // model_patch_size)


def hierarchical_mask(
    rng: np.random.Generator,
    n: int,
    input_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    ratio: float,
    levels: int = 3,
) -> np.ndarray:
    """Mask patches of several sizes at once: mask_patch_size * 2**j for j = levels-1 .. 0.

    Exactly ceil(ratio * r*r) cells of the finest (mask_patch_size) grid end up masked: each
    coarser level masks whole free blocks for about an equal share of that budget, and the finest
    level fills the remainder. Coarse sizes that do not divide input_size are skipped.
    """
    check_sizes(input_size, mask_patch_size, model_patch_size)
    r = input_size // mask_patch_size
    target = math.ceil(ratio * r * r)
    factors = [2**j for j in range(levels - 1, 0, -1) if r % (2**j) == 0]  # coarse -> fine
    share = target // (len(factors) + 1)
    cells = np.zeros((n, r, r), dtype=np.uint8)
    for i in range(n):
        c = cells[i]
        for f in factors:
            free = c.reshape(r // f, f, r // f, f).sum(axis=(1, 3)) == 0  # [r/f, r/f]
            candidates = np.flatnonzero(free)
            rng.shuffle(candidates)
            take = min(len(candidates), share // (f * f))
            for cell in candidates[:take]:
                y, x = divmod(int(cell), r // f)
                c[y * f : (y + 1) * f, x * f : (x + 1) * f] = 1
        remaining = target - int(c.sum())
        free = np.flatnonzero(c.ravel() == 0)
        c.ravel()[rng.choice(free, size=remaining, replace=False)] = 1
    return _expand(cells, mask_patch_size // model_patch_size)


_GENERATORS = {
    "block": block_mask,
    "square": square_mask,
    "stripes": stripes_mask,
    "hierarchical": hierarchical_mask,
}


@dataclass(frozen=True)
class MaskGenerator:
    """A configured mask generator; call it with a Generator and a batch size."""

    input_size: int
    mask_patch_size: int
    model_patch_size: int
    ratio: float = 0.6
    kind: str = "block"

    def __post_init__(self) -> None:
        if self.kind not in _GENERATORS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {MASK_KINDS}")
        check_sizes(self.input_size, self.mask_patch_size, self.model_patch_size)
        check_ratio(self.ratio)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _GENERATORS[self.kind](
            rng, n, self.input_size, self.mask_patch_size, self.model_patch_size, self.ratio
        )
