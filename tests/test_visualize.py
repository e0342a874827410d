"""The pictures of masked image modeling (simmim_core.visualize): what the training grid and
/reconstruct show."""

from __future__ import annotations

import numpy as np

from simmim_core.visualize import paste_visible


def test_paste_visible_keeps_the_inputs_visible_patches_and_the_outputs_masked_ones():
    rng = np.random.default_rng(0)
    pixels, output = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    mask = np.array([[1, 0], [0, 1]], np.uint8)  # patches of 4 x 4 px, 1 = masked
    shown = paste_visible(pixels, mask, output, patch_size=4)
    assert shown.shape == pixels.shape
    np.testing.assert_array_equal(shown[:, :4, :4], output[:, :4, :4])  # masked
    np.testing.assert_array_equal(shown[:, 4:, 4:], output[:, 4:, 4:])
    np.testing.assert_array_equal(shown[:, :4, 4:], pixels[:, :4, 4:])  # visible
    np.testing.assert_array_equal(shown[:, 4:, :4], pixels[:, 4:, :4])
