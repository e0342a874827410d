"""Measure the memory `simmim serve` needs, to size the Deployment's memory request and limit.

Starts `python -m simmim_cli serve` on a free loopback port with the settings of the CPU overlay
(2 server processes, the embedded default model unless --model-dir), waits for /health/ready,
then runs the project's load generator (benchmarks/loadgen.py, its own process) in three bounded
phases, each answer required to be 200, or 429 (the server refusing what would exceed its
bounds: bodies in flight, queue):
  photographs   synthetic JPEGs of --side x (2/3 --side) pixels (10.7 megapixels by default),
                1 per request (JPEGs are decoded at reduced size when the model's input is small)
  large PNGs    the same pictures as PNGs, 1 per request: decoded at full size, the worst case
  small images  64 px PNGs, 16 per request
Meanwhile it samples, every 50 ms, the memory of the whole process tree (the parent and its
server processes) from /proc: the sum of RSS (an upper bound: shared pages counted once per
process) and of PSS (shared pages divided among the processes that map them; closer to what a
container's cgroup charges). Prints one JSON object with the peaks per phase, in MiB, and stops
the server.

usage: python deploy/k8s/measure_memory.py [--seconds 20] [--concurrency 8] [--processes 2]
           [--side 4000] [--model-dir DIR]

Run it from the repository root with the `serve` extra installed (no photograph needed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from benchmarks.images import synthetic_jpegs, tiny_images, write_bodies  # noqa: E402
from benchmarks.procmem import MIB, Sampler  # noqa: E402
from benchmarks.servers import free_port  # noqa: E402


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"simmim serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"not ready within {timeout:.0f} s")


def as_png(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, "PNG")
    return buf.getvalue()


def load(url: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", f"{url}/embed", str(bodies)]
        + ["--concurrency", str(concurrency), "--seconds", str(seconds), "--requests", "20000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 180,
        check=True,
    )
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python deploy/k8s/measure_memory.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=20.0, help="steady load per phase (default 20)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--processes", type=int, default=2, help="server processes (default 2)")
    p.add_argument(
        "--side",
        type=int,
        default=4000,
        help="width of the large pictures, in pixels; height: 2/3 of it (default 4000)",
    )
    p.add_argument("--model-dir", type=Path, help="default: the embedded default model")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="simmim-memory-"))
    photos = synthetic_jpegs(8, side=args.side)
    phases = {
        "photographs": write_bodies(photos * 4, work / "photos.jsonl"),
        "large PNGs": write_bodies([as_png(j) for j in photos], work / "pngs.jsonl", per_request=1),
        "small images": write_bodies(
            tiny_images(photos, 64, "RGB", 256), work / "small.jsonl", per_request=16
        ),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "simmim_cli", "serve", "--port", str(port)]
    cmd += ["--processes", str(args.processes), "--no-log-requests"]
    if args.model_dir:
        cmd += ["--model-dir", str(args.model_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMMIM_")}
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(server.pid)
    sampler.start()
    results = {}
    try:
        wait_ready(url, server)
        sampler.phase = "idle"
        time.sleep(2)
        for name, bodies in phases.items():
            sampler.phase = name
            r = load(url, bodies, args.concurrency, args.seconds)
            results[name] = {k: r.get(k) for k in ("requests", "img_s", "statuses")}
            if not set(r["statuses"]) <= {"200", "429"}:  # 429: refused within its bounds
                raise SystemExit(f"{name}: answers other than 200 and 429: {r['statuses']}")
    finally:
        server.terminate()
        server.wait(120)
        sampler.stopped.set()
        sampler.join()
    peaks = {
        phase: {k + "_mib": round(v / MIB, 1) for k, v in peak.items()}
        for phase, peak in sampler.peaks.items()
    }
    print(
        json.dumps(
            {
                "command": " ".join(cmd[1:]),
                "processes": args.processes,
                "load": results,
                "peak_by_phase": peaks,
                "peak_rss_mib": max(v["rss_mib"] for v in peaks.values()),
                "peak_pss_mib": max(v["pss_mib"] for v in peaks.values()),
                "server_log": str(work / "server.log"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
