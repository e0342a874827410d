"""Dynamic batching and overload against a real server whose model calls can be held by a gate,
so that queue states are reached deterministically (waiting on metrics, not on the clock)."""

from __future__ import annotations

import base64
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_fixtures import Reference, ServerProcess, png_bytes, wait_until

SETTINGS = {
    "SIMMIM_MAX_BATCH_SIZE": "4",
    "SIMMIM_MAX_QUEUE": "5",
    "SIMMIM_MAX_IMAGES": "4",
    "SIMMIM_MAX_WAIT_MS": "5",
}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        tiny_model_dir, tmp_path_factory.mktemp("batching"), env=SETTINGS, gated=True, api_key=None
    ) as s:
        s.open_gate()
        s.wait_ready()
        yield s


@pytest.fixture
def gate_closed(server):
    """The model held for the duration of the test (and released however it ends)."""
    server.close_gate()
    yield
    server.open_gate()


def post_embed(server, images: list[bytes]):
    return server.http.post(
        "/embed",
        json={"images": [base64.b64encode(i).decode() for i in images], "normalize": False},
    )


def held_items(server) -> float:
    return server.metric("simmim_running_items", task="embed")


def queued_items(server) -> float:
    return server.metric("simmim_queue_depth", task="embed")


def test_concurrent_requests_are_batched_and_each_gets_its_own_embedding(
    server, gate_closed, tiny_model_dir
):
    images = [png_bytes(30 + i) for i in range(5)]
    batches_of_3_or_4 = server.batches_of_size("embed", 2, 4)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(post_embed, server, images[:1])
        wait_until(lambda: held_items(server) == 1, "the first request held in the model")
        rest = [pool.submit(post_embed, server, [image]) for image in images[1:]]
        wait_until(lambda: queued_items(server) == 4, "four requests queued behind it")
        server.open_gate()
        responses = [first.result()] + [f.result() for f in rest]
    assert [r.status_code for r in responses] == [200] * 5
    assert server.batches_of_size("embed", 2, 4) == batches_of_3_or_4 + 1  # the four, together
    vectors = np.array([r.json()["embeddings"][0] for r in responses], np.float32)
    np.testing.assert_allclose(vectors, Reference(tiny_model_dir).embed(images), atol=1e-5, rtol=0)


def test_a_full_queue_gets_429_with_retry_after_and_the_server_recovers(server, gate_closed):
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(post_embed, server, [png_bytes(i) for i in range(4)])
        wait_until(lambda: held_items(server) == 4, "a full batch held in the model")
        refused = post_embed(server, [png_bytes(8), png_bytes(9)])  # 4 + 2 > max_queue 5
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        server.open_gate()
        assert holder.result().status_code == 200
    assert post_embed(server, [png_bytes(8), png_bytes(9)]).status_code == 200


def test_a_client_that_goes_away_has_its_queued_items_dropped(server, gate_closed):
    dropped = server.metric("simmim_items_dropped_total", task="embed")
    body = json.dumps({"images": [base64.b64encode(png_bytes(5)).decode()]}).encode()
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(post_embed, server, [png_bytes(4)])
        wait_until(lambda: held_items(server) == 1, "a request held in the model")
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(
                b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: queued_items(server) == 1, "the request queued")
        wait_until(
            lambda: server.metric("simmim_requests_total", endpoint="/embed", status="499") == 1,
            "the server to notice",
        )
        server.open_gate()
        assert holder.result().status_code == 200
    wait_until(
        lambda: server.metric("simmim_items_dropped_total", task="embed") == dropped + 1,
        "the item dropped before batching",
    )
