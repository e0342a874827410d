"""Coverage-guided fuzzing (atheris, libFuzzer) of the one decode path,
simmim_core.preprocess.preprocess_image, as the service calls it on request bytes.

Property: every input either gives the model's tensor (float32 [C, crop, crop], finite) or
raises ImageDecodeError (ImageTooLargeError included), for a gray and a color preprocessing;
anything else (another exception, a crash) is a finding. libFuzzer bounds each input's time
(-timeout, seconds) and the process's memory (-rss_limit_mb); MAX_PIXELS keeps a legitimate
input's decode small, so the bound is about the decoder, not the image.

usage: python tests/fuzz_preprocess.py [CORPUS_DIR] [libFuzzer options...]
  e.g. python tests/fuzz_preprocess.py /tmp/corpus -max_total_time=3600 -timeout=10 \\
           -rss_limit_mb=2048            (an hour; findings are written as crash-* files)

The corpus folder (default: a new temporary one) is seeded with small PNG, JPEG, GIF, TIFF,
WebP and BMP files in many modes (gray, palette, alpha, 16-bit, float, CMYK, EXIF-rotated,
animated); libFuzzer mutates them and keeps the inputs that reach new code in Pillow's Python
plugins and in simmim_core.preprocess (both instrumented).
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from PIL import Image

    Image.init()  # import every format plugin now, so that they are instrumented too
    from simmim_core.preprocess import ImageDecodeError, Preprocessing, preprocess_image

SPECS = (
    Preprocessing("L", 32, 32, "bicubic", (0.5,), (0.25,)),
    Preprocessing("RGB", 40, 32, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
)
MAX_PIXELS = 1_000_000


def seeds() -> dict[str, bytes]:
    """Small images of every documented format, in the modes they come in."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
    gray = rgb.convert("L")
    out: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **params) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **params)
        out[name] = buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    save("rgb.jpg", rgb, "JPEG", quality=80)
    save("gray.jpg", gray, "JPEG")
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("exif.jpg", rgb, "JPEG", exif=exif)
    save("progressive.jpg", rgb, "JPEG", progressive=True)
    save("rgb.png", rgb, "PNG")
    save("rgba.png", rgb.convert("RGBA"), "PNG")
    save("la.png", gray.convert("LA"), "PNG")
    save("palette.png", rgb.convert("P"), "PNG", transparency=0)
    save("bits.png", gray.convert("1"), "PNG")
    save("16bit.png", Image.fromarray(np.asarray(gray, np.uint16) * 257), "PNG")
    save("interlaced.png", rgb, "PNG", interlace=1)
    save("still.gif", rgb.convert("P"), "GIF")
    frames = [rgb.convert("P"), gray.convert("P")]
    save("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    save("rgb.tif", rgb, "TIFF", compression="tiff_lzw")
    save("float.tif", Image.fromarray(np.asarray(gray, np.float32) * 3.5), "TIFF")
    save("16bit.tif", Image.fromarray(np.asarray(gray, np.uint16) * 300), "TIFF")
    save("cmyk.tif", rgb.convert("CMYK"), "TIFF", compression="packbits")
    save("lossy.webp", rgb, "WEBP", quality=50)
    save("alpha.webp", rgb.convert("RGBA"), "WEBP", lossless=True)
    save("rgb.bmp", rgb, "BMP")
    save("palette.bmp", rgb.convert("P"), "BMP")
    return out


def test_one_input(data: bytes) -> None:
    for spec in SPECS:
        try:
            pixels = preprocess_image(data, spec, MAX_PIXELS)
        except ImageDecodeError:
            continue
        expected = (spec.channels, spec.crop_size, spec.crop_size)
        if pixels.shape != expected or pixels.dtype != np.float32:
            raise AssertionError(f"got {pixels.dtype} {pixels.shape}, expected {expected}")
        if not np.isfinite(pixels).all():
            raise AssertionError("non-finite pixels")


def main(argv: list[str]) -> None:
    corpus = Path(argv[1]) if len(argv) > 1 and not argv[1].startswith("-") else None
    options = argv[2:] if corpus else argv[1:]
    if corpus is None:
        corpus = Path(tempfile.mkdtemp(prefix="simmim-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (corpus / name).write_bytes(data)
    warnings.simplefilter("ignore")  # Pillow warns about the corrupt files it reads
    atheris.Setup([argv[0], str(corpus), *options], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
