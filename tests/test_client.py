"""The Python client SDK: every case runs against both Client and AsyncClient (the async one
behind the same blocking calls), against a live `simmim serve` on the dummy backend or a scripted
transport; the retry rule, written once and free of I/O, is driven by hand; the PNG encoder on its
own."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
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
    DummyReference,
    ServerProcess,
    encode,
    free_port,
    make_image,
    png_bytes,
    unit,
    wait_until,
)

from service.settings import default_model_path
from simmim_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConnectionFailedError,
    EmbedResult,
    Health,
    PayloadTooLargeError,
    QueueFullError,
    ServiceUnavailableError,
    encode_png,
)
from simmim_client.protocol import Call, Retry, Sleep, exchange

SETTINGS = {"SIMMIM_MAX_BATCH_SIZE": "4", "SIMMIM_MAX_QUEUE": "8", "SIMMIM_MAX_IMAGES": "8"}
MODEL_DIR = default_model_path()


class BlockingAsyncClient:
    """An AsyncClient behind Client's blocking calls, each run on one event loop of its own."""

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._client = AsyncClient(*args, **kwargs)

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        return lambda *args, **kwargs: self._loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(params=[Client, BlockingAsyncClient], ids=["Client", "AsyncClient"])
def connect(request):
    """Opens a Client or an AsyncClient: a test that takes it specifies both."""
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(
        MODEL_DIR, tmp_path_factory.mktemp("client"), env=SETTINGS, dummy=True, gated=True
    ) as s:
        s.open_gate()
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def ref():
    return DummyReference(MODEL_DIR)


@pytest.fixture
def client(server, connect):
    with connect(server.url, api_key=API_KEY, batch_size=4, max_concurrency=2) as c:
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


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """The embedded model on onnxruntime: a reconstruction that is not its input."""
    with ServerProcess(MODEL_DIR, tmp_path_factory.mktemp("model"), env=SETTINGS) as s:
        s.wait_ready()
        yield s


def test_reconstruct_pastes_the_visible_patches_back_unless_asked_for_the_raw_output(
    model_server, connect
):
    def visible_diff(r) -> float:
        p = len(np.asarray(Image.open(io.BytesIO(r.masked_input)))) // len(r.mask)
        visible = np.kron(1 - r.mask, np.ones((p, p), np.uint8)).astype(bool)
        shown = np.asarray(Image.open(io.BytesIO(r.reconstruction)), np.float32)
        masked = np.asarray(Image.open(io.BytesIO(r.masked_input)), np.float32)
        return float(np.abs(shown - masked)[visible].max())

    with connect(model_server.url, api_key=API_KEY) as c:
        pasted = c.reconstruct(png_bytes(3), mask_ratio=0.5, seed=4)
        raw = c.reconstruct(png_bytes(3), mask_ratio=0.5, seed=4, paste_visible=False)
    assert visible_diff(pasted) == 0
    assert visible_diff(raw) > 0
    assert raw.loss == pasted.loss  # over the masked pixels only


def test_info_and_health(client, ref):
    info = client.info()
    assert info["model"]["name"] == ref.model.name and info["state"] == "ready"
    assert client.health() == Health(live=True, ready=True, detail="ready")


def test_health_of_an_unreachable_server_says_so(connect):
    with connect(f"http://127.0.0.1:{free_port()}") as c:
        assert c.health() == Health(live=False, ready=False, detail="unreachable")


def test_server_errors_raise_typed_exceptions_with_code_message_and_list_index(
    client, server, connect
):
    images = [png_bytes(i) for i in range(5)] + [b"not an image"]
    with pytest.raises(BadRequestError) as info:
        client.embed(images, batch_size=4)  # the bad one is the 2nd of batch 2
    e = info.value
    assert (e.status, e.code, e.index) == (400, "invalid_image", 5)
    assert "images[1]" in e.message and e.request_id
    with pytest.raises(PayloadTooLargeError) as info:
        client.embed([png_bytes(0)] * 9, batch_size=9)
    assert info.value.code == "too_many_images"
    with connect(server.url, api_key="wrong") as wrong:
        with pytest.raises(AuthenticationError) as info:
            wrong.info()
    assert info.value.code == "unauthorized"


