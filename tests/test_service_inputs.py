"""Request images -> model input: small images are decoded on the event loop, the rest on the
pool, with the same result and the same limits; errors name the image."""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_fixtures import png_bytes

from service.errors import ImageTooLarge, InvalidImage
from service.inputs import INLINE_BYTES, INLINE_PIXELS, decode_images
from simmim_core.preprocess import Preprocessing, preprocess

SPEC = Preprocessing("RGB", 32, 32, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class CountingPool(ThreadPoolExecutor):
    """A thread pool that records the images handed to it."""

    def __init__(self):
        super().__init__(2)
        self.sources: list = []

    @property
    def submitted(self) -> int:
        return len(self.sources)

    def submit(self, fn, source, /, *args, **kwargs):
        self.sources.append(source)
        return super().submit(fn, source, *args, **kwargs)


def load(sources: list, pool: CountingPool, max_pixels: int = 10**8) -> list[np.ndarray]:
    return asyncio.run(decode_images(sources, "images", SPEC, max_pixels, pool))


def test_small_images_are_decoded_on_the_event_loop_without_the_pool():
    images = [png_bytes(i, (32, 24)) for i in range(3)]
    with CountingPool() as pool:
        out = load([base64.b64encode(x).decode() for x in images], pool)
    assert pool.submitted == 0
    np.testing.assert_array_equal(np.stack(out), preprocess(images, SPEC))


def test_images_over_the_inline_pixel_limit_are_decoded_on_the_pool_alike():
    big = png_bytes(0, (200, 150))
    assert 200 * 150 > INLINE_PIXELS
    images = [png_bytes(1), big, png_bytes(2)]
    with CountingPool() as pool:
        out = load(images, pool)
    assert pool.submitted == 1
    np.testing.assert_array_equal(np.stack(out), preprocess(images, SPEC))


def test_small_images_beyond_the_request_byte_budget_go_to_the_pool_in_order():
    images = [png_bytes(i) for i in range(40)]
    with CountingPool() as pool:
        out = load(images, pool)
    inline = [x for x in images if x not in pool.sources]
    assert inline and pool.sources and sum(map(len, inline)) <= INLINE_BYTES
    np.testing.assert_array_equal(np.stack(out), preprocess(images, SPEC))


def test_the_pixel_limit_holds_for_small_images_and_names_the_image():
    images = [png_bytes(0), png_bytes(1, (60, 60))]  # 1920 and 3600 pixels
    with CountingPool() as pool, pytest.raises(ImageTooLarge, match=r"images\[1\]: .*3600"):
        load(images, pool, max_pixels=3000)


def test_the_first_bad_image_by_index_is_reported_whether_inline_or_pooled():
    big_corrupt = png_bytes(0, (300, 300))[:-200]  # pooled, and truncated
    images = [png_bytes(1), big_corrupt, b"not an image"]
    with CountingPool() as pool, pytest.raises(InvalidImage, match=r"images\[1\]") as e:
        load(images, pool)
    assert e.value.index == 1
    with CountingPool() as pool, pytest.raises(InvalidImage, match=r"images\[0\]"):
        load([b"not an image", big_corrupt], pool)
