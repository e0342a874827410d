"""OpenAI's embeddings API for images (POST /v1/embeddings, GET /v1/models) through the official
`openai` client, against a real `simmim serve` on a loopback port, on the dummy backend
(tests/dummy_backend.py) and the embedded model's directory: the answer's shape, float and
base64, every input form, the API key, and each error in OpenAI's shape with the status /embed
would get. That the vectors are the served model's (and `dimensions` on a projected model) is
specified in test_openai_model.py, on real exported ONNX files."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from service_fixtures import (
    API_KEY,
    ROOT,
    DummyReference,
    ServerProcess,
    encode,
    png_bytes,
    unit,
    wait_until,
)

from service.settings import default_model_path

MODEL_DIR = default_model_path()
SETTINGS = {
    "SIMMIM_MAX_IMAGES": "8",
    "SIMMIM_MAX_QUEUE": "8",
    "SIMMIM_MAX_BATCH_SIZE": "4",
    "SIMMIM_MAX_PIXELS": "1000000",
    "SIMMIM_MAX_REQUEST_BYTES": "1500000",
    "SIMMIM_MAX_WAIT_MS": "1",
}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Gated (one process), so that a test can hold the model; the gate starts open."""
    with ServerProcess(
        MODEL_DIR, tmp_path_factory.mktemp("openai"), env=SETTINGS, dummy=True, gated=True
    ) as s:
        s.open_gate()
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def ref():
    return DummyReference(MODEL_DIR)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def create(client, ref, images: list, **options):
    """client.embeddings.create with the served model's id."""
    return client.embeddings.create(model=ref.model.name, input=images, **options)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], np.float32)


def embed_endpoint(server, images: list[bytes], encoding: str) -> np.ndarray:
    """/embed's normalised vectors, rows decoded from `encoding`."""
    r = server.http.post(
        "/embed", json={"images": [b64(i) for i in images], "normalize": True, "encoding": encoding}
    )
    assert r.status_code == 200, r.text
    rows = r.json()["embeddings"]
    if encoding == "base64":
        return np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in rows])
    return np.array(rows, np.float32)


# --- models ---------------------------------------------------------------------------------
def test_models_list_the_served_model_by_its_model_json_name(client, ref):
    [model] = client.models.list().data
    assert model.id == ref.model.name and model.object == "model"
    assert model.owned_by == "simmim-service" and model.created > 1_600_000_000
    assert client.models.retrieve(ref.model.name).id == ref.model.name


def test_retrieving_another_model_gets_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("text-embedding-3-small")
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_openapi_documents_the_v1_routes_with_a_self_contained_body_schema(server):
    spec = server.http.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/models", "/v1/models/{model}"} <= set(spec["paths"])
    body = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"model", "input", "encoding_format", "dimensions", "user"}
    assert "$defs" not in str(body)  # nested models written in place, not dangling references


# --- embeddings -----------------------------------------------------------------------------
def test_the_answer_has_openais_shape_one_entry_per_image_in_order(client, ref):
    images = [png_bytes(i) for i in range(3)]
    response = create(client, ref, [b64(i) for i in images], encoding_format="float")
    assert response.object == "list" and response.model == ref.model.name
    assert [(d.object, d.index) for d in response.data] == [("embedding", i) for i in range(3)]
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (3, 3)
    np.testing.assert_allclose(vectors(response), unit(ref.embed(images)), atol=1e-5, rtol=0)


def test_float_vectors_equal_embeds_with_normalize_true(client, server, ref):
    images = [png_bytes(i) for i in range(10, 14)]
    response = create(client, ref, [b64(i) for i in images], encoding_format="float")
    np.testing.assert_array_equal(vectors(response), embed_endpoint(server, images, "float"))


def test_base64_is_little_endian_float32_equal_to_embeds_bit_for_bit(client, server, ref):
    images = [png_bytes(i) for i in range(20, 23)]
    raw = client.embeddings.with_raw_response.create(
        model=ref.model.name, input=[b64(i) for i in images], encoding_format="base64"
    )
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
        for d in raw.http_response.json()["data"]
    ]
    np.testing.assert_array_equal(np.stack(rows), embed_endpoint(server, images, "base64"))


