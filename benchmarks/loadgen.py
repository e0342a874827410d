"""The load generator: a separate process that keeps `concurrency` requests in flight against one
URL over keep-alive HTTP/1.1 connections, and stops by itself after `requests` requests or
`seconds` seconds of steady state, whichever comes first (then waits for those in flight).
With --rate it is an open loop instead: it starts `rate` requests per second, due evenly spaced
and sent about once a millisecond (every request due by then), whatever the answers, each on an
idle one of `concurrency` connections (opened at the start); a request due when none is idle is
not sent and counted (status -1), a connection the server closes without answering counts its
request as status 0. Latency then runs from the time a request was due.

usage: python -m benchmarks.loadgen URL BODIES.jsonl --concurrency C --requests R --seconds S
           [--warmup-s W] [--rate REQ_PER_S] [--out RESULT.json]

BODIES.jsonl holds one {"images": n, "body": {...}} per line (a POST body and how many images it
carries); connection i sends bodies i, i + C, ... in turn. Each connection is an asyncio
Protocol on uvloop that records a response and writes the next request in one callback (no HTTP
library, no task or stream per request), so that the client costs the shared cores as little as
possible: 85-95 us of CPU per small-image request here, against 150 with asyncio streams
(its CPU seconds are reported). Throughput counts the images answered within the steady-state
window; latency percentiles are over the requests started in it. Each response's x-*-time-ms
headers (the service's own timings) are averaged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

try:
    from uvloop import run as run_loop
except ImportError:
    from asyncio import run as run_loop

TIMING = re.compile(rb"^x-([a-z]+)-time-ms:\s*([0-9.]+)", re.IGNORECASE | re.MULTILINE)
LENGTH = re.compile(rb"^content-length:\s*(\d+)", re.IGNORECASE | re.MULTILINE)
# The open loop's shortest sleep. uvloop's timers count whole milliseconds: a shorter sleep is
# no sleep, and a scheduler waiting for a request due in 0.3 ms spins (hundreds of thousands of
# wake-ups a second, a whole core, stolen from a server on the same cores). It wakes about once a
# millisecond instead and sends every request due by then (latency still counts from each
# request's due time).
TICK_S = 1e-3


def build_requests(url: str, bodies: list[bytes], images_per_body: list[int]) -> list[tuple]:
    parts = urlsplit(url)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\nAccept: application/json\r\n"
    )
    return [
        ((head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b, n)
        for b, n in zip(bodies, images_per_body)
    ]


class Connection(asyncio.Protocol):
    """One keep-alive connection sending requests back to back, driven by callbacks (no task,
    no stream, no future per request): each complete response is recorded and the next
    request written in the same callback. Finishes `done` when it stops issuing."""

    def __init__(self, first: int, requests: list[tuple], state: dict, records: list):
        self.k, self.requests, self.state, self.records = first, requests, state, records
        self.done = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.head_end = self.length = -1
        self.waiting = False  # a request is unanswered
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.send_next()

    def send_next(self) -> None:
        state = self.state
        if state["issued"] >= state["max_requests"] or time.perf_counter() >= state["stop"]:
            self.transport.close()
            return
        state["issued"] += 1
        if state["issued"] == state["max_requests"]:
            state["last_issue"] = time.perf_counter()
        data, self.images = self.requests[self.k % len(self.requests)]
        self.k += state["concurrency"]
        self.start, self.waiting = time.perf_counter(), True
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            self.head_end = self.buffer.find(b"\r\n\r\n")
            if self.head_end < 0:
                return
            self.head_end += 4
            length = LENGTH.search(self.buffer, 0, self.head_end)
            self.length = int(length.group(1)) if length else 0
        if len(self.buffer) < self.head_end + self.length:
            return
        end = time.perf_counter()
        head = bytes(self.buffer[: self.head_end])
        body = bytes(self.buffer[self.head_end : self.head_end + self.length])
        del self.buffer[: self.head_end + self.length]
        self.head_end, self.waiting = -1, False
        self.response(head, body, end)
        self.send_next()

    def response(self, head: bytes, body: bytes, end: float) -> None:
        state = self.state
        status = int(head.split(b" ", 2)[1])
        timings = {m.group(1).decode().lower(): float(m.group(2)) for m in TIMING.finditer(head)}
        self.records.append((self.start, end, status, self.images, timings))
        if state["check"] and status == 200:
            state["check"] = False
            json.loads(body)  # a real JSON answer
        if (
            state["window"] is None
            and len(self.records) >= state["concurrency"]
            and end >= state["t0"] + state["warmup_s"]
        ):
            state["window"] = end  # steady state from here
            state["stop"] = end + state["seconds"]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.waiting:
            self.done.set_exception(
                exc or ConnectionError("the server closed the connection before answering")
            )
        else:
            self.done.set_result(None)


class OpenLoopConnection(Connection):
    """A connection of the open loop: it sends when the scheduler says (send_at) and goes back
    to the idle pool (state["idle"]) after each answer."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.dead = transport, False
        self.state["idle"].append(self)

    def send_at(self, k: int, due: float) -> None:
        data, self.images = self.requests[k % len(self.requests)]
        self.start, self.waiting = due, True
        self.transport.write(data)

    def send_next(self) -> None:  # after an answer: ready for the next request
        self.state["idle"].append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self.waiting:
            self.waiting = False
            self.records.append((self.start, time.perf_counter(), 0, self.images, {}))
        if not self.done.done():
            self.done.set_result(None)


