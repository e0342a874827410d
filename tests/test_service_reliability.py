"""The service under hostile or unlucky clients, each case against a real `simmim serve` on
loopback (the dummy backend; a gate holds model calls where a state must be reached): overload
is refused before the body is read, slow or idle connections are closed, a connection limit
answers clearly, a client gone mid-upload is a 499, shutdown keeps to its drain timeout, and a
worker that dies takes its process down cleanly. Speed under overload is measured in
benchmarks/reliability.py, not here."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from dummy_backend import DummyBackend
from service_fixtures import (
    LAUNCHER,
    InProcessServer,
    ServerProcess,
    free_port,
    png_bytes,
    wait_until,
)

from service.app import create_app
from service.settings import Settings, default_model_path

MODEL_DIR = default_model_path()
IMAGE = base64.b64encode(png_bytes(0)).decode()
BODY = json.dumps({"images": [IMAGE]}).encode()


def head(path: str = "/embed", length: int = len(BODY), extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response read from `sock`."""
    return read_from(sock.makefile("rb"))


def read_from(stream) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the next response in a socket's buffered `stream` (one
    stream per socket where responses may arrive together: a stream's buffer may hold more
    than one)."""
    status = int(stream.readline().split()[1])
    headers = {}
    for line in iter(stream.readline, b"\r\n"):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", 0)))


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (what is left to read is read)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(60)
    return sock


def post_embed(server, n: int = 1):
    return server.http.post("/embed", json={"images": [IMAGE] * n})


# --- admission before the body --------------------------------------------------------------
@pytest.fixture
def held(tmp_path):
    """A gated server (one process, one model call) whose queue of 4 images is full: a running
    call holds 1 image, 3 more are queued. Yields (server, the pending requests)."""
    env = {"SIMMIM_MAX_QUEUE": "4", "SIMMIM_MAX_IMAGES": "3", "SIMMIM_MAX_BATCH_SIZE": "1"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, gated=True, api_key=None) as s:
        s.open_gate()
        s.wait_ready()
        s.close_gate()
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(post_embed, s, 1)]
            wait_until(lambda: s.metric("simmim_running_items", task="embed") == 1, "a call")
            pending.append(pool.submit(post_embed, s, 3))
            wait_until(lambda: s.metric("simmim_queue_depth", task="embed") == 3, "a full queue")
            yield s, pending
            s.open_gate()
            assert [r.result().status_code for r in pending] == [200, 200]


def test_a_full_queue_answers_429_before_reading_the_body(held):
    server, _ = held
    with connect(server) as sock:
        sock.sendall(head(length=1_000_000))  # the body never comes
        status, headers, body = read_response(sock)
    assert status == 429 and json.loads(body)["error"]["code"] == "queue_full"
    assert int(headers["retry-after"]) >= 1


def test_an_early_refusal_under_v1_takes_openais_error_shape(held):
    server, _ = held
    with connect(server) as sock:
        sock.sendall(head(path="/v1/embeddings", length=1_000_000))
        status, _, body = read_response(sock)
    error = json.loads(body)["error"]
    assert status == 429 and error["type"] == "rate_limit_error"
    assert error["code"] == "queue_full" and error["message"]


LIVE = b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n"


def test_a_request_refused_whole_leaves_its_keep_alive_connection_ready_for_the_next(held):
    server, _ = held
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(head() + BODY)  # head and body in one write: the screen's fast path
            assert read_response(sock)[0] == 429
        sock.sendall(LIVE)
        assert read_response(sock)[0] == 200


def test_a_connection_resending_refused_requests_gets_one_refusal_per_interval(held):
    server, _ = held
    interval = 0.1  # refusal_interval_ms, by default
    with connect(server) as sock:
        stream = sock.makefile("rb")
        sock.sendall(head() + BODY)
        assert read_from(stream)[0] == 429
        started = time.monotonic()
        for _ in range(3):
            sock.sendall(head() + BODY)  # at once, as a closed loop with no backoff does
            assert read_from(stream)[0] == 429
        # the second came at once or later, the third and fourth an interval apart each
        assert time.monotonic() - started >= 2 * interval
        sock.sendall(LIVE)
        assert read_from(stream)[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        head() + BODY + head() + BODY,  # pipelined
        head(length=0, extra="Transfer-Encoding: chunked\r\n").replace(
            b"Content-Length: 0\r\n", b""
        )
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY),
    ],
    ids=["pipelined", "chunked"],
)
def test_requests_of_other_shapes_are_refused_by_the_parser_and_the_connection_stays_in_step(
    held, request_bytes
):
    server, _ = held
    with connect(server) as sock:
        stream = sock.makefile("rb")
        sock.sendall(request_bytes)
        for _ in range(request_bytes.count(b"POST")):
            assert read_from(stream)[0] == 429
        sock.sendall(LIVE)
        assert read_from(stream)[0] == 200


def test_a_malformed_request_gets_the_parsers_400_even_under_overload(held):
    server, _ = held
    with connect(server) as sock:
        sock.sendall(head(extra=f"Content-Length: {len(BODY)}\r\n") + BODY)  # length twice
        assert read_response(sock)[0] == 400
        assert closed_by_server(sock)


def test_429s_are_logged_once_per_interval_with_their_count(held):
    server, _ = held
    before = server.metric("simmim_requests_total", endpoint="/embed", status="429")
    statuses = [post_embed(server).status_code for _ in range(20)]
    assert statuses == [429] * 20
    assert server.metric("simmim_requests_total", endpoint="/embed", status="429") == before + 20
    lines = [line for line in server.log().splitlines() if "status=429" in line]
    assert len(lines) == 1 and "count=1" in lines[0]  # the first; the rest are counted


def test_bodies_beyond_the_bytes_in_flight_get_429_at_once(tmp_path):
    env = {"SIMMIM_MAX_REQUEST_BYTES": "1000000", "SIMMIM_MAX_BODY_BYTES_IN_FLIGHT": "2500000"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        slow = [connect(server) for _ in range(3)]
        try:
            for sock in slow[:2]:  # admitted: 2 x 1,000,000 declared bytes, bodies held back
                sock.sendall(head(length=1_000_000) + b'{"images": ["')
            wait_until(lambda: server.metric("simmim_requests_in_flight") == 2, "2 admitted")
            slow[2].sendall(head(length=1_000_000))
            status, _, body = read_response(slow[2])
            assert status == 429 and b"request bodies in flight" in body
            assert post_embed(server).status_code == 200  # small bodies still fit
        finally:
            for sock in slow:
                sock.close()


# --- connections ------------------------------------------------------------------------------
def test_a_body_answered_before_it_ends_is_read_as_body_and_the_connection_serves_the_next(
    tmp_path,
):
    env = {"SIMMIM_MAX_REQUEST_BYTES": "100000"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        with connect(server) as sock:
            stream = sock.makefile("rb")
            sock.sendall(head(length=300_000))
            assert read_from(stream)[0] == 413  # by its Content-Length, before its body
            sock.sendall(b"x" * 300_000)  # over the head size limit: still this request's body
            sock.sendall(head() + BODY)
            assert read_from(stream)[0] == 200


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_closed(tmp_path):
    env = {"SIMMIM_BODY_TIMEOUT_S": "1"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        with connect(server) as sock:
            sock.sendall(head(length=len(BODY)) + BODY[:10])
            status, _, body = read_response(sock)
            assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
            assert closed_by_server(sock)
        wait_until(
            lambda: server.metric("simmim_requests_total", endpoint="/embed", status="408"),
            "the request counted as 408",
        )


def test_a_request_head_that_does_not_arrive_in_time_gets_408_and_is_closed(tmp_path):
    env = {"SIMMIM_HEADER_TIMEOUT_S": "1"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        with connect(server) as idle, connect(server) as slow:
            slow.sendall(b"POST /embed HTTP/1.1\r\nHost: te")  # and no more
            for sock in (idle, slow):
                status, _, body = read_response(sock)
                assert status == 408 and json.loads(body)["error"]["code"] == "header_timeout"
                assert closed_by_server(sock)


def test_an_idle_keep_alive_connection_is_closed_quietly_after_keep_alive_s(tmp_path):
    env = {"SIMMIM_KEEP_ALIVE_S": "1", "SIMMIM_HEADER_TIMEOUT_S": "600"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        with connect(server) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(sock)[0] == 200
            # within connect()'s 60 s: far beyond keep_alive_s, far below the header timeout;
            # closed with no answer (a 408 would be the header timeout's)
            assert sock.recv(65536) == b""


def test_at_the_connection_limit_a_new_connection_replaces_the_oldest_idle_one(tmp_path):
    env = {"SIMMIM_MAX_CONNECTIONS": "3"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        idle = [connect(server) for _ in range(3)]  # never send anything
        try:
            with connect(server) as extra:
                extra.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
                assert read_response(extra)[0] == 200
            assert closed_by_server(idle[0])  # the oldest made room
        finally:
            for sock in idle:
                sock.close()


def test_when_every_connection_has_a_request_in_progress_a_new_one_gets_503(tmp_path):
    env = {"SIMMIM_MAX_CONNECTIONS": "3", "SIMMIM_BODY_TIMEOUT_S": "600"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        server.http.close()  # its idle connection would only make room
        busy = [connect(server) for _ in range(3)]
        try:
            for sock in busy:  # in progress: the server asks for the body, which never comes
                sock.sendall(head(length=len(BODY), extra="Expect: 100-continue\r\n"))
                assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
            with connect(server) as extra:
                extra.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
                status, headers, body = read_response(extra)
                assert status == 503 and headers["retry-after"] == "1"
                assert json.loads(body)["error"]["code"] == "too_many_connections"
                assert closed_by_server(extra)
        finally:
            for sock in busy:
                sock.close()


def test_a_client_gone_mid_upload_is_counted_499_without_a_traceback(tmp_path):
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, api_key=None) as server:
        server.wait_ready()
        with connect(server) as sock:
            sock.sendall(head(length=len(BODY)) + BODY[:100])
        wait_until(
            lambda: server.metric("simmim_requests_total", endpoint="/embed", status="499"),
            "the request counted as 499",
        )
        assert server.metric("simmim_requests_total", endpoint="/embed", status="500") == 0
        assert "Traceback" not in server.log()


# --- one server per port ---------------------------------------------------------------------
def test_a_second_server_on_a_served_port_refuses_to_start_naming_it(tmp_path):
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, processes=2, api_key=None) as first:
        first.wait_ready()
        second = subprocess.run(
            [sys.executable, str(LAUNCHER), "--dummy", "--model-dir", str(MODEL_DIR)]
            + ["--port", str(first.port), "--processes", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr
        assert post_embed(first).status_code == 200  # the first one keeps its traffic


# --- shutdown ----------------------------------------------------------------------------------
def test_after_the_drain_timeout_the_remaining_connections_are_cut_and_the_server_exits_0(
    tmp_path,
):
    env = {"SIMMIM_DRAIN_TIMEOUT_S": "1", "SIMMIM_BODY_TIMEOUT_S": "600"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as server:
        server.wait_ready()
        with connect(server) as slow:  # admitted, sending its body a byte at a time
            slow.sendall(head(length=len(BODY)) + BODY[:1])
            wait_until(lambda: server.metric("simmim_requests_in_flight") == 1, "admitted")
            server.proc.send_signal(signal.SIGTERM)
            # the body would take 600 s more; the drain gives it 1 s, then the server exits
            assert server.proc.wait(60) == 0
            assert closed_by_server(slow)
        assert re.search(
            r"cutting \d+ connections still open after the drain timeout", server.log()
        )
        assert "status=499" in server.log()  # the cut request, ended as its client left


# --- supervision -----------------------------------------------------------------------------
def test_a_backend_that_raises_fails_its_requests_with_500_and_the_server_keeps_serving(tmp_path):
    with ServerProcess(MODEL_DIR, tmp_path, dummy=True, fail="raise", api_key=None) as server:
        server.wait_ready()
        for _ in range(3):
            r = post_embed(server)
            assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
        assert server.http.get("/health/ready").status_code == 200
        assert server.proc.poll() is None


class DescribeBug(DummyBackend):
    """A bug outside the model calls: describe(), which GET /info reads, raises."""

    def describe(self) -> dict:
        raise KeyError("a field the backend forgot")


def test_a_bug_outside_the_model_is_a_500_internal_logged_with_its_traceback_and_request_id(
    caplog,
):
    settings = Settings(api_key=None, processes=1, workers=1, tune_batch_size=False)
    with InProcessServer(create_app(settings, DescribeBug), free_port()) as server:
        server.wait_ready()
        r = server.http.get("/info", headers={"x-request-id": "bug-1"})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal"
        assert "forgot" not in r.text  # the details go to the log, not to the client
        # uvicorn closes the connection of a request that raised; the server keeps serving
        assert httpx.get(f"{server.url}/health/live").status_code == 200
    [record] = [rec for rec in caplog.records if rec.getMessage() == "unhandled error on GET /info"]
    assert record.exc_info[0] is KeyError and record.request_id == "bug-1"


def test_a_model_worker_that_dies_fails_every_pending_request_at_once_and_exits_1(tmp_path):
    env = {"SIMMIM_MAX_BATCH_SIZE": "1", "SIMMIM_REQUEST_TIMEOUT_S": "600"}
    with ServerProcess(
        MODEL_DIR, tmp_path, env=env, dummy=True, fail="kill", gated=True, api_key=None
    ) as server:
        server.open_gate()
        server.wait_ready()
        server.close_gate()
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(post_embed, server) for _ in range(3)]
            wait_until(
                lambda: (
                    server.metric("simmim_running_items", task="embed")
                    + server.metric("simmim_queue_depth", task="embed")
                    == 3
                ),
                "three requests admitted",
            )
            server.open_gate()  # the held call now kills its worker
            answers = [f.result() for f in pending]
        assert [r.status_code for r in answers] == [503] * 3  # at once, not timeouts (504)
        assert {r.json()["error"]["code"] for r in answers} == {"worker_failed"}
        assert server.proc.wait(60) == 1
        assert "the embed batcher died (a model call raised WorkerKilled)" in server.log()


# --- the API's own documentation ---------------------------------------------------------------
@pytest.mark.parametrize(
    "docs, served, guarded", [("key", True, True), ("public", True, False), ("off", False, False)]
)
def test_the_docs_setting_decides_who_may_read_the_openapi_schema(docs, served, guarded):
    """With an API key set (the HTTP side of "key" is in test_service_api.py)."""
    app = create_app(Settings(api_key="k", docs=docs), backend=DummyBackend)
    routes = {route.path: route for route in app.routes}
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert (path in routes) is served, path
        if served:
            assert bool(routes[path].dependencies) is guarded, path
