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

import io
import os
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


def open_image(
    source, max_pixels: int | None = None, draft: tuple[str, int] | None = None
) -> Image.Image:
    """Decode `source` (bytes, a path or a PIL image): first frame, EXIF orientation applied.

    The pixel count is checked from the header before the pixels are decoded, so a
    decompression bomb costs nothing. draft=(mode, size) lets a JPEG decode at a reduced DCT
    scale whose shorter side is still >= size. Raises ImageDecodeError or ImageTooLargeError.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            in_memory = isinstance(source, (bytes, bytearray, memoryview))
            img = Image.open(io.BytesIO(source) if in_memory else os.fspath(source))
        except Image.DecompressionBombError as e:  # Pillow's own limit, also from the header
            raise ImageTooLargeError(str(e)) from None
        except (OSError, ValueError) as e:
            raise ImageDecodeError(f"not a decodable image ({type(e).__name__})") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    try:
        img.seek(0)
        if draft is not None and img.format == "JPEG":
            img.draft(draft[0], (draft[1], draft[1]))
        img.load()
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"image data is corrupt ({type(e).__name__})") from None


def to_color_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """Convert any Pillow mode (palette, RGBA, CMYK, 16-bit, float...) to "L" or "RGB".

    Transparency is composited onto white; 16-bit and 32-bit gray are scaled, not clipped.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == color_mode else img.convert(color_mode)


def resize_center_crop(
    img: Image.Image,
    resize_size: int,
    crop_size: int,
    interpolation: str,
    reducing_gap: float | None = 3.0,
) -> Image.Image:
    """Resize so the shorter side is resize_size, then take the centered crop_size square."""
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_size, round(w * scale)), max(crop_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        resample = INTERPOLATIONS[interpolation]
        # reducing_gap: shrink by an integer factor first; "indistinguishable" at 3.0 (Pillow)
        img = img.resize((new_w, new_h), resample=resample, reducing_gap=reducing_gap)
    left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
    return img.crop((left, top, left + crop_size, top + crop_size))


def preprocess_image(source, spec: Preprocessing, max_pixels: int | None = None) -> np.ndarray:
    """One image (bytes, path or PIL image) -> normalised float32 [C, crop, crop]."""
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
