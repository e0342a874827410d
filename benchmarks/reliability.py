"""Reliability under hostile load: issue 15's defects, reproduced black-box against `simmim serve`
(the embedded default model, 2 server processes, default settings unless a scenario says) on
loopback, with the figures that show each is bounded now.

usage: python -m benchmarks.reliability --out benchmarks/results/reliability [--rounds 3]

Writes OUT/reliability.json and OUT/reliability.md (about 10 minutes here). Scenarios:
  overload     per round: capacity (the images answered 200 per second by closed loops of 16
               and of 64 connections, the better of the two; one small image per request),
               then an open loop at 3x that rate (512 connections), then capacity again; the
               goodput (images answered 200 per second) is compared with the mean of the two
               capacities around it (the machine is shared: its speed drifts; and a queue kept
               full batches better than a closed loop, so a ratio can pass 1).
               /health/live is probed every 0.1 s meanwhile. The server's CPU (its process
               tree) and its own count of answers give its CPU per 200 (capacity runs) and
               what its CPU under overload leaves for each 429 (an upper bound: anything
               else overload costs is charged to the 429s); the load generator's CPU is
               reported beside.
  overload_apart  the same, with the server on every CPU but the last and the load generator
               and the prober on the last, as if the clients were on another machine.
  resend       a closed loop of 64 connections that resends each refused request at once (no
               backoff), against one server process on every CPU but the last (the load
               generator on the last) whose max_queue_wait_s (0.05 s) keeps refusing part of
               it: images answered 200 and refusals per second, and the server's CPU, with
               refusal_interval_ms 0 (every refusal at once) and the default (100), in
               alternation, a fresh server each time.
  memory       peak memory of the process tree over its idle level: an extreme aspect ratio
               (one request of two 3,300,000 x 2 gray PNGs, 6 KB each), 16-bit PNGs (6
               concurrent requests of 4 gray 6000 x 6600 16-bit PNGs), and 40 connections that
               each hold back the last byte of a 19.6 MB body.
  json         4 concurrent bodies of 6.9 MB with 500,000 unknown keys: answers, their size,
               and /health/live meanwhile.
  connections  2,200 idle connections to a server limited to 1,024 open files: how many the
               server closes, and how normal requests fare meanwhile.
  port         a second `simmim serve` on the port of a running one.
  shutdown     SIGTERM while a client sends its body at 1 byte/s: seconds until the server
               exits, against its drain timeout (30 s).
  disconnect   a client that leaves in the middle of its body: the status it is counted with.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from service.settings import default_model_path

from .images import find_photos, tiny_images, write_bodies
from .procmem import MIB, Sampler, cpu_seconds, tree
from .servers import ROOT, simmim_serve

MODEL_DIR = default_model_path()


# --- clients ---------------------------------------------------------------------------------
def raw_request(port: int, data: bytes, timeout: float = 120) -> tuple[int, bytes]:
    """Send `data` (a whole HTTP/1.1 request, Connection: close) and return (status, body);
    status 0: the server closed the connection without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