def test_the_clients_default_base64_decodes_to_the_same_vectors(client, server, ref):
    images = [png_bytes(i) for i in range(30, 32)]
    response = create(client, ref, [b64(i) for i in images])  # the client asks for base64
    np.testing.assert_array_equal(vectors(response), embed_endpoint(server, images, "float"))


def test_one_item_base64_data_uris_and_image_parts_all_give_the_same_vector(client, ref):
    image = png_bytes(40)
    data_uri = "data:image/png;base64," + b64(image)
    forms = [
        b64(image),
        [b64(image)],
        data_uri,
        {"type": "image_url", "image_url": {"url": data_uri}},
        [{"type": "image_url", "image_url": {"url": data_uri, "detail": "auto"}}],
    ]
    expected = unit(ref.embed([image]))
    for form in forms:
        got = vectors(create(client, ref, form, encoding_format="float"))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=str(form)[:60])


def test_multipart_input_files_are_embedded_like_json(server, ref):
    images = [png_bytes(41), png_bytes(42)]
    r = server.http.post(
        "/v1/embeddings",
        files=[("input", image) for image in images],
        data={"model": ref.model.name, "encoding_format": "float"},
    )
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(got, unit(ref.embed(images)), atol=1e-5, rtol=0)


def test_dimensions_equal_to_the_models_own_are_accepted(client, ref):
    dim = ref.model.card["embedding_dim"]
    response = create(client, ref, [b64(png_bytes(43))], dimensions=dim, encoding_format="float")
    assert len(response.data[0].embedding) == dim


def test_the_api_key_works_as_the_openai_client_sends_it(server, ref):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            create(wrong, ref, [b64(png_bytes(0))])
    assert info.value.code == "unauthorized" and info.value.type == "authentication_error"
    assert info.value.response.headers["www-authenticate"] == "Bearer"
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as right:
        assert len(create(right, ref, [b64(png_bytes(0))]).data) == 1


def test_the_documented_openai_client_example_runs(server, ref, tmp_path):
    text = (ROOT / "README.md").read_text()
    code = text.split("### OpenAI-compatible API")[1].split("```python\n")[1].split("```")[0]
    Image.new("L", (28, 28), 128).save(tmp_path / "shirt.png")
    env = {**os.environ, "SIMMIM_API_KEY": API_KEY}
    result = subprocess.run(
        [sys.executable, "-c", code.replace("http://127.0.0.1:8000", server.url)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    dim = str(ref.model.card["embedding_dim"])
    assert result.stdout.split() == [ref.model.card["name"], dim, "1.000"]


# --- errors: OpenAI's shape, the statuses /embed would get ----------------------------------
GOOD = b64(png_bytes(0))
BIG = b64(encode(Image.new("RGB", (1200, 1000))))  # 1.2 Mpx, over SIMMIM_MAX_PIXELS
ERRORS = {  # name: (create's keyword arguments, status, code, param)
    "undecodable-image": (
        {"input": [GOOD, b64(b"not an image")]},
        400,
        "invalid_image",
        "input[1]",
    ),
    "https-url": ({"input": ["https://example.com/cat.png"]}, 400, "invalid_image", "input[0]"),
    "url-in-an-image-part": (
        {"input": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]},
        400,
        "invalid_image",
        "input[0]",
    ),
    "other-dimensions": (
        {"input": [GOOD], "dimensions": 100_000},  # more than any model gives
        400,
        "unsupported_dimensions",
        "dimensions",
    ),
    "another-model": (
        {"input": [GOOD], "model": "text-embedding-3-small"},
        404,
        "model_not_found",
        "model",
    ),
    "too-many-images": ({"input": [GOOD] * 9}, 413, "too_many_images", None),
    "too-many-pixels": ({"input": [GOOD, BIG]}, 413, "image_too_large", "input[1]"),
    "body-over-the-limit": ({"input": ["A" * 1_600_000]}, 413, "payload_too_large", None),
    "not-json": (
        {"input": [GOOD], "extra_headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
        None,
    ),
    "token-arrays": ({"input": [[101, 2023, 102]]}, 422, "invalid_request", "input"),
    "empty-list": ({"input": []}, 422, "invalid_request", "input"),
    "unknown-encoding-format": (
        {"input": [GOOD], "encoding_format": "hex"},
        422,
        "invalid_request",
        "encoding_format",
    ),
}


def assert_openai_error(error: openai.APIStatusError, status: int, code: str, param) -> None:
    """The client's exception for `status`, and exactly OpenAI's error body."""
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert (error.code, error.param) == (code, param)
    assert error.message and body["error"]["message"]
    expected_type = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    assert error.type == expected_type


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_each_bad_request_gets_its_status_in_openais_error_shape(client, ref, case):
    kwargs, status, code, param = ERRORS[case]
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(**{"model": ref.model.name, **kwargs})
    assert_openai_error(info.value, status, code, param)


def test_errors_elsewhere_under_v1_take_openais_shape_too(server):
    for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/embeddings", 405)):
        r = server.http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == ERROR_KEYS


def test_errors_outside_v1_keep_the_services_own_shape(server):
    r = server.http.post("/embed", json={"images": ["https://example.com/cat.png"]})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "code": "invalid_image",
            "message": "images[0]: URLs are not fetched; send the image itself, base64-encoded",
            "index": 0,
        }
    }


