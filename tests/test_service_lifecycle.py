"""Start-up, request timeouts and shutdown, each against a server of its own (a gate holds the
model calls, so every state is reached deterministically)."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_fixtures import LAUNCHER, Reference, ServerProcess, free_port, png_bytes, wait_until


def post_embed(server, images: list[bytes]):
    return server.http.post(
        "/embed",
        json={"images": [base64.b64encode(i).decode() for i in images], "normalize": False},
    )


def test_not_ready_until_warm_up_finishes(tiny_model_dir, tmp_path):
    with ServerProcess(tiny_model_dir, tmp_path, gated=True) as server:  # warm-up held
        assert server.http.get("/health/live").status_code == 200
        ready = server.http.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        refused = post_embed(server, [png_bytes(0)])
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["retry-after"] == "1"
        assert server.metric("simmim_ready") == 0
        server.open_gate()
        server.wait_ready()
        assert post_embed(server, [png_bytes(0)]).status_code == 200


def test_a_request_waiting_past_the_timeout_gets_504_and_its_items_are_dropped(
    tiny_model_dir, tmp_path
):
    settings = {"SIMMIM_REQUEST_TIMEOUT_S": "0.5", "SIMMIM_MAX_WAIT_MS": "0"}
    with ServerProcess(tiny_model_dir, tmp_path, env=settings, gated=True, api_key=None) as server:
        server.open_gate()
        server.wait_ready()
        server.close_gate()
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(post_embed, server, [png_bytes(1)])
            wait_until(
                lambda: server.metric("simmim_running_items", task="embed") == 1,
                "a request held in the model",
            )
            queued = pool.submit(post_embed, server, [png_bytes(2)])
            for response in (held.result(), queued.result()):
                assert response.status_code == 504
                assert response.json()["error"]["code"] == "timeout"
        server.open_gate()
        wait_until(
            lambda: server.metric("simmim_items_dropped_total", task="embed") == 1,
            "the queued item dropped before batching",
        )
        assert post_embed(server, [png_bytes(3)]).status_code == 200


def test_sigterm_drains_admitted_requests_then_exits_0(tiny_model_dir, tmp_path):
    images = [png_bytes(60 + i) for i in range(3)]
    with ServerProcess(tiny_model_dir, tmp_path, gated=True, api_key=None) as server:
        server.open_gate()
        server.wait_ready()
        server.close_gate()
        with ThreadPoolExecutor(3) as pool:
            admitted = [pool.submit(post_embed, server, [image]) for image in images]
            wait_until(
                lambda: (
                    server.metric("simmim_running_items", task="embed")
                    + server.metric("simmim_queue_depth", task="embed")
                    == 3
                ),
                "three requests admitted",
            )
            server.proc.send_signal(signal.SIGTERM)
            ready = wait_until(
                lambda: (r := server.http.get("/health/ready")).status_code == 503 and r,
                "readiness to turn 503",
            )
            assert ready.json()["error"]["code"] == "shutting_down"
            refused = post_embed(server, [png_bytes(0)])
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert server.proc.poll() is None  # still finishing the admitted work
            server.open_gate()
            responses = [f.result() for f in admitted]
        assert [r.status_code for r in responses] == [200] * 3
        vectors = np.array([r.json()["embeddings"][0] for r in responses], np.float32)
        np.testing.assert_allclose(
            vectors, Reference(tiny_model_dir).embed(images), atol=1e-5, rtol=0
        )
        assert server.proc.wait(60) == 0
        assert "drained" in server.log()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_model_that_fails_to_load_stops_the_server_with_status_1(
    tiny_model_dir, tmp_path, processes
):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    card = json.loads((broken / "model.json").read_text())
    card["embedding_dim"] += 1  # disagrees with encoder.onnx's output
    (broken / "model.json").write_text(json.dumps(card))
    result = subprocess.run(
        [
            sys.executable,
            str(LAUNCHER),
            "--model-dir",
            str(broken),
            "--port",
            str(free_port()),
            "--processes",
            processes,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"{broken / 'encoder.onnx'}: output 'embedding' has shape" in result.stderr
