"""Benchmarks (one command): the engine, the service end to end, the naive PyTorch endpoint, and
where one request's time goes; the issue's target ratios computed from the same run.

usage: python -m benchmarks.run --out benchmarks/results [--quick] [--provider cpu|cuda]

Writes OUT/results.json, OUT/results.md and OUT/results.png. Models (built once, cached in
--work): the embedded default model (service/default_model, or a 2-step fallback when it is
absent) with small images, and a ViT-S/16 at 224 with random weights, fed real photographs.
--quick is a smoke test: the default model only (photographs resized to its input), short
runs, two concurrencies; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import images as img
from .model_speed import ENGINES, OrtEncoder, measure, run_engines
from .models import BenchModel, default_model, vit_s16
from .report import write_markdown, write_plot
from .servers import Server, naive_serve, simmim_serve
from .stages import stage_costs
from .targets import compute_targets

log = logging.getLogger("benchmarks")
# Throughput at a fixed concurrency measures the requests queueing, none shed: the service's
# default refuses (429) a request that would queue more than SIMMIM_MAX_QUEUE_WAIT_S
# (benchmarks/reliability.py measures that), which 64 photographs at once would.
QUEUEING = {"max_queue_wait_s": 600}


def queueing_serve(model_dir, log_path, settings: dict, provider: str) -> Server:
    """simmim_serve with QUEUEING under the given settings."""
    return simmim_serve(model_dir, log_path, {**QUEUEING, **settings}, provider)


PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "timm",
    "numpy",
    "pillow",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "pydantic",
    "prometheus-client",
    "orjson",
)


@dataclass(frozen=True)
class Workload:
    key: str  # "small" | "photo"
    model: BenchModel
    images: str  # what the requests carry, in words
    bodies: Path  # JSON lines for the load generator
    originals: list[bytes] | None = None


class LoadMonitor:
    """Samples the 1-minute load average every `every` seconds in a daemon thread."""

    def __init__(self, every: float = 2.0):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self._stop.wait(self._every)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        loads = [x for _, x in self.samples] or [os.getloadavg()[0]]
        return {
            "load1_start": loads[0],
            "load1_mean": sum(loads) / len(loads),
            "load1_max": max(loads),
            "load1_min": min(loads),
            "load1_end": loads[-1],
            "samples": len(loads),
        }


def machine_info(provider: str) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    info = {
        "cpu_model": fields.get("model name", platform.processor()),
        "logical_cpus": os.cpu_count(),
        "cores_per_socket": fields.get("cpu cores"),
        "avx512_vnni": "avx512_vnni" in flags,
        "avx2": "avx2" in flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "provider": provider,
        "gpu": None,
    }
    if provider == "cuda":
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0)
        except Exception as e:  # reported, not fatal
            info["gpu"] = f"unknown ({type(e).__name__})"
    return info


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads) so far (Linux /proc)."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(pid: int) -> list[int]:
    """The processes that serve requests: the children of `simmim serve --processes N` that
    run a server (not multiprocessing's resource tracker), else `pid` itself."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(c) for c in path.read_text().split()] if path.exists() else []
    serving = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return serving or [pid]


def server_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the whole server, of its event-loop threads), from /proc."""
    processes = server_processes(pid)
    loops = sum(cpu_seconds(p, p) for p in processes)
    return sum(cpu_seconds(p) for p in {pid, *processes}), loops


def batcher_counters(server: Server) -> dict:
    m = server.metrics()
    get = lambda k: m.get(k, 0.0)  # noqa: E731
    return {
        "batches": get("simmim_batch_size_count{task=embed}"),
        "items": get("simmim_batch_size_sum{task=embed}"),
        "inference_s": get("simmim_inference_seconds_sum{task=embed}"),
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: Path = args.work
        self.logs = self.work / "logs"
        self.result: dict = {"service": [], "naive": [], "rounds": {}, "breakdown": {}}

    def progress(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)

    # --- load -----------------------------------------------------------------------------
    def load(self, srv: Server, workload: Workload, concurrency: int, **labels) -> dict:
        a = self.args
        out = self.work / "loadgen.json"
        cpu0, loop0 = server_cpu(srv.pid)
        counters0 = batcher_counters(srv) if labels.get("server") == "service" else None
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            srv.url + "/embed",
            str(workload.bodies),
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(a.seconds),
            "--warmup-s",
            str(a.warmup_s),
            "--requests",
            str(a.max_requests),
            "--out",
            str(out),
        ]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        r = json.loads(out.read_text())
        r.update(workload=workload.key, model=workload.model.key, images=workload.images, **labels)
        cpu1, loop1 = server_cpu(srv.pid)
        r["server_cpu_s"] = cpu1 - cpu0
        r["server_cores_busy"] = r["server_cpu_s"] / r["wall_s"]
        # per request sent (warm-up included): the whole server, and its event loops alone
        # (the event loop: HTTP, routing, validation, batching; not decoding nor inference)
        r["server_cpu_ms_per_request"] = r["server_cpu_s"] / r["requests_sent"] * 1e3
        r["loop_cpu_us_per_request"] = (loop1 - loop0) / r["requests_sent"] * 1e6
        if counters0 is not None:
            c1 = batcher_counters(srv)
            d = {k: c1[k] - counters0[k] for k in c1}
            r["batcher"] = {
                "batches": d["batches"],
                "mean_batch": d["items"] / d["batches"] if d["batches"] else 0,
                "inference_busy": d["inference_s"] / r["wall_s"],
            }
        lat = r.get("latency_ms", {})
        self.progress(
            f"{workload.key} {labels} c={concurrency}: {r.get('img_s', 0):.1f} img/s "
            f"p50 {lat.get('p50', 0):.1f} ms p99 {lat.get('p99', 0):.1f} ms "
            f"{r['statuses']}"
        )
        return r

    # --- parts ----------------------------------------------------------------------------
    def engines(self, models: list[BenchModel]) -> None:
        a = self.args
        self.result["engine"] = {
            m.key: run_engines(m, a.batches, a.engine_seconds, a.provider, ENGINES, self.progress)
            for m in models
        }

    def service(self, workload: Workload) -> None:
        """The curves: fp32, batching on (the default settings) and off (max_batch_size=1),
        at every concurrency."""
        a, m = self.args, workload.model
        for batching, settings in (("on", {}), ("off", {"max_batch_size": 1})):
            with queueing_serve(
                m.model_dir,
                self.logs / f"serve_{workload.key}_{batching}.log",
                settings,
                a.provider,
            ) as server:
                info = server.info()["settings"]
                for c in a.concurrency:
                    self.result["service"].append(
                        self.load(
                            server,
                            workload,
                            c,
                            server="service",
                            precision="fp32",
                            batching=batching,
                            max_batch_size=info["max_batch_size"],
                            max_wait_ms=info["max_wait_ms"],
                        )
                    )

    def naive(self, workload: Workload) -> None:
        """The curve of the naive endpoint, PyTorch's default threads, at every concurrency."""
        m, a = workload.model, self.args
        with naive_serve(
            m.model_dir, m.checkpoint, self.logs / f"naive_{workload.key}.log", a.provider
        ) as server:
            for c in a.concurrency:
                self.result["naive"].append(
                    self.load(
                        server,
                        workload,
                        c,
                        server="naive",
                        precision="fp32",
                        batching="none",
                        torch_threads="default",
                    )
                )

    def rounds(self, workload: Workload) -> None:
        """The targets' figures, side by side: every server stays up (idle ones cost nothing),
        and each round measures the engine (batch 1 and 16), then each server at the target
        concurrency, back to back, so that a change in the machine's load moves both sides of
        a ratio alike. The targets take the median over rounds of each round's ratio."""
        a, m, c = self.args, workload.model, self.args.target_concurrency
        servers = {
            "on": lambda: queueing_serve(
                m.model_dir, self.logs / f"{workload.key}_on.log", {}, a.provider
            ),
            "off": lambda: queueing_serve(
                m.model_dir,
                self.logs / f"{workload.key}_off.log",
                {"max_batch_size": 1},
                a.provider,
            ),
            "naive": lambda: naive_serve(
                m.model_dir, m.checkpoint, self.logs / f"{workload.key}_naive.log", a.provider
            ),
        }
        int8 = workload.key == "photo" and m.has_int8
        if int8:
            servers["int8"] = lambda: queueing_serve(
                m.model_dir, self.logs / f"{workload.key}_int8.log", {"int8": "true"}, a.provider
            )
        if a.provider == "cpu":
            # the service as one process (the default on CPU is one per 2 cores' share)
            servers["on_1process"] = lambda: queueing_serve(
                m.model_dir, self.logs / f"{workload.key}_on1.log", {"processes": 1}, a.provider
            )
            # the one-thread control (see naive_server.py)
            servers["naive_1thread"] = lambda: naive_serve(
                m.model_dir,
                m.checkpoint,
                self.logs / f"{workload.key}_naive1.log",
                a.provider,
                threads=1,
            )
        engines = {"fp32": OrtEncoder(m, False, a.provider)}
        if int8:
            engines["int8"] = OrtEncoder(m, True, a.provider)
        rounds = []
        with contextlib.ExitStack() as stack:
            running = {name: stack.enter_context(start()) for name, start in servers.items()}
            for i in range(a.rounds):
                row: dict = {"load1": os.getloadavg()[0]}
                for precision, engine in engines.items():
                    for b in (1, 16) if precision == "fp32" else (16,):
                        r = measure(engine.caller(b), b, a.engine_seconds, engine.workers)
                        row[f"engine_{precision}_b{b}"] = r["img_s"]
                        row[f"engine_{precision}_b{b}_cpu_ms_per_image"] = r["cpu_ms_per_image"]
                for name, server in running.items():
                    kind = "naive" if name.startswith("naive") else "service"
                    r = self.load(server, workload, c, server=kind, variant=name, round=i)
                    row[name] = r.get("img_s")
                    row[f"{name}_load"] = r
                rounds.append(row)
        self.result["rounds"][workload.key] = {"concurrency": c, "rounds": rounds}

    def breakdown(self, workload: Workload) -> None:
        costs = stage_costs(
            workload.model,
            workload.bodies,
            self.args.provider,
            self.args.stage_seconds,
            workload.originals,
        )
        self.result["breakdown"][workload.key] = {"stages_ms": costs}
        self.progress(
            f"stages {workload.key}: "
            + ", ".join(
                f"{k} {v:.3f}"
                for k, v in costs.items()
                if isinstance(v, float) and k.endswith("_ms")
            )
        )