# --- on_error="skip": bulk work does not die on one bad file -----------------------------------
def bulk_with_bad_images(tmp_path) -> tuple[list, dict[int, type], list[int]]:
    """30 images, batch_size 4 (8 requests): bad ones alone (3), side by side (8, 9), read here
    (a missing file at 14, an object that is no image at 29), and a whole batch (20-23).
    Returns (images, {bad index: the exception type expected}, the good indexes)."""
    images: list = [png_bytes(i) for i in range(30)]
    bad = {3: BadRequestError, 8: BadRequestError, 9: BadRequestError, 14: FileNotFoundError}
    bad |= {i: BadRequestError for i in range(20, 24)} | {29: TypeError}
    for i, kind in bad.items():
        if kind is BadRequestError:
            images[i] = png_bytes(i)[:60] if i % 2 else b"not an image"
    images[14] = tmp_path / "missing.png"
    images[29] = object()
    return images, bad, [i for i in range(30) if i not in bad]


def test_on_error_skip_returns_every_good_vector_and_each_bad_images_error(client, ref, tmp_path):
    images, bad, good = bulk_with_bad_images(tmp_path)
    result = client.embed(images, batch_size=4, on_error="skip")
    assert isinstance(result, EmbedResult)
    assert result.indexes.tolist() == good
    dim = ref.model.card["embedding_dim"]
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (len(good), dim)
    np.testing.assert_allclose(
        result.vectors, unit(ref.embed([images[i] for i in good])), atol=1e-5, rtol=0
    )
    assert list(result.errors) == sorted(bad)
    for i, error in result.errors.items():
        assert type(error) is bad[i], (i, error)
        if isinstance(error, BadRequestError):
            assert error.index == i and error.code == "invalid_image"


def test_a_skipped_image_costs_one_more_request_of_its_batch(client, server, tmp_path):
    images, bad, _ = bulk_with_bad_images(tmp_path)
    refused_by_server = sum(1 for kind in bad.values() if kind is BadRequestError)

    def count(status: str) -> float:
        return server.metric("simmim_requests_total", endpoint="/embed", status=status)

    ok, refused = count("200"), count("400")
    client.embed(images, batch_size=4, on_error="skip")
    assert count("400") - refused == refused_by_server
    assert count("200") - ok == 7  # 8 batches; 20-23 had nothing left to send


def test_on_error_skip_with_no_good_image_gives_no_rows_of_the_models_width(client, ref):
    result = client.embed([b"not an image", b"nor this"], on_error="skip")
    assert result.vectors.shape == (0, ref.model.card["embedding_dim"])
    assert result.indexes.tolist() == [] and list(result.errors) == [0, 1]


def test_on_error_skip_still_raises_what_is_no_images_fault(server, connect):
    with connect(server.url, api_key="wrong") as wrong:
        with pytest.raises(AuthenticationError):
            wrong.embed([png_bytes(0)], on_error="skip")
    with connect(server.url, api_key=API_KEY) as c:
        with pytest.raises(PayloadTooLargeError) as info:
            c.embed([png_bytes(0)] * 9, batch_size=9, on_error="skip")
    assert info.value.code == "too_many_images"


def test_a_request_refused_with_429_is_retried_until_it_succeeds(server, connect, ref):
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
            with connect(server.url, api_key=API_KEY, max_retries=50, max_backoff_s=0.05) as c:
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


def test_a_request_refused_with_503_while_loading_is_retried_until_ready(connect, ref, tmp_path):
    image = png_bytes(51)
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, gated=True, api_key=None) as loading:
        with ThreadPoolExecutor(1) as pool:
            with connect(loading.url, max_retries=100, max_backoff_s=0.05) as c:
                retried = pool.submit(c.embed, [image])

                def refused() -> float:
                    return loading.metric("simmim_requests_total", endpoint="/embed", status="503")

                wait_until(refused, "a 503 while the warm-up is held")
                loading.open_gate()
                vector = retried.result(timeout=60)
    np.testing.assert_allclose(vector, unit(ref.embed([image])), atol=1e-5, rtol=0)


def test_a_draining_server_gets_every_retry_then_service_unavailable(connect, tmp_path):
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, gated=True, api_key=None) as draining:
        draining.open_gate()
        draining.wait_ready()
        draining.close_gate()
        image = base64.b64encode(png_bytes(52)).decode()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(draining.http.post, "/embed", json={"images": [image]})
            wait_until(
                lambda: draining.metric("simmim_running_items", task="embed") == 1,
                "a request held in the model",
            )
            draining.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: draining.http.get("/health/ready").status_code == 503, "draining")
            with connect(draining.url, max_retries=2, max_backoff_s=0.01) as c:
                with pytest.raises(ServiceUnavailableError) as info:
                    c.embed([png_bytes(53)])
            refused = draining.metric("simmim_requests_total", endpoint="/embed", status="503")
            draining.open_gate()
            assert held.result(timeout=60).status_code == 200
        assert draining.proc.wait(60) == 0
    assert info.value.code == "shutting_down" and refused == 3  # the first try and 2 retries


