"""The Python client SDK against a live `simmim serve`, plus its retry rule and PNG encoder on
their own."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from service_fixtures import (
    API_KEY,
    ROOT,
    Reference,
    ServerProcess,
    encode,
    free_port,
    make_image,
    png_bytes,
    unit,
    wait_until,
)

import simmim_client.client as client_module
from simmim_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConnectionFailedError,
    Health,
    PayloadTooLargeError,
    QueueFullError,
    ServiceUnavailableError,
    encode_png,
)

SETTINGS = {"SIMMIM_MAX_BATCH_SIZE": "4", "SIMMIM_MAX_QUEUE": "8", "SIMMIM_MAX_IMAGES": "8"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        tiny_model_dir, tmp_path_factory.mktemp("client"), env=SETTINGS, gated=True
    ) as s:
        s.open_gate()
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    return Reference(tiny_model_dir)


@pytest.fixture
def client(server):
    with Client(server.url, api_key=API_KEY, batch_size=4, max_concurrency=2) as c:
        yield c  # at most 2 x 4 images in flight: never more than the server's queue


def test_embed_accepts_paths_bytes_pil_images_and_arrays(client, ref, tmp_path):
    pictures = [make_image(i) for i in range(5)]
    path = tmp_path / "zero.png"
    path.write_bytes(encode(pictures[0]))
    gray = np.asarray(pictures[4].convert("L"))
    inputs = [path, encode(pictures[1]), pictures[2], np.asarray(pictures[3]), gray / 255.0]
    expected = ref.embed(
        [encode(p) for p in pictures[:4]]
        + [encode(Image.fromarray(np.round(gray / 255.0 * 255).astype(np.uint8)))]
    )
    vectors = client.embed(inputs)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, unit(expected), atol=1e-5, rtol=0)
    np.testing.assert_allclose(client.embed(inputs, normalize=False), expected, atol=1e-5, rtol=0)


def test_long_lists_are_split_into_batch_size_requests_and_kept_in_order(client, server, ref):
    images = [png_bytes(i) for i in range(10)]
    before = server.metric("simmim_requests_total", endpoint="/embed", status="200")
    vectors = client.embed(images, batch_size=4)
    assert server.metric("simmim_requests_total", endpoint="/embed", status="200") == before + 3
    np.testing.assert_allclose(vectors, unit(ref.embed(images)), atol=1e-5, rtol=0)


def test_progress_true_shows_a_progress_bar(client, capsys):
    client.embed([png_bytes(i) for i in range(6)], progress=True)
    assert "6/6" in capsys.readouterr().err


def test_similarity_uses_the_server_or_embeds_long_lists_and_compares_locally(client, ref):
    a, b = [png_bytes(i) for i in range(2)], [png_bytes(i) for i in range(10, 12)]
    np.testing.assert_allclose(
        client.similarity(a, b), unit(ref.embed(a)) @ unit(ref.embed(b)).T, atol=1e-5
    )
    a, b = [png_bytes(i) for i in range(5)], [png_bytes(i) for i in range(10, 13)]
    scores = client.similarity(a, b)  # 8 images > batch_size 4: local cosine
    assert scores.shape == (5, 3)
    np.testing.assert_allclose(scores, unit(ref.embed(a)) @ unit(ref.embed(b)).T, atol=1e-5)
    np.testing.assert_allclose(np.diag(client.similarity(a)), 1.0, atol=1e-5)


def test_reconstruct_returns_mask_pngs_and_loss_and_the_side_by_side_picture(client, ref):
    r = client.reconstruct(png_bytes(3), mask_ratio=0.5, seed=4)
    s, p = ref.model.card["image_size"], ref.model.card["patch_size"]
    assert r.mask.shape == (s // p, s // p) and r.mask.dtype == np.uint8
    assert Image.open(io.BytesIO(r.reconstruction)).size == (s, s)
    assert Image.open(io.BytesIO(r.masked_input)).size == (s, s)
    assert r.loss >= 0
    assert client.reconstruct(png_bytes(3), mask_ratio=0.5, seed=4).mask.tolist() == r.mask.tolist()
    picture = Image.open(io.BytesIO(client.reconstruct_picture(png_bytes(3), seed=4)))
    assert picture.format == "PNG" and picture.width > 3 * picture.height


def test_info_and_health(client, ref):
    info = client.info()
    assert info["model"]["name"] == ref.model.name and info["state"] == "ready"
    assert client.health() == Health(live=True, ready=True, detail="ready")


def test_health_of_an_unreachable_server_says_so():
    with Client(f"http://127.0.0.1:{free_port()}") as c:
        assert c.health() == Health(live=False, ready=False, detail="unreachable")


def test_server_errors_raise_typed_exceptions_with_code_message_and_list_index(client, server):
    images = [png_bytes(i) for i in range(5)] + [b"not an image"]
    with pytest.raises(BadRequestError) as info:
        client.embed(images, batch_size=4)  # the bad one is the 2nd of batch 2
    e = info.value
    assert (e.status, e.code, e.index) == (400, "invalid_image", 5)
    assert "images[1]" in e.message and e.request_id
    with pytest.raises(PayloadTooLargeError) as info:
        client.embed([png_bytes(0)] * 9, batch_size=9)
    assert info.value.code == "too_many_images"
    with Client(server.url, api_key="wrong") as wrong:
        with pytest.raises(AuthenticationError) as info:
            wrong.info()
    assert info.value.code == "unauthorized"


def test_a_request_refused_with_429_is_retried_until_it_succeeds(client, server, ref):
    held, extra = [png_bytes(i) for i in range(40, 48)], png_bytes(50)
    refused = server.metric("simmim_requests_total", endpoint="/embed", status="429")
    server.close_gate()
    try:
        with ThreadPoolExecutor(3) as pool:
            holders = [
                pool.submit(
                    server.http.post,
                    "/embed",
                    json={"images": [base64.b64encode(x).decode() for x in held[i : i + 4]]},
                )
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
            with Client(server.url, api_key=API_KEY, max_retries=50, max_backoff_s=0.05) as c:
                retried = pool.submit(c.embed, [extra])
                wait_until(
                    lambda: (
                        server.metric("simmim_requests_total", endpoint="/embed", status="429")
                        > refused
                    ),
                    "a 429",
                )
                server.open_gate()
                vector = retried.result(timeout=60)
            assert [h.result().status_code for h in holders] == [200, 200]
    finally:
        server.open_gate()
    np.testing.assert_allclose(vector, unit(ref.embed([extra])), atol=1e-5, rtol=0)


def test_async_client_gives_the_same_answers(client, server):
    images = [png_bytes(i) for i in range(9)]

    async def main():
        async with AsyncClient(server.url, api_key=API_KEY, batch_size=4, max_concurrency=2) as c:
            return (
                await c.embed(images),
                await c.similarity(images[:3]),
                (await c.reconstruct(images[0], seed=1)).mask,
                await c.info(),
                await c.health(),
            )

    vectors, scores, mask, info, health = asyncio.run(main())
    np.testing.assert_allclose(vectors, client.embed(images), atol=1e-6)
    np.testing.assert_allclose(scores, client.similarity(images[:3]), atol=1e-6)
    np.testing.assert_array_equal(mask, client.reconstruct(images[0], seed=1).mask)
    assert info == client.info() and health.ready


# --- the retry rule, with a scripted transport and a recorded clock --------------------------
@pytest.fixture
def sleeps(monkeypatch):
    recorded = []
    monkeypatch.setattr(client_module.time, "sleep", recorded.append)
    return recorded


def scripted(*answers):
    """A transport that plays `answers` in order: an exception to raise or (status, headers)."""
    answers = list(answers)

    def handle(request):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer
        body = {"ok": True} if status == 200 else {"error": {"code": "x", "message": "m"}}
        return httpx.Response(status, headers=headers, json=body)

    return httpx.MockTransport(handle)


def test_retry_waits_the_servers_retry_after(sleeps):
    transport = scripted((429, {"Retry-After": "7"}), (503, {"Retry-After": "2"}), (200, {}))
    with Client("http://test", transport=transport) as c:
        assert c.info() == {"ok": True}
    assert sleeps == [7.0, 2.0]


def test_retry_backs_off_exponentially_without_retry_after_then_gives_up(sleeps):
    transport = scripted(*[(503, {})] * 4)
    with Client("http://test", transport=transport, max_retries=3, backoff_s=1.0) as c:
        with pytest.raises(ServiceUnavailableError) as info:
            c.info()
    assert info.value.status == 503
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):  # jittered within [1/2, 1] of 2**attempt
        assert 2**attempt / 2 <= delay <= 2**attempt


def test_connection_errors_are_retried_then_reported(sleeps):
    refused = httpx.ConnectError("connection refused")
    with Client("http://test", transport=scripted(refused, refused, (200, {}))) as c:
        assert c.info() == {"ok": True}
    assert len(sleeps) == 2
    with Client("http://test", transport=scripted(refused, refused), max_retries=1) as c:
        with pytest.raises(ConnectionFailedError, match="after 2 attempts"):
            c.info()


def test_other_errors_are_not_retried(sleeps):
    with Client("http://test", transport=scripted((429, {}), (400, {}))) as c:
        with pytest.raises(BadRequestError) as info:
            c.info()
    assert info.value.status == 400 and len(sleeps) == 1
    with Client(
        "http://test", transport=scripted(*[(429, {"Retry-After": "1"})] * 2), max_retries=1
    ) as c:
        with pytest.raises(QueueFullError) as info:
            c.info()
    assert info.value.retry_after == 1.0


def test_empty_lists_are_refused_before_anything_is_sent():
    with Client("http://test", transport=scripted()) as c:
        for call in (
            lambda: c.embed([]),
            lambda: c.similarity([]),
            lambda: c.similarity([b"x"], []),
        ):
            with pytest.raises(ValueError):
                call()


# --- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((5, 7), np.uint8),
        ((5, 7, 1), np.uint8),
        ((5, 7, 2), np.uint8),
        ((5, 7, 3), np.uint8),
        ((5, 7, 4), np.uint8),
        ((5, 7), np.uint16),
        ((5, 7, 3), np.uint16),
        ((5, 7), np.bool_),
    ],
)
def test_encode_png_round_trips_through_pillow(shape, dtype):
    rng = np.random.default_rng(0)
    array = rng.integers(0, np.iinfo(dtype).max if dtype != np.bool_ else 2, shape).astype(dtype)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(array))))
    expected = array.astype(np.uint8) * 255 if dtype == np.bool_ else array
    if dtype == np.uint16 and len(shape) == 3:  # Pillow keeps 16 bits for gray only
        expected = (array >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decoded.reshape(expected.shape), expected)


def test_encode_png_refuses_what_is_not_an_image():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.full((4, 4), 1.5))
    with pytest.raises(TypeError):
        encode_png(np.zeros((4, 4), np.int64))


def test_client_imports_and_encodes_with_only_httpx_and_numpy():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in {'PIL', 'tqdm', 'torch', 'onnxruntime',\n"
        "                                      'fastapi', 'service', 'simmim_core'}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, simmim_client\n"
        "png = simmim_client.encode_png(np.zeros((2, 2, 3), np.uint8))\n"
        "assert png.startswith(b'\\x89PNG')\n"
        "simmim_client.Client('http://127.0.0.1:1').close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_documented_retrieval_example_finds_the_query_first(server, tmp_path):
    text = (ROOT / "README.md").read_text()
    code = text.split("### Example: image retrieval")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "photos" / "more").mkdir(parents=True)
    for i in range(7):
        make_image(i).save(tmp_path / "photos" / ("more" if i % 2 else "") / f"{i}.png")
    query = encode(make_image(3), "JPEG", quality=90)
    (tmp_path / "query.jpg").write_bytes(query)
    (tmp_path / "photos" / "more" / "copy-of-query.jpg").write_bytes(query)
    env = {**os.environ, "SIMMIM_URL": server.url, "SIMMIM_API_KEY": API_KEY}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["1.000", "photos/more/copy-of-query.jpg"]