class Liveness(threading.Thread):
    """GET /health/live on a new connection every 0.1 s; latencies in ms, statuses."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop = port, threading.Event()
        self.ms: list[float] = []
        self.statuses: dict[str, int] = {}

    def run(self) -> None:
        request = b"GET /health/live HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        while not self.stop.wait(0.1):
            start = time.perf_counter()
            try:
                status = str(raw_request(self.port, request, timeout=30)[0])
            except OSError as e:
                status = type(e).__name__
            self.ms.append((time.perf_counter() - start) * 1e3)
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def summary(self) -> dict:
        self.stop.set()
        self.join()
        ms = np.array(self.ms or [0.0])
        return {
            "probes": len(self.ms),
            "statuses": self.statuses,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max()),
        }


def taskset(cpus: str | None) -> list[str]:
    """The command prefix that runs a command on `cpus` (taskset's list); none for None."""
    return ["taskset", "-c", cpus] if cpus else []


def loadgen(url: str, bodies: Path, *args: str, cpus: str | None = None) -> dict:
    """benchmarks.loadgen's result; on the CPUs `cpus` (taskset's list) if given."""
    out = subprocess.run(
        [*taskset(cpus), sys.executable, "-m", "benchmarks.loadgen", url, str(bodies), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


def image_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def embed_body(images: list[bytes]) -> bytes:
    return json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode()


@contextmanager
def server(work: Path, name: str, settings: dict | None = None, prefix: list[str] = ()):
    srv = simmim_serve(MODEL_DIR, work / f"{name}.log", settings)
    srv.cmd = [*prefix, *srv.cmd]
    with srv:
        yield srv


# --- scenarios -------------------------------------------------------------------------------
@contextmanager
def pinned(cpus: set[int] | None):
    """This process (its threads) on `cpus` meanwhile; None: unchanged."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def answered(srv) -> dict[str, float]:
    """/embed answers counted by the server so far, by status."""
    prefix = "simmim_requests_total{endpoint=/embed,status="
    return {k[len(prefix) : -1]: v for k, v in srv.metrics().items() if k.startswith(prefix)}


def accounted(srv, url: str, bodies: Path, *args: str, cpus: str | None = None) -> dict:
    """One loadgen run, with the server's CPU seconds (its whole process tree) and the answers it
    counted over the run (warm-up and drain included)."""
    pids = tree(srv.proc.pid)
    counts0, cpu0 = answered(srv), cpu_seconds(pids)
    run = loadgen(url, bodies, *args, cpus=cpus)
    cpu, counts = cpu_seconds(pids) - cpu0, answered(srv)
    run["server_cpu_s"] = cpu
    run["server_answers"] = {k: v - counts0.get(k, 0) for k, v in counts.items()}
    return run


def small_bodies(work: Path) -> Path:
    """/embed bodies of one small image each (64 photographs, 32 px gray PNGs), as JSON lines
    for the load generator."""
    files, _ = find_photos()
    photos = [f.read_bytes() for f in files]
    return write_bodies(tiny_images(photos, 32, "L", 64), work / "small.jsonl")


def overload(work: Path, rounds: int, seconds: float, apart: bool) -> dict:
    """apart: the server on all CPUs but the last, the load generator and the /health/live
    prober on the last (as if the clients were another machine); else all share every CPU."""
    bodies = small_bodies(work)
    out = []
    cpus = sorted(os.sched_getaffinity(0))
    if apart and len(cpus) < 2:
        return {"skipped": f"{len(cpus)} CPU: no CPU to keep the load generator apart"}
    server_cpus = ",".join(map(str, cpus[:-1])) if apart else None
    client_cpus = str(cpus[-1]) if apart else None
    prefix = taskset(server_cpus)
    with server(work, "overload", prefix=prefix) as srv, pinned({cpus[-1]} if apart else None):
        url = srv.url + "/embed"  # the /health/live prober runs here: with the clients

        def capacity() -> dict:
            runs = {
                c: accounted(
                    srv,
                    url,
                    bodies,
                    "--concurrency",
                    str(c),
                    "--seconds",
                    str(seconds),
                    cpus=client_cpus,
                )
                for c in (16, 64)
            }
            best = max(runs.values(), key=lambda r: r["img_s"])
            return {
                "img_s": best["img_s"],
                "by_concurrency": {c: (r["img_s"], r["statuses"]) for c, r in runs.items()},
                "server_cpu_ms_per_200": 1e3
                * sum(r["server_cpu_s"] for r in runs.values())
                / sum(r["server_answers"].get("200", 0) for r in runs.values()),
                "client_cores": best["client_cpu_s"] / best["wall_s"],
            }

        for _ in range(rounds):
            before = capacity()
            rate = 3 * before["img_s"]
            live = Liveness(srv.port)
            live.start()
            over = accounted(
                srv,
                url,
                bodies,
                "--rate",
                f"{rate:.1f}",
                "--concurrency",
                "512",
                "--seconds",
                str(seconds),
                "--warmup-s",
                "2",
                cpus=client_cpus,
            )
            liveness = live.summary()
            after = capacity()
            cap = (before["img_s"] + after["img_s"]) / 2
            per_200 = (before["server_cpu_ms_per_200"] + after["server_cpu_ms_per_200"]) / 2
            n = over["server_answers"]
            out.append(
                {
                    "capacity_img_s": [before["img_s"], after["img_s"]],
                    "capacity_runs": [before["by_concurrency"], after["by_concurrency"]],
                    "offered_req_s": rate,
                    "goodput_img_s": over["img_s"],
                    "goodput_ratio": over["img_s"] / cap,
                    "statuses": over["statuses"],
                    "ok_latency_ms": over.get("latency_ms"),
                    "server_ms": over.get("server_ms"),
                    "liveness": liveness,
                    # where the cores went: the server's CPU per 200 (capacity runs) and what
                    # its CPU in overload leaves for each 429; the load generator's share
                    "server_cpu_ms_per_200": per_200,
                    "server_cpu_ms_per_429": (
                        1e3 * over["server_cpu_s"] - per_200 * n.get("200", 0)
                    )
                    / max(1.0, n.get("429", 0)),
                    "client_cores": {
                        "capacity": (before["client_cores"] + after["client_cores"]) / 2,
                        "overload": over["client_cpu_s"] / over["wall_s"],
                    },
                }
            )
    ratios = [r["goodput_ratio"] for r in out]
    p99s = [r["ok_latency_ms"]["p99"] for r in out if r["ok_latency_ms"]]
    return {
        "rounds": out,
        "median_goodput_ratio": statistics.median(ratios),
        "median_ok_p99_ms": statistics.median(p99s),
        "only_200_and_429": all(set(r["statuses"]) <= {"200", "429"} for r in out),
        "median_liveness_p95_ms": statistics.median(r["liveness"]["p95_ms"] for r in out),
        "median_server_cpu_ms": {
            s: statistics.median(r[f"server_cpu_ms_per_{s}"] for r in out) for s in ("200", "429")
        },
        "median_client_cores": {
            phase: statistics.median(r["client_cores"][phase] for r in out)
            for phase in ("capacity", "overload")
        },
    }


def resend(work: Path, rounds: int, seconds: float) -> dict:
    """See the module docstring (resend)."""
    bodies = small_bodies(work)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"skipped": f"{len(cpus)} CPU: no CPU to keep the load generator apart"}
    prefix = taskset(",".join(map(str, cpus[:-1])))
    runs: dict[str, list[dict]] = {"0": [], "100": []}
    for _ in range(rounds):
        for interval in runs:
            settings = {"max_queue_wait_s": "0.05", "refusal_interval_ms": interval}
            with server(work, "resend", settings, prefix) as srv:
                run = accounted(
                    srv,
                    srv.url + "/embed",
                    bodies,
                    "--concurrency",
                    "64",
                    "--seconds",
                    str(seconds),
                    "--warmup-s",
                    "2",
                    cpus=str(cpus[-1]),
                )
            runs[interval].append(
                {
                    "img_s": run["img_s"],
                    "refused_s": run["statuses"].get("429", 0) / seconds,
                    "statuses": run["statuses"],
                    "server_cores": run["server_cpu_s"] / run["wall_s"],
                }
            )
    return {
        "runs": runs,
        "median": {
            interval: {
                k: statistics.median(r[k] for r in rs)
                for k in ("img_s", "refused_s", "server_cores")
            }
            for interval, rs in runs.items()
        },
    }


def memory(work: Path) -> dict:
    extreme = image_png(Image.new("L", (3_300_000, 2), 128))
    deep = np.tile((np.arange(6600, dtype=np.uint32) * 9 % 65536).astype(np.uint16), (6000, 1))
    sixteen = image_png(Image.fromarray(deep))  # 6600 x 6000, 16-bit gray
    results = {"extreme_png_bytes": len(extreme), "16bit_png_bytes": len(sixteen)}
    settings = {"max_request_bytes": 20_000_000}
    with server(work, "memory", settings) as srv:
        sampler = Sampler(srv.pid, interval=0.005)  # the extreme image takes tens of ms
        sampler.start()
        sampler.phase = "idle"
        time.sleep(2)

        sampler.phase = "extreme"
        status, _ = raw_request(srv.port, post("/embed", embed_body([extreme, extreme])))
        results["extreme_status"] = status

        sampler.phase = "16bit"
        body = embed_body([sixteen] * 4)
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda _: raw_request(srv.port, post("/embed", body)), range(6))
            )
        results["16bit_statuses"] = sorted(a[0] for a in answers)

        sampler.phase = "bodies"
        results["held_bodies"] = held_bodies(srv.port, 40, 19_600_000)
        time.sleep(1)
        sampler.stopped.set()
        sampler.join()
    idle = sampler.peak_mib("idle")
    for phase in ("extreme", "16bit", "bodies"):
        peak = sampler.peak_mib(phase)
        results[f"{phase}_peak_over_idle_mib"] = {
            k: round(peak[k] - idle[k], 1) for k in ("rss_mib", "pss_mib")
        }
    results["idle_mib"] = idle
    return results


def held_bodies(port: int, connections: int, size: int) -> dict:
    """`connections` clients each declare a `size`-byte body and send all of it but its last
    byte, unless the server answers first; what each got before its body was complete."""
    head = post("/embed", b"").replace(b"Content-Length: 0", f"Content-Length: {size}".encode())
    payload = b'{"images": ["' + b"A" * (size - 16) + b'"]'  # one byte short of `size`
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(head)
        socks.append(sock)

    def send(sock: socket.socket) -> str:
        try:
            sock.settimeout(1)
            try:
                return "refused at once: " + sock.recv(64).split(b" ")[1].decode()
            except TimeoutError:
                pass  # admitted: the server waits for the body
            sock.settimeout(5)
            sock.sendall(payload)
            answer = sock.recv(64)
            return f"answered {answer.split(b' ')[1].decode()}" if answer else "closed"
        except TimeoutError:
            return "admitted, waiting for the last byte"
        except OSError as e:
            return type(e).__name__

    with ThreadPoolExecutor(connections) as pool:
        statuses: dict[str, int] = {}
        for status in pool.map(send, socks):
            statuses[status] = statuses.get(status, 0) + 1
    for sock in socks:
        sock.close()
    return statuses


def hostile_json(work: Path) -> dict:
    body = json.dumps({f"k{i}": 1 for i in range(500_000)}).encode()
    with server(work, "json") as srv:
        live = Liveness(srv.port)
        live.start()
        time.sleep(1)
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: raw_request(srv.port, post("/embed", body)), range(4))
            )
        seconds = time.perf_counter() - start
        time.sleep(1)
        liveness = live.summary()
    return {
        "body_bytes": len(body),
        "statuses": sorted(a[0] for a in answers),
        "largest_answer_bytes": max(len(a[1]) for a in answers),
        "seconds_for_all_four": seconds,
        "liveness": liveness,
    }


def connections(work: Path, idle: int = 2200, seconds: float = 20) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, idle + 256), hard))
    results: dict = {"idle_connections": idle, "server_open_files": 1024}
    with server(work, "connections", prefix=["prlimit", "--nofile=1024:1024"]) as srv:
        socks = []
        for _ in range(idle):
            try:
                socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
            except OSError:
                break
        results["opened"] = len(socks)
        body = embed_body(tiny_images([image_png(Image.new("L", (64, 64), 90))], 32, "L", 1))
        statuses: dict[str, int] = {}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                status = str(raw_request(srv.port, post("/embed", body), timeout=5)[0])
            except OSError as e:
                status = type(e).__name__
            statuses[status] = statuses.get(status, 0) + 1
            time.sleep(0.1)
        results["normal_requests_meanwhile"] = statuses
        results["closed_by_server"] = sum(map(closed_by_server, socks))
    return results


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has answered or closed this idle connection (then close it here)."""
    sock.setblocking(False)
    try:
        sock.recv(1024)  # an answer (408, 503) before the close, or b"": the close itself
        closed = True
    except BlockingIOError:
        closed = False  # still open, nothing sent
    except OSError:
        closed = True  # reset
    sock.close()
    return closed


def second_server(work: Path) -> dict:
    with server(work, "port") as first:
        start = time.perf_counter()
        second = subprocess.run(
            [sys.executable, "-m", "simmim_cli", "serve", "--port", str(first.port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in second.stderr.splitlines() if "cannot listen" in line]
        return {
            "exit_status": second.returncode,
            "seconds_to_refuse": time.perf_counter() - start,
            "message": lines[0].split(": ", 1)[-1] if lines else second.stderr[-300:],
        }


def shutdown(work: Path) -> dict:
    with server(work, "shutdown") as srv:
        body = embed_body([image_png(Image.new("L", (64, 64), 90))])
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(post("/embed", body)[: -len(body)])
        stop = threading.Event()

        def trickle() -> None:  # one byte a second
            for i in range(len(body)):
                if stop.wait(1.0):
                    return
                try:
                    sock.sendall(body[i : i + 1])
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(2)
        start = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        status = srv.proc.wait(120)
        seconds = time.perf_counter() - start
        stop.set()
        sock.close()
    return {"drain_timeout_s": 30.0, "seconds_to_exit": seconds, "exit_status": status}


def disconnect(work: Path) -> dict:
    with server(work, "disconnect") as srv:
        body = embed_body([image_png(Image.new("L", (256, 256), 90))])
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(post("/embed", body)[: -len(body) // 2])
        time.sleep(1)
        metrics = srv.metrics()
    counted = {
        key.split("status=")[1].rstrip("}"): value
        for key, value in metrics.items()
        if key.startswith("simmim_requests_total{endpoint=/embed")
    }
    log = (work / "disconnect.log").read_text()
    return {"statuses_counted": counted, "traceback_in_log": "Traceback" in log}


# --- report ----------------------------------------------------------------------------------
def overload_rows(o: dict, where: str) -> list[tuple[str, str]]:
    if "skipped" in o:
        return [(f"3x overload, {where}", f"not run: {o['skipped']}")]
    return [
        (
            f"3x overload, {where}: goodput / capacity (median of rounds)",
            f"{o['median_goodput_ratio']:.2f} (rounds "
            + ", ".join(f"{x['goodput_ratio']:.2f}" for x in o["rounds"])
            + ")",
        ),
        (
            f"3x overload, {where}: answers",
            "only 200 and 429"
            if o["only_200_and_429"]
            else "; ".join(str(x["statuses"]) for x in o["rounds"]),
        ),
        (
            f"3x overload, {where}: p99 of the 200s (median of rounds)",
            f"{o['median_ok_p99_ms']:.0f} ms",
        ),
        (
            f"3x overload, {where}: /health/live p95 (median of rounds)",
            f"{o['median_liveness_p95_ms']:.0f} ms",
        ),
        (
            f"3x overload, {where}: server CPU per answer, 200 / 429 (median of rounds)",
            f"{o['median_server_cpu_ms']['200']:.2f} ms / "
            f"{o['median_server_cpu_ms']['429']:.2f} ms",
        ),
        (
            f"3x overload, {where}: load generator's CPU, at capacity / at 3x (median of rounds)",
            f"{o['median_client_cores']['capacity']:.2f} / "
            f"{o['median_client_cores']['overload']:.2f} cores",
        ),
    ]


def resend_rows(r: dict) -> list[tuple[str, str]]:
    if "skipped" in r:
        return [("64 connections resending refusals at once", f"not run: {r['skipped']}")]
    off, on = r["median"]["0"], r["median"]["100"]
    return [
        (
            "64 connections resending refusals at once, one server process: images answered "
            "200 per second, refusal_interval_ms 0 / 100 (median of rounds)",
            f"{off['img_s']:.0f} / {on['img_s']:.0f} (rounds "
            + ", ".join(f"{x['img_s']:.0f}" for x in r["runs"]["0"])
            + " / "
            + ", ".join(f"{x['img_s']:.0f}" for x in r["runs"]["100"])
            + ")",
        ),
        (
            "the same: refusals per second, 0 / 100",
            f"{off['refused_s']:.0f} / {on['refused_s']:.0f}",
        ),
    ]


def markdown(r: dict) -> str:
    m, j, c, p, s, d = (
        r[k] for k in ("memory", "json", "connections", "port", "shutdown", "disconnect")
    )
    rows = [
        *overload_rows(r["overload"], "one small image per request, clients on the same CPUs"),
        *overload_rows(r["overload_apart"], "the load generator on a CPU of its own"),
        *resend_rows(r["resend"]),
        (
            "2 PNGs of 3,300,000 x 2 in one request: peak memory over idle",
            f"{m['extreme_peak_over_idle_mib']['rss_mib']:.0f} MiB RSS "
            f"(answer {m['extreme_status']})",
        ),
        (
            "6 concurrent requests of 4 x 16-bit 6000 x 6600 PNGs: peak over idle",
            f"{m['16bit_peak_over_idle_mib']['rss_mib']:.0f} MiB RSS "
            f"(answers {m['16bit_statuses']})",
        ),
        (
            "40 bodies of 19.6 MB held back by one byte: peak over idle",
            f"{m['bodies_peak_over_idle_mib']['rss_mib']:.0f} MiB RSS (answers before the last "
            f"byte: {m['held_bodies']})",
        ),
        (
            "4 x 6.9 MB bodies of 500,000 unknown keys",
            f"{j['statuses']}, largest answer {j['largest_answer_bytes']} bytes, "
            f"/health/live max {j['liveness']['max_ms']:.0f} ms",
        ),
        (
            f"{c['opened']} idle connections, 1,024 open files: normal requests in the next "
            "20 s (one every 0.1 s)",
            f"{c['normal_requests_meanwhile']}; idle ones closed by the server: "
            f"{c['closed_by_server']}",
        ),
        (
            "a second server on a busy port",
            f"exit {p['exit_status']} after {p['seconds_to_refuse']:.1f} s: {p['message']}",
        ),
        (
            "SIGTERM with a client sending 1 byte/s (drain timeout 30 s)",
            f"exit {s['exit_status']} after {s['seconds_to_exit']:.1f} s",
        ),
        (
            "a client gone mid-upload: counted as",
            f"{d['statuses_counted']}, traceback in the log: {d['traceback_in_log']}",
        ),
    ]
    lines = ["| scenario | measured |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reliability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of overload and resend (default 3)"
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="each load phase's steady state (default 10)"
    )
    p.add_argument(
        "--only",
        help="run these scenarios only (comma-separated), into OUT/reliability.json's others",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="simmim-reliability-"))
    scenarios = {
        "overload": lambda: overload(work, args.rounds, args.seconds, apart=False),
        "overload_apart": lambda: overload(work, args.rounds, args.seconds, apart=True),
        "resend": lambda: resend(work, args.rounds, args.seconds),
        "memory": lambda: memory(work),
        "json": lambda: hostile_json(work),
        "connections": lambda: connections(work),
        "port": lambda: second_server(work),
        "shutdown": lambda: shutdown(work),
        "disconnect": lambda: disconnect(work),
    }
    chosen = args.only.split(",") if args.only else list(scenarios)
    path = args.out / "reliability.json"
    results = json.loads(path.read_text()) if args.only and path.exists() else {}
    for name in chosen:
        started = time.time()
        results[name] = scenarios[name]()
        results[name]["seconds"] = time.time() - started
        results.setdefault("commands", {})[name] = "python -m benchmarks.reliability " + " ".join(
            argv or sys.argv[1:]
        )
    results["memory_unit"] = f"MiB ({MIB} bytes)"
    path.write_text(json.dumps(results, indent=2) + "\n")
    if all(name in results for name in scenarios):
        (args.out / "reliability.md").write_text(markdown(results))
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
