"""The one image-preprocessing implementation (numpy + Pillow, no torch).

Used by training's evaluation, the export parity check, bulk embedding and the service:
decode -> EXIF-orient -> first frame -> color mode -> resize shorter side -> center crop ->
scale to [0, 1] -> normalise with mean/std -> float32 [C, H, W].

The two speed-only decoding choices are part of the recorded preprocessing (model.json), so every
path that reads the card decodes the same bytes to the same pixels: `jpeg_draft` (a JPEG is
decoded at the smallest DCT scale whose shorter side is still >= resize_size) and
`reducing_gap` (Pillow's resize shrinks by an integer factor first when the image is at least
that many times larger than the target).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
COLOR_MODES = {"L": 1, "RGB": 3}
# The formats the project reads (docs/service.md); every other Pillow decoder is left out: each
# is attack surface, and none is documented. A JPEG with several pictures (MPO) opens as JPEG.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_FORMAT_NAMES = ", ".join(FORMATS[:-1]) + " and " + FORMATS[-1]
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Pixel modes those formats decode to, and to_color_mode converts
MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", *HIGH_BIT_MODES, *ALPHA_MODES}
STRIP_PIXELS = 1 << 20  # to_color_mode converts this many pixels at a time
MAX_RESIZED = 8  # resize_center_crop resizes the whole image while it is at most 8 crops
# Files taken as images where a folder is searched (training data, bulk embedding).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (checked from the header, before decoding).

    A kind of ImageDecodeError, so code that skips undecodable files skips these too."""


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared; stored under "preprocessing" in model.json."""

    color_mode: str  # "L" or "RGB"
    resize_size: int  # the shorter side is resized to this many pixels
    crop_size: int  # then a centered crop_size x crop_size square is taken
    interpolation: str  # nearest | bilinear | bicubic | lanczos
    mean: tuple[float, ...]  # per channel, on [0, 1] pixels
    std: tuple[float, ...]
    resize_policy: str = "shorter_side_then_center_crop"
    jpeg_draft: bool = True  # decode JPEGs at a reduced DCT scale (>= resize_size)
    reducing_gap: float | None = 3.0  # Pillow resize(reducing_gap=...); None: exact resampling

    def __post_init__(self) -> None:
        if self.color_mode not in COLOR_MODES:
            raise ValueError(
                f"color_mode must be one of {sorted(COLOR_MODES)}, not {self.color_mode!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {self.interpolation!r}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values for {self.color_mode}")
        if self.resize_policy != "shorter_side_then_center_crop":
            raise ValueError(f"unknown resize_policy {self.resize_policy!r}")

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def read_header(
    source, max_pixels: int | None = None, draft: tuple[str, int] | None = None
) -> Image.Image:
    """Open `source` (bytes, a path or a PIL image) without decoding its pixels: the format
    (one of FORMATS), size and mode come from the header, and the pixel count is checked, so a
    decompression bomb costs nothing. draft=(mode, size) lets a JPEG decode at a reduced DCT
    scale whose shorter side is still >= size (the returned size is then the reduced one).
    Raises ImageDecodeError or ImageTooLargeError."""
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            in_memory = isinstance(source, (bytes, bytearray, memoryview))
            img = Image.open(
                io.BytesIO(source) if in_memory else os.fspath(source), formats=FORMATS
            )
        except Image.DecompressionBombError as e:  # Pillow's own limit, also from the header
            raise ImageTooLargeError(str(e)) from None
        except MemoryError:
            raise
        except Exception as e:  # any failure to parse the header is the file's
            raise ImageDecodeError(
                f"not a decodable image ({type(e).__name__}); {_FORMAT_NAMES} are read"
            ) from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if img.mode not in MODES:
        raise ImageDecodeError(f"pixel mode {img.mode!r} is not supported")
    if draft is not None and img.format == "JPEG":
        with _decoding("image header is corrupt"):
            img.draft(draft[0], (draft[1], draft[1]))
    return img


def open_image(
    source, max_pixels: int | None = None, draft: tuple[str, int] | None = None
) -> Image.Image:
    """Decode `source` (bytes, a path, or a PIL image, read_header's included): first frame,
    EXIF orientation applied. Checks as read_header; raises ImageDecodeError or
    ImageTooLargeError."""
    img = read_header(source, max_pixels, draft)
    with _decoding("image data is corrupt"):
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode not in MODES:  # a later frame, or the decoder, may change it
        raise ImageDecodeError(f"pixel mode {img.mode!r} is not supported")
    return img


@contextlib.contextmanager
def _decoding(what: str) -> Iterator[None]:
    """Pillow reading the file: whatever it raises (but MemoryError) is the file's fault, and
    becomes ImageDecodeError; a DecompressionBombError becomes ImageTooLargeError."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except MemoryError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"{what} ({type(e).__name__})") from None


def to_color_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """Convert any supported Pillow mode (palette, RGBA, CMYK, 16-bit, float...) to "L" or
    "RGB", STRIP_PIXELS at a time (the temporaries stay small whatever the image's size).

    Transparency is composited onto white; 16-bit and 32-bit gray are scaled, not clipped (by
    the image's maximum: 65535 if over 255, else 255), NaN counting as 0. Raises
    ImageDecodeError for a mode Pillow cannot convert (LAB to L, La)."""
    if img.mode == color_mode:
        return img
    top = _gray_top(img)
    width, height = img.size
    rows = max(1, STRIP_PIXELS // width)
    if rows >= height:
        return _convert(img, color_mode, top)
    out = Image.new(color_mode, img.size)
    for y in range(0, height, rows):
        strip = img.crop((0, y, width, min(height, y + rows)))
        out.paste(_convert(strip, color_mode, top), (0, y))
    return out


def _gray_top(img: Image.Image) -> float:
    """The value that maps to 255 for 16- and 32-bit gray (1 for other modes: unused)."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode in ("I", "F"):
        low, high = img.getextrema()
        return 65535.0 if high > 255 else 255.0
    return 1.0


def _convert(img: Image.Image, color_mode: str, top: float) -> Image.Image:
    """to_color_mode for one strip; top: from _gray_top of the whole image."""
    if img.mode in HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64)  # one strip (a new array: in-place from here)
        a /= top
        a *= 255.0
        a += 0.5
        np.nan_to_num(a, copy=False, nan=0.0)
        img = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8), "L")
    try:
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ALPHA_MODES:
            rgba = img if img.mode == "RGBA" else img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img if img.mode == color_mode else img.convert(color_mode)
    except ValueError as e:  # a conversion Pillow does not offer
        raise ImageDecodeError(f"pixel mode {img.mode!r} cannot be converted ({e})") from None


def resize_center_crop(
    img: Image.Image,
    resize_size: int,
    crop_size: int,
    interpolation: str,
    reducing_gap: float | None = 3.0,
) -> Image.Image:
    """Resize so the shorter side is resize_size, then take the centered crop_size square.

    While the resized image would hold at most MAX_RESIZED crops (aspect ratios up to 8:1 when
    resize_size == crop_size) it is made whole and then cropped, as it always was; beyond that
    only the crop's region of the source is resampled (Pillow's box), so that no intermediate
    grows with the aspect ratio. The pixels can then differ from the whole resize by rounding
    (Pillow keeps the box in float32)."""
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_size, round(w * scale)), max(crop_size, round(h * scale))
    left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
    if (new_w, new_h) == (w, h):
        return img.crop((left, top, left + crop_size, top + crop_size))
    resample = INTERPOLATIONS[interpolation]
    # reducing_gap: shrink by an integer factor first; "indistinguishable" at 3.0 (Pillow)
    if new_w * new_h <= MAX_RESIZED * crop_size * crop_size:
        img = img.resize((new_w, new_h), resample=resample, reducing_gap=reducing_gap)
        return img.crop((left, top, left + crop_size, top + crop_size))
    sx, sy = w / new_w, h / new_h  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy)
    return img.resize((crop_size, crop_size), resample, box=box, reducing_gap=reducing_gap)


def preprocess_image(source, spec: Preprocessing, max_pixels: int | None = None) -> np.ndarray:
    """One image (bytes, path or PIL image, read_header's included) -> normalised float32
    [C, crop, crop]. Raises ImageDecodeError (ImageTooLargeError) for what is wrong with the
    image; anything else is a bug."""
    draft = (spec.color_mode, spec.resize_size) if spec.jpeg_draft else None
    img = to_color_mode(open_image(source, max_pixels, draft), spec.color_mode)
    img = resize_center_crop(
        img, spec.resize_size, spec.crop_size, spec.interpolation, spec.reducing_gap
    )
    return normalize(np.asarray(img), spec)


def normalize(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> float32 [C, H, W], (x / 255 - mean) / std."""
    a = pixels.astype(np.float32) * (1.0 / 255.0)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # HWC -> CHW
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (a - mean) / std


def denormalize(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """float32 [C, H, W] normalised -> uint8 [H, W] (L) or [H, W, 3] (RGB) for display."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    a = np.clip((pixels * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def preprocess(sources, spec: Preprocessing, max_pixels: int | None = None) -> np.ndarray:
    """A list of images -> float32 [N, C, crop, crop]."""
    return np.stack([preprocess_image(s, spec, max_pixels) for s in sources])
