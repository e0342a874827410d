"""The served model is the model directory's: a real `simmim serve` of the tiny model exported
by our exporter (onnxruntime, two server processes) against onnxruntime run here on the same
preprocessed pixels. The rest of the HTTP API is specified in test_service_api.py, on the dummy
backend."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image
from service_fixtures import Reference, ServerProcess, png_bytes, unit

from simmim_core.preprocess import denormalize
from simmim_core.visualize import PANEL_MIN

SETTINGS = {"SIMMIM_MAX_IMAGES": "8", "SIMMIM_MAX_BATCH_SIZE": "8", "SIMMIM_MAX_WAIT_MS": "1"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        tiny_model_dir, tmp_path_factory.mktemp("model"), env=SETTINGS, processes=2
    ) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    return Reference(tiny_model_dir)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embed(server, images: list[bytes], **options) -> np.ndarray:
    r = server.http.post("/embed", json={"images": [b64(i) for i in images], **options})
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"], np.float32)


def test_info_names_onnxruntime_on_the_cpu_and_the_encoder_file(server):
    backend = server.http.get("/info").json()["backend"]
    assert backend["runtime"].startswith("onnxruntime ")
    assert backend["providers"] == ["CPUExecutionProvider"]
    assert backend["encoder_file"] == "encoder.onnx"


def test_embed_equals_onnxruntime_on_the_same_preprocessed_pixels(server, ref):
    images = [png_bytes(i) for i in range(5)]
    r = server.http.post("/embed", json={"images": [b64(i) for i in images], "normalize": False})
    body = r.json()
    assert body["model"] == ref.model.name and body["dim"] == ref.model.card["embedding_dim"]
    np.testing.assert_allclose(
        np.array(body["embeddings"], np.float32), ref.embed(images), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(embed(server, images), unit(ref.embed(images)), atol=1e-5, rtol=0)


def test_batched_results_equal_single_results(server):
    images = [png_bytes(i) for i in range(8)]
    batches_of_8 = server.batches_of_size("embed", 4, 8)
    together = embed(server, images, normalize=False)  # one batch of 8
    assert server.batches_of_size("embed", 4, 8) == batches_of_8 + 1
    alone = np.concatenate([embed(server, [i], normalize=False) for i in images])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_similarity_is_the_cosine_of_the_models_embeddings(server, ref):
    a, b = [png_bytes(i) for i in range(3)], [png_bytes(i) for i in range(10, 15)]
    r = server.http.post("/similarity", json={"a": [b64(i) for i in a], "b": [b64(i) for i in b]})
    np.testing.assert_allclose(
        np.array(r.json()["scores"]), unit(ref.embed(a)) @ unit(ref.embed(b)).T, atol=1e-5
    )


def _masked_l1(pixels, recon, mask, patch):
    m = np.kron(mask, np.ones((patch, patch)))[None]
    return float((np.abs(recon - pixels) * m).sum() / (m.sum() * pixels.shape[0]))


def _picture(data: bytes, spec) -> np.ndarray:
    """PNG bytes -> int16 pixels, checking the format and mode."""
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG" and picture.mode == spec.color_mode
    return np.asarray(picture, np.int16)


def _assert_shows(picture: np.ndarray, want: np.ndarray, spec, what: str) -> None:
    """picture equals the normalised [C, H, W] `want` once denormalised, to 1 level of 255."""
    expected = denormalize(want.astype(np.float32), spec).astype(np.int16)
    assert picture.shape == expected.shape, what
    assert np.abs(picture - expected).max() <= 1, what


def _reconstruction(server, ref, image: bytes, **options):
    """The JSON answer, the mask, the preprocessed pixels and the model's raw output."""
    r = server.http.post("/reconstruct", json={"image": b64(image), "seed": 3, **options})
    assert r.status_code == 200, r.text
    body = r.json()
    mask = np.array(body["mask"], np.uint8)
    return body, mask, ref.pixels([image])[0], ref.reconstruct(image, mask)


def test_reconstruct_returns_the_block_mask_pngs_and_masked_l1_of_the_model(server, ref):
    card, image = ref.model.card, png_bytes(11, (70, 50))
    body, mask, pixels, raw = _reconstruction(server, ref, image)
    s, p, mp = card["image_size"], card["patch_size"], card["mask_patch_size"]
    cells = (s // mp) ** 2
    assert mask.shape == (s // p, s // p)
    assert mask.sum() == math.ceil(card["mask_ratio"] * cells) * (mp // p) ** 2

    masked = np.kron(mask, np.ones((p, p)))[None].astype(bool)  # [1, H, W]
    assert body["loss"] == pytest.approx(_masked_l1(pixels, raw, mask, p), rel=1e-4)
    for key, want in (
        ("original", pixels),
        ("masked_input", np.where(masked, 0.0, pixels)),
        ("reconstruction", np.where(masked, raw, pixels)),  # the visible patches pasted back
    ):
        _assert_shows(_picture(base64.b64decode(body[key]), ref.spec), want, ref.spec, key)


def test_reconstruct_without_paste_visible_returns_the_raw_decoder_output(server, ref):
    image = png_bytes(11, (70, 50))
    body, mask, pixels, raw = _reconstruction(server, ref, image, paste_visible=False)
    picture = _picture(base64.b64decode(body["reconstruction"]), ref.spec)
    _assert_shows(picture, raw, ref.spec, "reconstruction")
    pasted = _reconstruction(server, ref, image)[0]
    assert body["loss"] == pasted["loss"]  # the loss is over masked pixels, which are the same
    assert body["reconstruction"] != pasted["reconstruction"]


@pytest.mark.parametrize("paste_visible", ["true", "false"])
def test_reconstruct_picture_shows_the_reconstruction_as_the_json_does(server, ref, paste_visible):
    image = png_bytes(12)
    form = {"seed": "4", "paste_visible": paste_visible}
    body = server.http.post(
        "/reconstruct", files={"image": ("x.png", image, "image/png")}, data=form
    ).json()
    r = server.http.post(
        "/reconstruct",
        files={"image": ("x.png", image, "image/png")},
        data=form,
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    picture = _picture(r.content, ref.spec)
    s = ref.model.card["image_size"]
    k = math.ceil(PANEL_MIN / s)
    right = picture[::k, -s * k :: k]  # the third panel, scaled back
    np.testing.assert_array_equal(
        right, _picture(base64.b64decode(body["reconstruction"]), ref.spec)
    )
