"""The one preprocessing function under hostile images: its intermediates stay a few crops in
size whatever the aspect ratio, 16-bit and float images are scaled a strip at a time, only the
documented formats are decoded, and whatever Pillow raises on a corrupt file is a decode error.
Normal images keep the pixels they always had (a whole resize, then the crop)."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from simmim_core import preprocess
from simmim_core.preprocess import (
    FORMATS,
    INTERPOLATIONS,
    MAX_RESIZED,
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    preprocess_image,
    read_header,
    resize_center_crop,
    to_color_mode,
)

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # 512 x 600
GRAY = Preprocessing("L", 32, 32, "bicubic", (0.5,), (0.25,))
RGB = Preprocessing("RGB", 224, 224, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.open(PHOTO).convert(mode).resize(size, Image.Resampling.BILINEAR)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def whole_resize_then_crop(img, resize_size, crop_size, interpolation, reducing_gap):
    """How the crop was always taken: the whole image resized, then its center cut out."""
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_size, round(w * scale)), max(crop_size, round(h * scale))
    resample = INTERPOLATIONS[interpolation]
    img = img.resize((new_w, new_h), resample=resample, reducing_gap=reducing_gap)
    left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
    return img.crop((left, top, left + crop_size, top + crop_size))


SIZES = [(512, 600), (600, 512), (1000, 563), (401, 1203), (63, 17), (2048, 256), (256, 2048)]


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
@pytest.mark.parametrize("reducing_gap", [3.0, None])
@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["gray32", "rgb224"])
def test_aspect_ratios_up_to_eight_to_one_keep_the_pixels_of_a_whole_resize(
    interpolation, reducing_gap, spec
):
    for size in SIZES:
        img = photo(size, spec.color_mode)
        args = (spec.resize_size, spec.crop_size, interpolation, reducing_gap)
        expected = np.asarray(whole_resize_then_crop(img, *args))
        assert np.array_equal(np.asarray(resize_center_crop(img, *args)), expected), size


def test_extreme_aspect_ratios_resample_only_the_crops_region(monkeypatch):
    """A 6.6-megapixel gray PNG of 3,300,000 x 2 (6 KB): its crop is computed without ever
    making an image larger than MAX_RESIZED crops (the whole resize would be 1.7 gigapixels)."""
    data = encode(Image.new("L", (3_300_000, 2), 128), "PNG")
    sizes = []
    resize = Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    pixels = preprocess_image(data, GRAY, max_pixels=40_000_000)
    assert pixels.shape == (1, 32, 32) and np.allclose(pixels, (128 / 255 - 0.5) / 0.25, atol=1e-6)
    assert sizes and all(w * h <= MAX_RESIZED * 32 * 32 for w, h in sizes), sizes


@pytest.mark.parametrize("size", [(2000, 100), (100, 3000), (5000, 60), (30, 900)])
def test_beyond_eight_to_one_the_crop_differs_from_a_whole_resize_by_rounding_only(size):
    img = photo(size, "RGB")
    for interpolation in INTERPOLATIONS:
        args = (32, 32, interpolation, 3.0)
        got = np.asarray(resize_center_crop(img, *args)).astype(int)
        expected = np.asarray(whole_resize_then_crop(img, *args)).astype(int)
        assert np.abs(got - expected).max() <= 2, interpolation  # of 255: Pillow's float32 box


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "CMYK", "I;16", "I", "F", "1"])
@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_large_images_are_converted_a_strip_at_a_time_to_the_same_pixels(
    monkeypatch, mode, color_mode
):
    img = photo((1500, 1100), "RGBA" if mode in ("RGBA", "LA", "PA") else "RGB")
    if mode in ("I;16", "I", "F"):
        gray = np.asarray(img.convert("L"), np.float32)
        img = Image.fromarray(
            {
                "I;16": (gray * 257).astype(np.uint16),
                "I": gray.astype(np.int32) * 300,
                "F": gray * 3.5,
            }[mode]
        )
    else:
        img = img.convert(mode)
    assert img.width * img.height > preprocess.STRIP_PIXELS
    strips = np.asarray(to_color_mode(img, color_mode))
    monkeypatch.setattr(preprocess, "STRIP_PIXELS", 10**12)  # the whole image at once
    assert np.array_equal(strips, np.asarray(to_color_mode(img, color_mode)))


def test_16_bit_images_are_scaled_without_a_float64_copy_of_the_whole_image():
    values = np.tile(np.arange(6000, dtype=np.uint16) * 10, (1000, 1))  # 6 megapixels
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    tracemalloc.start()
    try:
        gray = to_color_mode(img, "L")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < values.size * 8 / 2  # a float64 copy of the whole image would be 48 MB
    expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(gray), expected)


def test_nan_and_infinite_float_pixels_preprocess_to_finite_values():
    values = np.full((40, 40), 100.0, np.float32)
    values[0, :5] = [np.nan, np.inf, -np.inf, 1e30, -7]
    pixels = preprocess_image(encode(Image.fromarray(values), "TIFF"), GRAY)
    assert pixels.shape == (1, 32, 32) and np.isfinite(pixels).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_documented_format_is_decoded(fmt):
    img = photo((64, 48))
    assert preprocess_image(encode(img, fmt), RGB).shape == (3, 224, 224)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICO", "SGI", "QOI", "IM", "DDS"])
def test_formats_beyond_the_documented_ones_are_not_decoded(fmt):
    data = encode(photo((64, 48)), fmt)
    assert Image.open(io.BytesIO(data)).format  # Pillow itself would read it
    with pytest.raises(ImageDecodeError, match="JPEG, PNG, WEBP, BMP, TIFF and GIF are read"):
        preprocess_image(data, RGB)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the corrupt files
@pytest.mark.parametrize(
    "fmt, params",
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("WEBP", {}),
        ("BMP", {}),
    ],
)
def test_every_truncation_or_corruption_of_a_file_decodes_or_raises_the_decode_error(fmt, params):
    data = encode(photo((40, 30)), fmt, **params)
    rng = np.random.default_rng(0)
    variants = [data[:n] for n in range(0, len(data), max(1, len(data) // 60))]
    for _ in range(60):
        corrupt = bytearray(data)
        for i in rng.integers(0, len(data), 4):
            corrupt[i] = int(rng.integers(0, 256))
        variants.append(bytes(corrupt))
    for variant in variants:
        for spec in (GRAY, RGB):
            try:
                pixels = preprocess_image(variant, spec, max_pixels=1_000_000)
            except ImageDecodeError:
                continue
            assert pixels.shape == (spec.channels, spec.crop_size, spec.crop_size)
            assert np.isfinite(pixels).all()


def test_a_mode_pillow_cannot_convert_is_a_decode_error():
    data = encode(Image.new("LAB", (10, 10)), "TIFF")
    with pytest.raises(ImageDecodeError, match="'LAB' cannot be converted"):
        preprocess_image(data, GRAY)


def test_the_header_is_read_without_decoding_and_the_pixel_limit_checked_from_it():
    data = encode(photo((1600, 1200)), "JPEG")
    img = read_header(data, max_pixels=2_000_000, draft=("RGB", 224))
    assert img.size == (400, 300)  # the JPEG draft scale (1/4) that still covers 224
    assert preprocess_image(img, RGB).shape == (3, 224, 224)
    with pytest.raises(ImageTooLargeError, match="1600x1200 = 1920000 pixels"):
        read_header(data, max_pixels=1_000_000)
