"""What tracing costs per request: CPU time of the request path with tracing off and on, and
optionally of another checkout's code (main before tracing, say), measured in process.

Each measurement runs in a fresh process: create_app on a backend that returns zeros (so that
the model's time does not drown the request path's), driven through ASGI by a loop in the same
process (no sockets, no HTTP parsing), one /embed request of one 48 x 40 PNG at a time; the CPU
time of the whole process (every thread: the event loop, the decode and inference pools,
OpenTelemetry's export thread) per request, after a warm-up. "on" is tracing as an operator turns
it on: OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP receiver that this script runs, so
spans are really serialised and sent; "on_10pct" samples one trace in ten
(OTEL_TRACES_SAMPLER=parentbased_traceidratio). Rounds alternate the configurations; the
medians and their ratios to "off" are printed, and written as JSON with --out.

    python benchmarks/tracing_overhead.py [--requests 3000] [--rounds 5] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


# --- one measurement (the child process) -----------------------------------------------------
class ZeroBackend:
    """A BackendFactory and Backend whose model returns zeros: [N, D] float32."""

    def __init__(self, model, settings, threads):
        self.dim, self.max_batch_size = model.card["embedding_dim"], settings.max_batch_size

    def embed(self, pixels):
        import numpy as np

        return np.zeros((len(pixels), self.dim), np.float32)

    def reconstruct(self, pixels, mask):
        return pixels.copy()

    def warmup(self) -> None:
        pass

    def describe(self) -> dict:
        return {"runtime": "zeros (benchmarks/tracing_overhead.py)"}


def png_body() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()


async def drive(app, requests: int, warmup: int) -> dict:
    """Send warmup + requests /embed requests, one at a time; CPU and wall time of the last
    `requests`."""
    body = png_body()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/embed",
        "raw_path": b"/embed",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    never = asyncio.Event()

    async def one() -> int:
        sent, status = False, 0

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client stays connected

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app({**scope, "state": {}}, receive, send)
        return status

    async with app.router.lifespan_context(app):
        engine = app.state.engine
        while engine.state != "ready":
            await asyncio.sleep(0.01)
        for _ in range(warmup):
            assert await one() == 200
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            assert await one() == 200
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": cpu / requests * 1e6, "wall_us": wall / requests * 1e6}


def measure(requests: int, warmup: int) -> None:
    """The child: print one JSON line with the figures."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(processes=1, workers=1, threads=1, tune_batch_size=False)
    app = create_app(settings, ZeroBackend)
    figures = asyncio.run(drive(app, requests, warmup))
    sdk = ("opentelemetry.sdk", "opentelemetry.exporter")
    figures["sdk_imported"] = any(m.startswith(sdk) for m in sys.modules)
    print(json.dumps(figures))


# --- the rounds (the parent process) ---------------------------------------------------------
class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP receiver that answers 200 to every export and counts the bytes."""

    def __init__(self):
        self.received = 0
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.server.received += len(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def run_child(tree: Path, otel: dict[str, str], requests: int, warmup: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    env["PYTHONPATH"] = str(tree)
    args = ["--child", "--requests", str(requests), "--warmup", str(warmup)]
    proc = subprocess.run(
        [sys.executable, str(HERE), *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"the measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="measured requests per run [3000]")
    p.add_argument("--warmup", type=int, default=300, help="requests before measuring [300]")
    p.add_argument("--rounds", type=int, default=5, help="runs of each configuration [5]")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout (e.g. a worktree of main) measured too, tracing off [none]",
    )
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        measure(args.requests, args.warmup)
        return 0
    receiver = Receiver()
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    configs = {
        "off": (ROOT, {}),
        "on": (ROOT, on),
        "on_10pct": (
            ROOT,
            on
            | {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
        ),
    }
    if args.baseline:
        configs["baseline"] = (args.baseline.resolve(), {})
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tree, otel = configs[name]
            runs[name].append(run_child(tree, otel, args.requests, args.warmup))
            print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    receiver.shutdown()
    median = {n: statistics.median(x["cpu_us"] for x in v) for n, v in runs.items()}
    report = {
        "requests": args.requests,
        "rounds": args.rounds,
        "cpu_us_per_request": median,
        "ratio_to_off": {n: round(m / median["off"], 3) for n, m in median.items()},
        "sdk_imported": {n: [x["sdk_imported"] for x in v] for n, v in runs.items()},
        "otlp_bytes_received": receiver.received,
        "runs": runs,
    }
    for name in names:
        spread = sorted(round(x["cpu_us"]) for x in runs[name])
        print(
            f"{name:>8}: {median[name]:7.1f} us CPU per request (runs {spread}), "
            f"{report['ratio_to_off'][name]:.3f}x off; SDK imported: "
            f"{any(report['sdk_imported'][name])}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
