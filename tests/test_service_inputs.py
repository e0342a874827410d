"""Request images -> model input: small images are decoded on the event loop, the rest on the
pool, with the same result and the same limits; errors name the image; the pixels decoded at
once stay within the process's budget."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_fixtures import png_bytes

from service import inputs
from service.errors import ImageTooLarge, InvalidImage, RequestTimeout
from service.inputs import INLINE_BYTES, INLINE_PIXELS, DecodeBudget, decode_images
from simmim_core.preprocess import Preprocessing, preprocess

SPEC = Preprocessing("RGB", 32, 32, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class CountingPool(ThreadPoolExecutor):
    """A thread pool that records the images handed to it."""

    def __init__(self, threads: int = 2):
        super().__init__(threads)
        self.sources: list = []

    @property
    def submitted(self) -> int:
        return len(self.sources)

    def submit(self, fn, source, /, *args, **kwargs):
        if (
            getattr(fn, "__name__", "") == "open_source"
        ):  # each pooled image: header first, then the decode
            self.sources.append(source)
        return super().submit(fn, source, *args, **kwargs)


def load(
    sources: list, pool: CountingPool, max_pixels: int = 10**8, budget: int = 10**8
) -> list[np.ndarray]:
    async def main():
        deadline = asyncio.get_running_loop().time() + 60
        return await decode_images(
            sources, "images", SPEC, max_pixels, pool, DecodeBudget(budget), deadline
        )

    return asyncio.run(main())


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


class Concurrency:
    """Wraps preprocess_image: records how many pixels are being decoded at once, at most."""

    def __init__(self, inner):
        self.inner, self.lock = inner, threading.Lock()
        self.now = self.most = 0

    def __call__(self, img, *args):
        pixels = img.width * img.height
        with self.lock:
            self.now += pixels
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.01)  # long enough for the others to start, if they were allowed to
            return self.inner(img, *args)
        finally:
            with self.lock:
                self.now -= pixels


def test_the_pixels_decoded_at_once_stay_within_the_budget(monkeypatch):
    images = [png_bytes(i, (200, 150)) for i in range(6)]  # 30,000 pixels each, all pooled
    watch = Concurrency(inputs.preprocess_image)
    monkeypatch.setattr(inputs, "preprocess_image", watch)
    with CountingPool(threads=4) as pool:
        out = load(images, pool, budget=2 * 30_000)
    assert watch.most <= 2 * 30_000  # two at a time at most, though the pool has room for 4
    np.testing.assert_array_equal(np.stack(out), preprocess(images, SPEC))


def test_an_image_larger_than_the_whole_budget_gets_413_naming_it():
    images = [png_bytes(0), png_bytes(1, (300, 200))]
    with CountingPool() as pool, pytest.raises(ImageTooLarge, match=r"images\[1\]: .*60000"):
        load(images, pool, budget=50_000)


def test_an_image_still_waiting_for_the_budget_at_the_deadline_gets_504():
    async def main():
        budget = DecodeBudget(100_000)
        await budget.take(100_000)  # all of it held, by another request's decode
        with CountingPool() as pool:
            deadline = asyncio.get_running_loop().time() + 0.05
            await decode_images(
                [png_bytes(0, (200, 150))], "images", SPEC, 10**8, pool, budget, deadline
            )

    with pytest.raises(RequestTimeout):
        asyncio.run(main())


def test_an_exception_other_than_a_decode_error_is_a_bug_and_propagates(monkeypatch):
    def broken(*args):
        raise ZeroDivisionError("a bug in preprocessing")

    monkeypatch.setattr(inputs, "preprocess_image", broken)
    for image in (png_bytes(0), png_bytes(1, (300, 200))):  # decoded inline, and pooled
        with CountingPool() as pool, pytest.raises(ZeroDivisionError):
            load([image], pool)