async def run_open(
    url: str,
    bodies: list[bytes],
    images: list[int],
    rate: float,
    connections: int,
    seconds: float,
    warmup_s: float,
    timeout: float,
) -> dict:
    """Start `rate` requests per second for warmup_s + seconds (the window: the last
    `seconds`), on up to `connections` connections; then wait up to `timeout` for the
    answers in flight."""
    parts = urlsplit(url)
    requests = build_requests(url, bodies, images)
    loop = asyncio.get_running_loop()
    state = {"idle": deque(), "window": 0.0, "check": True}
    records: list = []
    opened = await asyncio.gather(
        *(
            loop.create_connection(
                lambda: OpenLoopConnection(0, requests, state, records),
                parts.hostname,
                parts.port or 80,
            )
            for _ in range(connections)
        )
    )
    cpu0, t0 = time.process_time(), time.perf_counter()
    window, end = t0 + warmup_s, t0 + warmup_s + seconds
    due, k, interval, wakeups = t0, 0, 1.0 / rate, 0
    while due < end:
        wakeups += 1
        now = time.perf_counter()
        while due <= now:
            idle = state["idle"]
            while idle and idle[0].dead:
                idle.popleft()
            if idle:
                idle.popleft().send_at(k, due)
            else:
                records.append((due, due, -1, 0, {}))  # no idle connection: not sent
            k, due = k + 1, due + interval
        await asyncio.sleep(max(TICK_S, due - time.perf_counter()))
    deadline = time.perf_counter() + timeout
    busy = [p for _, p in opened if p.waiting]
    while busy and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
        busy = [p for p in busy if p.waiting]
    for transport, _ in opened:
        transport.close()
    result = summarize(records, window, end, connections)
    result.update(
        rate=rate,
        warmup_s=warmup_s,
        client_cpu_s=time.process_time() - cpu0,
        wall_s=time.perf_counter() - t0,
        unfinished_requests=len(busy),
        scheduler_wakeups=wakeups,
    )
    return result


async def connection(
    i: int, host: str, port: int, requests: list[tuple], state: dict, records: list
) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: Connection(i, requests, state, records), host, port
    )
    try:
        await protocol.done
    finally:
        transport.close()