# --- against a scripted transport -------------------------------------------------------------
def scripted(*answers):
    """A transport that plays `answers` in order: an exception to raise or (status, headers);
    .requests counts what it was sent."""
    answers = list(answers)

    def handle(request):
        transport.requests += 1
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer
        body = {"ok": True} if status == 200 else {"error": {"code": "x", "message": "m"}}
        return httpx.Response(status, headers=headers, json=body)

    transport = httpx.MockTransport(handle)
    transport.requests = 0
    return transport


def test_429_503_and_connection_errors_are_retried_until_success(connect):
    refused = httpx.ConnectError("connection refused")
    transport = scripted(refused, (429, {"Retry-After": "1"}), (503, {}), (200, {}))
    with connect("http://test", transport=transport, max_backoff_s=0) as c:
        assert c.info() == {"ok": True}
    assert transport.requests == 4


def test_retries_end_in_the_typed_error_of_the_last_answer(connect):
    transport = scripted(*[(429, {"Retry-After": "1"})] * 3)
    with connect("http://test", transport=transport, max_retries=2, max_backoff_s=0) as c:
        with pytest.raises(QueueFullError) as info:
            c.info()
    assert info.value.retry_after == 1.0 and transport.requests == 3


def test_a_server_never_reached_raises_connection_failed_naming_it(connect):
    refused = httpx.ConnectError("connection refused")
    transport = scripted(refused, refused)
    with connect("http://test", transport=transport, max_retries=1, max_backoff_s=0) as c:
        with pytest.raises(ConnectionFailedError, match="http://test after 2 attempts"):
            c.info()


def test_other_errors_are_not_retried(connect):
    transport = scripted((429, {}), (400, {}))
    with connect("http://test", transport=transport, max_backoff_s=0) as c:
        with pytest.raises(BadRequestError) as info:
            c.info()
    assert info.value.status == 400 and transport.requests == 2


def test_an_unknown_on_error_is_refused_before_anything_is_sent(connect):
    transport = scripted()
    with connect("http://test", transport=transport) as c:
        with pytest.raises(ValueError, match="on_error must be one of"):
            c.embed([b"x"], on_error="ignore")
    assert transport.requests == 0


def test_empty_lists_are_refused_before_anything_is_sent(connect):
    transport = scripted()
    with connect("http://test", transport=transport) as c:
        for call in (
            lambda: c.embed([]),
            lambda: c.similarity([]),
            lambda: c.similarity([b"x"], []),
        ):
            with pytest.raises(ValueError):
                call()
    assert transport.requests == 0


# --- the retry rule, free of I/O: a flow driven by hand ---------------------------------------
def answer(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = {"ok": True} if status == 200 else {"error": {"code": "x", "message": "m"}}
    return httpx.Response(status, headers=headers, json=body)


def play(outcomes: list, **retry) -> tuple[list[float], object]:
    """Run one GET /info through the retry rule, answering its requests with `outcomes` in
    order; returns the sleeps it asked for and its result (or the exception it raised)."""
    options = {"max_retries": 5, "backoff_s": 0.5, "max_backoff_s": 30.0, **retry}
    flow = exchange(Call("GET", "/info"), httpx.Response.json, Retry(**options), "http://test")
    sleeps, outcome = [], None
    while True:
        try:
            step = flow.send(outcome)
        except StopIteration as done:
            return sleeps, done.value
        except Exception as e:
            return sleeps, e
        if isinstance(step, Sleep):
            sleeps.append(step.seconds)
            outcome = None
        else:
            outcome = outcomes.pop(0)


def test_retry_waits_the_servers_retry_after():
    sleeps, result = play([answer(429, "7"), answer(503, "2"), answer(200)])
    assert sleeps == [7.0, 2.0] and result == {"ok": True}


def test_retry_after_is_capped_at_max_backoff_s():
    sleeps, _ = play([answer(429, "7"), answer(200)], max_backoff_s=5.0)
    assert sleeps == [5.0]


def test_retry_backs_off_exponentially_without_retry_after_then_gives_up():
    sleeps, error = play([answer(503)] * 4, max_retries=3, backoff_s=1.0)
    assert isinstance(error, ServiceUnavailableError) and error.status == 503
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):  # jittered within [1/2, 1] of 2**attempt
        assert 2**attempt / 2 <= delay <= 2**attempt


def test_connection_errors_are_retried_with_backoff():
    refused = httpx.ConnectError("connection refused")
    sleeps, result = play([refused, refused, answer(200)], backoff_s=1.0)
    assert result == {"ok": True} and len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1 <= sleeps[1] <= 2


def test_a_read_timeout_is_not_retried():
    timeout = httpx.ReadTimeout("no answer in time")
    sleeps, error = play([timeout])
    assert error is timeout and sleeps == []


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
