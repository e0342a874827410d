"""/v1/embeddings serves the model directory's vectors: a real `simmim serve` (onnxruntime) of
the tiny model exported by our exporter with a PCA-whitening projection, through the official
`openai` client. Its vectors equal /embed's with normalize=true, and `dimensions` below the
model's own gives the first principal axes, renormalised: what a projection fitted to that many
dimensions would give (test_projection checks that property of the fit)."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
from conftest import run_simmim
from service_fixtures import API_KEY, Reference, ServerProcess, png_bytes, unit

SETTINGS = {"SIMMIM_MAX_IMAGES": "8", "SIMMIM_MAX_BATCH_SIZE": "8", "SIMMIM_MAX_WAIT_MS": "1"}
DIM = 8  # the projection's


@pytest.fixture(scope="module")
def projected_model_dir(tiny_run_dir, tmp_path_factory):
    """The tiny run exported with `--project pca-whiten:8` on grid2 pooling (fitted on its
    training data), as test_projection exports it."""
    out = tmp_path_factory.mktemp("projected") / "model"
    run_simmim(
        "export",
        str(tiny_run_dir),
        "--out",
        str(out),
        "--project",
        f"pca-whiten:{DIM}",
        "--pooling",
        "grid2",
        "--no-progress",
    )
    return out


@pytest.fixture(scope="module")
def server(projected_model_dir, tmp_path_factory):
    with ServerProcess(
        projected_model_dir, tmp_path_factory.mktemp("openai-model"), env=SETTINGS, processes=2
    ) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def ref(projected_model_dir):
    return Reference(projected_model_dir)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


IMAGES = [png_bytes(i, (64, 48)) for i in range(5)]
INPUT = [base64.b64encode(i).decode() for i in IMAGES]


def embed_endpoint(server, normalize: bool) -> np.ndarray:
    r = server.http.post("/embed", json={"images": INPUT, "normalize": normalize})
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"], np.float32)


def create(client, ref, **options) -> np.ndarray:
    """The vectors as the client returns them: floats, or (encoding_format="base64" asked for
    explicitly) base64 of little-endian float32, decoded here."""
    response = client.embeddings.create(model=ref.model.name, input=INPUT, **options)
    return np.stack(
        [
            np.frombuffer(base64.b64decode(d.embedding), "<f4")
            if isinstance(d.embedding, str)
            else np.array(d.embedding, np.float32)
            for d in response.data
        ]
    )


def test_the_model_card_records_the_projection(projected_model_dir):
    card = json.loads((projected_model_dir / "model.json").read_text())
    assert card["embedding_dim"] == DIM and card["projection"]["kind"] == "pca-whiten"


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_vectors_equal_embeds_with_normalize_true(client, server, ref, encoding_format):
    """None: the client's default (it asks for base64 and decodes it to floats)."""
    options = {"encoding_format": encoding_format} if encoding_format else {}
    got = create(client, ref, **options)
    np.testing.assert_array_equal(got, embed_endpoint(server, normalize=True))


def test_vectors_are_the_models_on_the_shared_preprocessing(client, ref):
    np.testing.assert_allclose(
        create(client, ref, encoding_format="float"), unit(ref.embed(IMAGES)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("dimensions", [1, 3, DIM])
def test_dimensions_give_the_first_principal_axes_renormalised(client, server, ref, dimensions):
    got = create(client, ref, dimensions=dimensions, encoding_format="float")
    assert got.shape == (len(IMAGES), dimensions)
    raw = embed_endpoint(server, normalize=False)
    np.testing.assert_allclose(got, unit(raw[:, :dimensions]), atol=1e-6, rtol=0)


def test_more_dimensions_than_the_models_get_400(client, ref):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, ref, dimensions=DIM + 1)
    assert info.value.code == "unsupported_dimensions" and info.value.param == "dimensions"
    assert f"1 to {DIM}" in info.value.message
