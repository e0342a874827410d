"""Mask generators: what each one masks, at which grid, and how reproducibly.

Every generator returns uint8 [N, h, w] at the encoder's patch grid (1 = masked) and is built
from r x r mask patches, r = input_size // mask_patch_size, each expanded to
s x s tokens, s = mask_patch_size // model_patch_size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from simmim_core.masking import (
    MASK_KINDS,
    MaskGenerator,
    block_mask,
    check_sizes,
    hierarchical_mask,
    square_mask,
    stripes_mask,
)


def cells_of(mask: np.ndarray, scale: int) -> np.ndarray:
    """[N, r*s, r*s] token mask -> [N, r, r] mask-patch cells; asserts each cell is constant."""
    N, h, w = mask.shape
    blocks = mask.reshape(N, h // scale, scale, w // scale, scale)
    assert (blocks == blocks[:, :, :1, :, :1]).all(), "a mask patch is partly masked"
    return blocks[:, :, 0, :, 0]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_generator_returns_uint8_zeros_and_ones_at_the_model_patch_grid(kind):
    mask = MaskGenerator(64, 16, 4, 0.6, kind)(np.random.default_rng(0), 5)
    assert mask.shape == (5, 16, 16)
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_generator_masks_whole_mask_patches_aligned_to_the_mask_grid(kind):
    # 96 px, mask patch 16, model patch 4: 6 x 6 cells of 4 x 4 tokens each
    mask = MaskGenerator(96, 16, 4, 0.6, kind)(np.random.default_rng(1), 20)
    cells = cells_of(mask, 4)
    assert cells.shape == (20, 6, 6)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_generator_is_reproducible_from_its_seed(kind):
    gen = MaskGenerator(64, 8, 4, 0.6, kind)
    a = gen(np.random.default_rng(7), 8)
    b = gen(np.random.default_rng(7), 8)
    c = gen(np.random.default_rng(8), 8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_generator_draws_a_different_mask_per_image(kind):
    mask = MaskGenerator(64, 8, 4, 0.6, kind)(np.random.default_rng(0), 16)
    assert len({m.tobytes() for m in mask}) > 1


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.6, 0.75, 1.0])
def test_block_mask_masks_exactly_ceil_ratio_times_the_mask_patches(ratio):
    # 7 x 7 = 49 mask patches of 2 x 2 tokens
    mask = block_mask(np.random.default_rng(0), 10, 224, 32, 16, ratio)
    cells = cells_of(mask, 2)
    assert (cells.reshape(10, -1).sum(1) == math.ceil(ratio * 49)).all()
    assert (mask.reshape(10, -1).sum(1) == math.ceil(ratio * 49) * 4).all()


def test_block_mask_ratio_zero_masks_nothing():
    assert block_mask(np.random.default_rng(0), 3, 64, 16, 4, 0.0).sum() == 0


def test_block_mask_chooses_every_mask_patch_about_equally_often():
    # uniform without replacement: each of the 36 cells is masked with probability 22/36
    mask = block_mask(np.random.default_rng(0), 4000, 192, 32, 32, 0.6)  # [4000, 6, 6]
    freq = mask.mean(0)
    assert np.abs(freq - 22 / 36).max() < 0.04


def test_paper_swin_192_masks_22_of_36_blocks_on_a_48x48_token_grid():
    gen = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, ratio=0.6)
    mask = gen(np.random.default_rng(0), 4)
    assert mask.shape == (4, 48, 48)
    cells = cells_of(mask, 8)
    assert cells.shape == (4, 6, 6)
    assert (cells.reshape(4, -1).sum(1) == 22).all()
    assert (mask.reshape(4, -1).sum(1) == 22 * 64).all()


def test_paper_vit16_224_masks_30_of_49_blocks_on_a_14x14_token_grid():
    gen = MaskGenerator(input_size=224, mask_patch_size=32, model_patch_size=16, ratio=0.6)
    mask = gen(np.random.default_rng(0), 4)
    assert mask.shape == (4, 14, 14)
    cells = cells_of(mask, 2)
    assert cells.shape == (4, 7, 7)
    assert (cells.reshape(4, -1).sum(1) == 30).all()


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.9])
def test_square_mask_is_one_contiguous_k_by_k_square_of_mask_patches(ratio):
    r = 8
    k = min(r, max(1, round(math.sqrt(ratio) * r)))
    cells = cells_of(square_mask(np.random.default_rng(0), 30, 64, 8, 4, ratio), 2)
    for c in cells:
        rows, cols = np.flatnonzero(c.any(1)), np.flatnonzero(c.any(0))
        assert c.sum() == k * k
        assert len(rows) == len(cols) == k
        assert rows[-1] - rows[0] == cols[-1] - cols[0] == k - 1  # contiguous
        assert c[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # filled


def test_square_mask_places_the_square_anywhere_on_the_grid():
    cells = cells_of(square_mask(np.random.default_rng(0), 200, 64, 8, 8, 0.25), 1)
    tops = {int(np.flatnonzero(c.any(1))[0]) for c in cells}
    lefts = {int(np.flatnonzero(c.any(0))[0]) for c in cells}
    assert tops == lefts == set(range(8 - 4 + 1))


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.6, 1.0])
def test_stripes_mask_masks_ceil_ratio_r_full_rows_or_full_columns(ratio):
    r = 8
    k = math.ceil(ratio * r)
    cells = cells_of(stripes_mask(np.random.default_rng(0), 50, 64, 8, 4, ratio), 2)
    orientations = set()
    for c in cells:
        assert c.sum() == k * r
        full_rows = (c.all(1) | ~c.any(1)).all()  # every row all masked or all visible
        full_cols = (c.all(0) | ~c.any(0)).all()
        assert full_rows or full_cols
        orientations.add("rows" if full_rows else "columns")
    if ratio < 1.0:
        assert orientations == {"rows", "columns"}


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.75])
def test_hierarchical_mask_masks_exactly_ceil_ratio_times_the_mask_patches(ratio):
    cells = cells_of(hierarchical_mask(np.random.default_rng(0), 10, 256, 16, 8, ratio), 2)
    assert (cells.reshape(10, -1).sum(1) == math.ceil(ratio * 256)).all()


def test_hierarchical_mask_contains_coarse_blocks_of_several_mask_patches():
    # r = 16, levels 3: blocks of 4 x 4 and 2 x 2 mask patches, then single ones
    cells = cells_of(hierarchical_mask(np.random.default_rng(0), 10, 256, 16, 16, 0.6), 1)
    for c in cells:
        full4 = c.reshape(4, 4, 4, 4).all(axis=(1, 3))  # aligned 4 x 4 blocks fully masked
        assert full4.any()


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_a_mask_patch_equal_to_the_model_patch_gives_a_per_token_mask(kind):
    mask = MaskGenerator(32, 4, 4, 0.5, kind)(np.random.default_rng(0), 2)
    assert mask.shape == (2, 8, 8)


@pytest.mark.parametrize(
    "sizes, numbers",
    [
        ((225, 32, 4), ("225", "32")),  # input not divisible by the mask patch
        ((192, 32, 5), ("32", "5")),  # mask patch not divisible by the model patch
        ((224, 48, 16), ("224", "48")),
    ],
)
def test_invalid_sizes_raise_value_error_naming_the_numbers(sizes, numbers):
    with pytest.raises(ValueError) as err:
        check_sizes(*sizes)
    for n in numbers:
        assert n in str(err.value)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_generator_rejects_invalid_sizes(kind):
    with pytest.raises(ValueError, match="225"):
        MaskGenerator(225, 32, 4, 0.6, kind)
    with pytest.raises(ValueError, match="12"):
        MaskGenerator(192, 32, 12, 0.6, kind)


@pytest.mark.parametrize("sizes", [(0, 32, 4), (192, 0, 4), (192, 32, 0), (-192, 32, 4)])
def test_non_positive_sizes_raise_value_error_not_zero_division(sizes):
    with pytest.raises(ValueError, match=str(min(sizes))):
        check_sizes(*sizes)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_every_generator_rejects_a_ratio_outside_0_1(kind, ratio):
    with pytest.raises(ValueError, match=str(ratio)):
        MaskGenerator(64, 8, 4, ratio, kind)


def test_unknown_mask_kind_raises_value_error_listing_the_kinds():
    with pytest.raises(ValueError, match="block"):
        MaskGenerator(64, 8, 4, 0.6, "checkerboard")