def summarize(records: list, begin: float | None, end: float, concurrency: int) -> dict:
    """Throughput: images answered 200 within [begin, end]; latency: requests started then."""
    result = {"concurrency": concurrency, "requests_sent": len(records)}
    if begin is None or end <= begin:
        return {**result, "requests": 0, "ok": 0, "statuses": {}}
    started = [r for r in records if begin <= r[0] <= end]
    ok = [r for r in started if r[2] == 200]
    statuses: dict[str, int] = {}
    for r in started:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    answered = sum(r[3] for r in records if begin <= r[1] <= end and r[2] == 200)
    result.update(
        requests=len(started),
        ok=len(ok),
        statuses=statuses,
        seconds=end - begin,
        img_s=answered / (end - begin),
        req_s=sum(1 for r in records if begin <= r[1] <= end and r[2] == 200) / (end - begin),
    )
    if ok:
        latency = np.array([r[1] - r[0] for r in ok]) * 1e3
        timings: dict[str, list] = {}
        for r in ok:
            for k, v in r[4].items():
                timings.setdefault(k, []).append(v)
        result.update(
            latency_ms={
                "mean": float(latency.mean()),
                "p50": float(np.percentile(latency, 50)),
                "p95": float(np.percentile(latency, 95)),
                "p99": float(np.percentile(latency, 99)),
                "max": float(latency.max()),
            },
            server_ms={k: float(np.mean(v)) for k, v in timings.items()},
        )
    return result


async def run(
    url: str,
    bodies: list[bytes],
    images: list[int],
    concurrency: int,
    max_requests: int,
    seconds: float,
    warmup_s: float,
    timeout: float,
) -> dict:
    """Warm-up: at least warmup_s, and until `concurrency` requests have been answered (the
    first wave, sent into an empty server, is not representative). Then `seconds` of steady
    state; then the requests in flight finish (at most `timeout`)."""
    parts = urlsplit(url)
    requests = build_requests(url, bodies, images)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    state = {
        "issued": 0,
        "max_requests": max_requests,
        "concurrency": concurrency,
        "t0": t0,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "stop": t0 + warmup_s + seconds + timeout,
        "window": None,
        "last_issue": None,
        "check": True,
        "steady": True,
    }
    records: list = []

    async def first_wave_deadline() -> None:
        await asyncio.sleep(warmup_s + timeout)
        if state["window"] is None:  # too slow to answer the first wave
            now = time.perf_counter()
            state.update(window=now, stop=now + seconds, steady=False)

    deadline = asyncio.create_task(first_wave_deadline())
    tasks = [
        asyncio.create_task(
            connection(i, parts.hostname, parts.port or 80, requests, state, records)
        )
        for i in range(concurrency)
    ]
    done, pending = await asyncio.wait(tasks, timeout=warmup_s + seconds + 2 * timeout)
    deadline.cancel()
    for task in pending:
        task.cancel()
    errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
    end = min(x for x in (state["stop"], state["last_issue"], time.perf_counter()) if x)
    result = summarize(records, state["window"], end, concurrency)
    result.update(
        warmup_s=(state["window"] or end) - t0,
        steady=state["steady"],
        client_cpu_s=time.process_time() - cpu0,
        wall_s=time.perf_counter() - t0,
        unfinished_connections=len(pending),
        connection_errors=errors[:3],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url")
    p.add_argument("bodies", type=Path, help='JSON lines: {"images": n, "body": {...}}')
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument(
        "--requests", type=int, default=100_000, help="most requests to send (warm-up included)"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of steady state")
    p.add_argument("--warmup-s", type=float, default=1.0, help="least seconds not counted at first")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="most seconds for the warm-up's first wave (then the window starts "
        "anyway, marked steady=false), and for the requests in flight at the "
        "end (then they are abandoned)",
    )
    p.add_argument(
        "--rate",
        type=float,
        help="open loop: start this many requests per second, whatever the answers, on up "
        "to --concurrency connections (--requests is then ignored)",
    )
    p.add_argument("--out", type=Path, help="write the result here (default: stdout)")
    args = p.parse_args(argv)
    lines = [json.loads(line) for line in args.bodies.read_text().splitlines() if line]
    bodies = [json.dumps(line["body"]).encode() for line in lines]
    images = [line["images"] for line in lines]
    if args.rate:
        work = run_open(
            args.url,
            bodies,
            images,
            args.rate,
            args.concurrency,
            args.seconds,
            args.warmup_s,
            args.timeout,
        )
    else:
        work = run(
            args.url,
            bodies,
            images,
            args.concurrency,
            args.requests,
            args.seconds,
            args.warmup_s,
            args.timeout,
        )
    result = run_loop(work)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
