"""Several server processes on one port (`--processes 2`, the default on a CPU with 2 cores or
more): both serve, metrics and readiness cover both, signals reach both, and none outlives the
server."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from dummy_backend import DummyBackend
from service_fixtures import LAUNCHER, Reference, ServerProcess, png_bytes, wait_until

from service.engine import READY, Engine
from service.errors import NotReady
from service.metrics import Metrics
from service.processes import Peers
from service.settings import Settings, default_model_path
from simmim_core.model_dir import load_model_dir


def server_processes(pid: int) -> set[int]:
    """The children of `pid` that run a server (not multiprocessing's resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    pids = {int(c) for c in path.read_text().split()} if path.exists() else set()
    return {c for c in pids if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def serving_processes(server: ServerProcess, connections: int = 48) -> set[int]:
    """The pids that answered /info, each request on a connection of its own, 8 at a time."""

    def info_pid(_) -> int:
        with httpx.Client(base_url=server.url, headers=server.http.headers) as client:
            return client.get("/info").json()["process"]["pid"]

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(info_pid, range(connections)))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # admission by expected wait (0.25 s by default) would refuse some of the concurrent
    # requests below on a loaded machine: these tests are about the processes, not overload
    env = {"SIMMIM_MAX_QUEUE_WAIT_S": "30"}
    folder = tmp_path_factory.mktemp("processes")
    with ServerProcess(tiny_model_dir, folder, processes=2, env=env) as s:
        s.wait_ready()
        yield s


def test_both_processes_take_connections(server):
    expected = server_processes(server.proc.pid)
    assert len(expected) == 2
    wait_until(
        lambda: serving_processes(server) == expected, "both processes to answer", timeout=30
    )


def test_every_process_answers_with_the_same_model(server, tiny_model_dir):
    images = [png_bytes(70 + i) for i in range(16)]

    def embed(image: bytes) -> tuple[str, list[float]]:
        """(the answering process's request-id prefix, the embedding)"""
        with httpx.Client(base_url=server.url, headers=server.http.headers) as client:
            response = client.post(
                "/embed", json={"images": [base64.b64encode(image).decode()], "normalize": False}
            )
            assert response.status_code == 200
            return response.headers["x-request-id"][:8], response.json()["embeddings"][0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(embed, images))
    assert len({prefix for prefix, _ in answers}) == 2  # both processes answered
    expected = Reference(tiny_model_dir).embed(images)
    assert max(abs(a - b) for (_, v), e in zip(answers, expected) for a, b in zip(v, e)) < 1e-5


def test_metrics_add_up_over_the_processes(server):
    before = server.metric("simmim_requests_total", endpoint="/embed", status="200")
    images_before = server.metric("simmim_images_total", task="embed")
    image = base64.b64encode(png_bytes(1)).decode()

    def embed(_) -> int:
        with httpx.Client(base_url=server.url, headers=server.http.headers) as client:
            return client.post("/embed", json={"images": [image, image]}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(embed, range(24))) == {200}
    assert server.metric("simmim_requests_total", endpoint="/embed", status="200") == before + 24
    assert server.metric("simmim_images_total", task="embed") == images_before + 48
    assert server.metric("simmim_ready") == 1
    assert "process_cpu_seconds_total" not in server.http.get("/metrics").text


def test_info_names_the_process_and_its_share_of_the_model_calls(server):
    info = server.http.get("/info").json()
    assert info["process"]["of"] == 2 and info["process"]["index"] in (0, 1)
    assert info["backend"]["workers"] == 2 and info["backend"]["threads"] == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_server_drains_every_process_then_exits_0(tiny_model_dir, tmp_path, sig):
    with ServerProcess(tiny_model_dir, tmp_path, processes=2, api_key=None) as server:
        server.wait_ready()
        pids = server_processes(server.proc.pid)
        server.proc.send_signal(sig)
        assert server.proc.wait(60) == 0
        assert server.log().count("drained") == 2
        assert not any(alive(pid) for pid in pids)


def test_the_processes_stop_when_the_parent_is_killed(tiny_model_dir, tmp_path):
    with ServerProcess(tiny_model_dir, tmp_path, processes=2, api_key=None) as server:
        server.wait_ready()
        pids = server_processes(server.proc.pid)
        assert len(pids) == 2
        server.proc.kill()
        server.proc.wait()
        wait_until(lambda: not any(alive(pid) for pid in pids), "the orphans to stop")
        assert server.log().count("the parent process is gone; stopping") == 2


def test_a_process_that_dies_stops_the_server_with_status_1(tiny_model_dir, tmp_path):
    with ServerProcess(tiny_model_dir, tmp_path, processes=2, api_key=None) as server:
        server.wait_ready()
        victim, survivor = sorted(server_processes(server.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert server.proc.wait(60) == 1
        assert not alive(survivor)
        assert f"server process {victim} exited with status -9; stopping the others" in server.log()


def test_a_port_in_use_exits_1_naming_it(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                str(LAUNCHER),
                "--model-dir",
                str(tiny_model_dir),
                "--port",
                str(port),
                "--processes",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_ready_only_once_every_process_is_ready():
    flags = [0, 0]
    engine = Engine(
        Settings(),
        load_model_dir(default_model_path()),
        Metrics(),
        Peers(0, flags),
        DummyBackend,
    )
    engine.state = READY  # as after loading, without starting the model
    flags[0] = 1
    with pytest.raises(NotReady, match="1 of 2 server processes are ready"):
        engine.check_all_ready()
    engine.check_ready()  # its own requests are served meanwhile
    flags[1] = 1
    engine.check_all_ready()


def test_a_process_marks_itself_ready_and_not_ready():
    flags = [0, 0, 0]
    peers = Peers(1, flags, parent_pid=os.getppid())
    peers.set_ready(True)
    assert flags == [0, 1, 0] and peers.ready_count() == 1 and not peers.orphaned()
    peers.set_ready(False)
    assert peers.ready_count() == 0
