"""Evaluation sees exactly what the service sees: the same image bytes give the same arrays
through training's evaluation path (a folder dataset) and the service's request path."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.inputs import decode_image
from simmim_core.preprocess import Preprocessing, preprocess_image
from training.data import FolderImages
from training.evaluate import batched_embed

RGB = Preprocessing("RGB", 224, 224, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GRAY = Preprocessing("L", 32, 32, "bicubic", (0.286,), (0.353,))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise: JPEG-compressible, not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def encoded(kind: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if kind == "jpeg_large":
        photo(1600, 1200).save(buf, "JPEG", quality=90)
    elif kind == "jpeg_small":
        photo(40, 30).save(buf, "JPEG", quality=90)
    elif kind == "png":
        photo(300, 200).save(buf, "PNG")
    elif kind == "gif":
        photo(120, 90).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
    elif kind == "jpeg_exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        photo(800, 500).save(buf, "JPEG", quality=90, exif=exif)
    suffix = {"png": ".png", "gif": ".gif"}.get(kind, ".jpg")
    return suffix, buf.getvalue()


KINDS = ["jpeg_large", "jpeg_small", "png", "gif", "jpeg_exif_rotated"]


@pytest.mark.parametrize("spec", [RGB, GRAY], ids=["rgb224", "gray32"])
@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_and_service_give_identical_arrays(tmp_path, kind, spec):
    suffix, data = encoded(kind)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / f"image{suffix}").write_bytes(data)
    source = FolderImages(tmp_path)
    [evaluated] = batched_embed(source, spec, lambda x: x.reshape(len(x), -1), 8, False, "")
    served = decode_image(base64.b64encode(data).decode(), spec, max_pixels=40_000_000)
    assert np.array_equal(evaluated, served.reshape(-1))


def test_exif_orientation_is_applied_before_the_crop():
    _, data = encoded("jpeg_exif_rotated")
    portrait = Preprocessing("RGB", 64, 64, "bilinear", (0, 0, 0), (1, 1, 1))
    upright = Image.open(io.BytesIO(data))
    assert upright.size == (800, 500)  # stored landscape, displayed portrait
    pixels = preprocess_image(data, portrait)
    # the gradient runs along the stored x axis; after a 90 degree turn it runs down the rows
    red = pixels[0]
    assert red[:, 32].std() > 5 * red[32, :].std()


def test_the_speed_only_decoding_choices_are_recorded_in_the_preprocessing():
    recorded = RGB.to_dict()
    assert recorded["jpeg_draft"] is True and recorded["reducing_gap"] == 3.0
    assert Preprocessing.from_dict(recorded) == RGB


def test_jpeg_draft_decoding_changes_pixels_so_it_must_be_recorded():
    _, data = encoded("jpeg_large")
    exact = Preprocessing(
        **{
            **RGB.to_dict(),
            "jpeg_draft": False,
            "reducing_gap": None,
            "mean": RGB.mean,
            "std": RGB.std,
        }
    )
    assert not np.array_equal(preprocess_image(data, RGB), preprocess_image(data, exact))


def test_a_card_without_the_decoding_fields_keeps_the_draft_decoding_it_was_served_with():
    old = {k: v for k, v in RGB.to_dict().items() if k not in ("jpeg_draft", "reducing_gap")}
    assert Preprocessing.from_dict(old) == RGB