def test_a_full_queue_gets_429_with_retry_after(server, client, ref):
    held = [b64(png_bytes(i)) for i in range(50, 58)]
    server.close_gate()
    try:
        with ThreadPoolExecutor(2) as pool:
            holders = [
                pool.submit(server.http.post, "/embed", json={"images": held[i : i + 4]})
                for i in (0, 4)
            ]
            wait_until(
                lambda: (
                    server.metric("simmim_running_items", task="embed")
                    + server.metric("simmim_queue_depth", task="embed")
                    == 8
                ),
                "a full queue: one batch held in the model, one waiting",
            )
            with pytest.raises(openai.RateLimitError) as info:
                create(client, ref, [GOOD])
            server.open_gate()
            assert [h.result().status_code for h in holders] == [200, 200]
    finally:
        server.open_gate()
    assert_openai_error(info.value, 429, "queue_full", None)
    assert float(info.value.response.headers["retry-after"]) >= 1


def test_a_server_still_loading_gets_503(ref, tmp_path):
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, gated=True) as loading:
        with openai.OpenAI(base_url=f"{loading.url}/v1", api_key=API_KEY, max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as info:
                create(c, ref, [GOOD])
    assert_openai_error(info.value, 503, "not_ready", None)
    assert info.value.response.headers["retry-after"] == "1"


def test_results_later_than_the_request_timeout_get_504(ref, tmp_path):
    env = {"SIMMIM_REQUEST_TIMEOUT_S": "0.5"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, gated=True) as slow:
        slow.open_gate()
        slow.wait_ready()
        slow.close_gate()
        with openai.OpenAI(base_url=f"{slow.url}/v1", api_key=API_KEY, max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as info:
                create(c, ref, [GOOD])
    assert_openai_error(info.value, 504, "timeout", None)


def test_a_rejected_request_leaves_the_server_serving(client, ref):
    with pytest.raises(openai.BadRequestError):
        create(client, ref, [b64(b"garbage")])
    image = png_bytes(60)
    got = vectors(create(client, ref, [b64(image)], encoding_format="float"))
    np.testing.assert_allclose(got, unit(ref.embed([image])), atol=1e-5, rtol=0)


def test_without_a_server_key_any_client_key_is_accepted(ref, tmp_path):
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, api_key=None) as open_server:
        open_server.wait_ready()
        with openai.OpenAI(base_url=f"{open_server.url}/v1", api_key="anything") as c:
            assert len(create(c, ref, [GOOD]).data) == 1
        assert httpx.get(f"{open_server.url}/v1/models").status_code == 200
