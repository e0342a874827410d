"""Smoke test of the benchmark command (benchmarks/run.py --quick): it runs end to end on the tiny
model and writes the JSON, markdown and PNG with the expected keys. No timing is asserted. And
the load generator's one failure path (a server that closes connections without answering), and
its open loop's scheduler, which must sleep between requests rather than spin."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading

import pytest
import uvloop
from service_fixtures import ROOT

from benchmarks.loadgen import run, run_open


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_png(tmp_path, tiny_model_dir, tiny_run_dir):
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--default-model",
        str(tiny_model_dir),
        "--default-checkpoint",
        str(tiny_run_dir / "checkpoint.pt"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r = json.loads((out / "results.json").read_text())
    for key in (
        "machine",
        "models",
        "workloads",
        "images",
        "engine",
        "rounds",
        "service",
        "naive",
        "breakdown",
        "targets",
        "load",
        "duration_s",
    ):
        assert key in r, key
    assert r["quick"] is True and r["machine"]["logical_cpus"] >= 1
    assert {"onnxruntime", "numpy"} <= set(r["machine"]["versions"])
    assert set(r["engine"]["default"]) == {"ort_fp32", "ort_fp32_1call", "ort_int8", "torch_eager"}
    assert set(r["engine"]["default"]["ort_fp32"]) == {"1", "16"}
    assert {(row["workload"], row["batching"]) for row in r["service"]} >= {
        ("small", "on"),
        ("small", "off"),
        ("photo", "on"),
        ("photo", "off"),
    }
    for w in ("small", "photo"):
        [row] = r["rounds"][w]["rounds"]  # one round when quick
        assert {"engine_fp32_b1", "engine_fp32_b16", "on", "on_1process", "off", "naive"} <= set(
            row
        )
    assert {"int8", "engine_int8_b16"} <= set(r["rounds"]["photo"]["rounds"][0])
    for row in r["service"] + r["naive"]:
        assert row["statuses"] == {"200": row["requests"]}, row["statuses"]
        assert row["img_s"] > 0 and set(row["latency_ms"]) >= {"p50", "p95", "p99"}
    for row in r["service"]:
        assert set(row["server_ms"]) == {"decode", "queue", "inference", "serialize"}
    assert {row["workload"] for row in r["naive"]} == {"small", "photo"}
    for stages in r["breakdown"].values():
        assert {
            "parse_json_ms",
            "base64_ms",
            "decode_ms",
            "preprocess_ms",
            "inference_b1_ms",
            "serialize_ms",
        } <= set(stages["stages_ms"])
    assert len(r["targets"]) == 7
    assert all(t["status"] == "n/a" for t in r["targets"])  # quick: not a measurement

    md = (out / "results.md").read_text()
    for heading in ("## Targets", "## Engine", "## End to end", "## Where the time goes"):
        assert heading in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_load_generator_reports_a_server_that_closes_without_answering():
    listener = socket.create_server(("127.0.0.1", 0))

    def close_every_connection() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener is closed: done
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=close_every_connection, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/embed"
    try:
        result = asyncio.run(
            run(
                url,
                [b"{}"],
                [1],
                concurrency=2,
                max_requests=10,
                seconds=0.5,
                warmup_s=0.1,
                timeout=2.0,
            )
        )
    finally:
        listener.close()
    assert result["requests_sent"] == 0 and result["unfinished_connections"] == 0
    assert len(result["connection_errors"]) == 2
    assert all("before answering" in e for e in result["connection_errors"])


class Refuser(asyncio.Protocol):
    """Answers every POST at once with a 429, as an overloaded server's fast path does."""

    ANSWER = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.ANSWER * data.count(b"POST "))


def test_the_open_loop_sleeps_between_requests_instead_of_spinning():
    # uvloop's timers count whole milliseconds: a scheduler that sleeps until a request due in
    # 0.5 ms spins (hundreds of thousands of wake-ups a second, a whole core). It must wake
    # at most about once a millisecond, sending every request due by then.
    async def main() -> dict:
        server = await asyncio.get_running_loop().create_server(Refuser, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run_open(
                f"http://127.0.0.1:{port}/embed",
                [b"{}"],
                [1],
                rate=2000,
                connections=16,
                seconds=1.0,
                warmup_s=0.1,
                timeout=2.0,
            )
        finally:
            server.close()

    result = uvloop.run(main())
    assert result["statuses"] == {"429": result["requests"]} and result["requests"] > 1000
    assert result["scheduler_wakeups"] < result["requests_sent"] / 1.5


@pytest.mark.slow
def test_retrieval_benchmark_smoke_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.retrieval", "--limit", "120", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r = json.loads((out / "results.json").read_text())
    assert (r["data"]["train_images"], r["data"]["test_images"]) == (120, 20)
    assert r["embed"]["failed"] == 0 and r["embed"]["max_abs_diff_vs_engine"] < 1e-4
    assert r["index"]["vectors"] == 120 and r["queries"]["queries"] == 20
    assert 0 <= r["queries"]["recall_at_10"] <= 1 and r["queries"]["qps"] > 0
    assert [t["needed"] for t in r["targets"]] == [0.8, 0.95]
    text = (out / "results.md").read_text()
    assert "## Targets" in text and "recall@10" in text


@pytest.mark.slow
def test_the_training_step_benchmark_times_each_arm_in_both_layouts(tmp_path):
    out = tmp_path / "train_step"
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--out", str(out)]
    cmd += ["--arms", "none", "perceptual", "--seconds", "0.1", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    for arm in ("none", "perceptual"):
        for layout in ("one_process", "side_by_side"):
            assert r["median_img_s"][arm][layout] > 0
    assert "| perceptual |" in (out / "table.md").read_text()


def write_idx(path, array) -> None:
    """`array` (uint8) in the idx format Fashion-MNIST ships in."""
    dims = b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + dims + array.tobytes())


@pytest.mark.slow
def test_the_ablation_trains_unfinished_arms_side_by_side_each_logging_to_its_run(
    tmp_path, monkeypatch
):
    import numpy as np

    from benchmarks.fmnist_ablation import finished, pretrain_arms

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 100)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), "u1"))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, "u1"))
    monkeypatch.setenv("SIMMIM_FMNIST_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    pretrain_arms(["none", "cosine"], runs, epochs=1, jobs=2)
    for arm in ("none", "cosine"):
        assert finished(runs / arm)
        assert "pretraining vit_tiny" in (runs / arm / "pretrain.log").read_text()
    logged = (runs / "none" / "pretrain.log").stat().st_mtime
    pretrain_arms(["none"], runs, epochs=1, jobs=2)  # finished: not trained again
    assert (runs / "none" / "pretrain.log").stat().st_mtime == logged


def test_the_ablation_keeps_the_arms_of_its_earlier_results_that_it_does_not_retrain(tmp_path):
    from benchmarks.fmnist_ablation import kept_arms

    path = tmp_path / "results.json"
    arms = {arm: {"online": [], "seconds": 1.0} for arm in ("none", "cosine")}
    path.write_text(json.dumps({"epochs": 16, "arms": arms, "pixels": {}}))
    assert kept_arms(path, 16, ["cosine", "perceptual"]) == {"none": arms["none"]}
    assert kept_arms(tmp_path / "absent.json", 16, ["none"]) == {}


def test_the_ablation_refuses_to_merge_arms_trained_for_another_number_of_epochs(tmp_path):
    from benchmarks.fmnist_ablation import kept_arms

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"epochs": 16, "arms": {}, "pixels": {}}))
    with pytest.raises(SystemExit, match="16-epoch arms, not 8"):
        kept_arms(path, 8, ["none"])
