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


def test_reconstruct_returns_the_block_mask_pngs_and_masked_l1_of_the_model(server, ref):
    card, image = ref.model.card, png_bytes(11, (70, 50))
    r = server.http.post("/reconstruct", json={"image": b64(image), "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    mask = np.array(body["mask"], np.uint8)
    s, p, mp = card["image_size"], card["patch_size"], card["mask_patch_size"]
    cells = (s // mp) ** 2
    assert mask.shape == (s // p, s // p)
    assert mask.sum() == math.ceil(card["mask_ratio"] * cells) * (mp // p) ** 2

    pixels = ref.pixels([image])[0]
    expected = ref.reconstruct(image, mask)
    assert body["loss"] == pytest.approx(_masked_l1(pixels, expected, mask, p), rel=1e-4)
    for key, want in (
        ("reconstruction", expected),
        ("masked_input", pixels * (1 - np.kron(mask, np.ones((p, p))))[None]),
    ):
        picture = Image.open(io.BytesIO(base64.b64decode(body[key])))
        assert picture.format == "PNG" and picture.size == (s, s)
        assert picture.mode == ref.spec.color_mode
        diff = np.abs(
            np.asarray(picture, np.int16)
            - denormalize(want.astype(np.float32), ref.spec).astype(np.int16)
        )
        assert diff.max() <= 1, key