def prepare_workloads(args, bench: Bench) -> tuple[list[BenchModel], list[Workload], dict]:
    work = args.work
    small = default_model(work, args.default_model, args.default_checkpoint)
    photo_model = small if args.quick else vit_s16(work)
    files, source = img.find_photos(args.photos)
    if files:
        photos = [f.read_bytes() for f in files]
    else:
        source = (
            "SYNTHETIC JPEGs (no photograph found: apt-get install "
            "lomiri-wallpapers-16.04 lomiri-wallpapers-20.04, or pass --photos)"
        )
        photos = img.synthetic_jpegs(8)
    sent = [img.shrink_jpeg(p, args.photo_side) for p in photos] if args.photo_side else photos
    card = small.card
    tiny = img.tiny_images(photos, card["image_size"], card["preprocessing"]["color_mode"], 64)
    bodies = work / "bodies"
    workloads = [
        Workload(
            "small",
            small,
            f"{len(tiny)} {card['image_size']} px {card['preprocessing']['color_mode']} PNGs",
            img.write_bodies(tiny, bodies / "small.jsonl"),
        ),
        Workload(
            "photo",
            photo_model,
            f"{len(sent)} JPEG photographs"
            + (f", longer side {args.photo_side} px" if args.photo_side else ", as found"),
            img.write_bodies(sent, bodies / "photo.jsonl"),
            originals=photos,
        ),
    ]
    models = [small] if photo_model is small else [small, photo_model]
    described = {
        "photos": {
            "source": source,
            "files": [str(f) for f in files],
            "sent_longer_side": args.photo_side or None,
            "sent_bytes_mean": sum(map(len, sent)) / len(sent),
            "original_bytes_mean": sum(map(len, photos)) / len(photos),
        },
        "small": {
            "count": len(tiny),
            "size": card["image_size"],
            "mode": card["preprocessing"]["color_mode"],
            "format": "PNG",
            "bytes_mean": sum(map(len, tiny)) / len(tiny),
            "from": "center crops of the photographs",
        },
    }
    return models, workloads, described


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder for results.json, results.md and results.png",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("runs/bench"),
        help="cache of built models, request bodies and server logs",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: tiny settings")
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="onnxruntime provider (and PyTorch device) for every part",
    )
    p.add_argument(
        "--default-model",
        type=Path,
        help="model directory to use as the default "
        "model (default: service/default_model, or a 2-step fallback)",
    )
    p.add_argument(
        "--default-checkpoint",
        type=Path,
        help="its checkpoint, for PyTorch (default: its architecture, random weights)",
    )
    p.add_argument(
        "--photos",
        nargs="+",
        help="JPEG files or globs (default: the Debian "
        "wallpaper photographs and matplotlib's grace_hopper.jpg)",
    )
    p.add_argument(
        "--photo-side",
        type=int,
        default=1024,
        help="re-encode photographs with this longer side before sending; 0: send "
        "the files as they are",
    )
    p.add_argument(
        "--parts",
        default="engine,targets,service,naive,breakdown",
        help="comma-separated subset of engine,targets,service,naive,breakdown",
    )
    p.add_argument("--rounds", type=int, help="rounds of the side-by-side target figures")
    p.add_argument("--seconds", type=float, help="steady-state seconds per load point")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that every server started here is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    quick = args.quick
    args.batches = [1, 16] if quick else [1, 8, 16, 32]
    args.concurrency = args.concurrency or ([1, 4] if quick else [1, 4, 16, 64])
    args.target_concurrency = 4 if quick else 16
    args.rounds = args.rounds or (1 if quick else 3)
    args.seconds = args.seconds or (0.5 if quick else 5.0)
    args.warmup_s = 0.3 if quick else 1.0
    args.max_requests = 2000 if quick else 100_000
    args.engine_seconds = 0.3 if quick else 3.0
    args.stage_seconds = 0.1 if quick else 0.5
    if quick:
        args.photo_side = min(args.photo_side or 256, 256)
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    started = time.time()
    r = bench.result
    r.update(
        command="python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        quick=quick,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(args.provider),
    )
    with LoadMonitor() as monitor:
        bench.progress("preparing models and images")
        models, workloads, r["images"] = prepare_workloads(args, bench)
        r["models"] = {m.key: m.describe() for m in models}
        r["workloads"] = {w.key: {"model": w.model.key, "images": w.images} for w in workloads}
        if "engine" in parts:
            bench.engines(models)
        for w in workloads:
            if "targets" in parts:
                bench.rounds(w)
            if "service" in parts:
                bench.service(w)
            if "naive" in parts:
                bench.naive(w)
            if "breakdown" in parts:
                bench.breakdown(w)
    r["load"] = monitor.summary()
    r["duration_s"] = time.time() - started
    r["targets"] = compute_targets(r)
    (args.out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    write_markdown(r, args.out / "results.md")
    write_plot(r, args.out / "results.png")
    bench.progress(f"done in {r['duration_s']:.0f} s: {args.out}/results.{{json,md,png}}")
    for t in r["targets"]:
        print(f"  {t['status']:4s} {t['name']}: {t['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
