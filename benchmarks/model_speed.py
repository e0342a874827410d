"""Part 1, the engine's own ceiling: img/s of model calls at a fixed batch size.

onnxruntime runs as the service runs it (service.backend: its session options, and `workers`
calls at once on one shared session, `threads` intra-op threads each; on this CPU two calls of
one thread, which beats one call of two threads); `ort_fp32_1call` is the reference of one call
at a time on every thread. PyTorch eager runs the same network under inference_mode with its
default thread count. Inputs are random normalised pixels: the speed of these networks does not
depend on the pixel values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from .models import BenchModel, torch_encoder

ENGINES = ("ort_fp32", "ort_fp32_1call", "ort_int8", "torch_eager")


def in_threads(workers: int, fn: Callable, *args) -> None:
    """fn(*args) on `workers` threads at once; returns when all are done."""
    threads = [threading.Thread(target=fn, args=args) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(
    call: Callable[[], object], batch: int, seconds: float, workers: int = 1, min_calls: int = 2
) -> dict:
    """One warm-up call per worker, then `workers` threads each calling until `seconds` have
    passed and it has made at least min_calls."""
    times: list[float] = []

    def work(deadline: float) -> None:
        n = 0
        while n < min_calls or time.perf_counter() < deadline:
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
            n += 1

    in_threads(workers, call)
    start, cpu = time.perf_counter(), time.process_time()
    in_threads(workers, work, start + seconds)
    wall = time.perf_counter() - start
    return {
        "batch": batch,
        "workers": workers,
        "calls": len(times),
        "img_s": batch * len(times) / wall,
        "ms_per_call_median": float(np.median(times)) * 1e3,
        "cpu_ms_per_image": (time.process_time() - cpu) / (batch * len(times)) * 1e3,
    }


class OrtEncoder:
    """encoder.onnx or encoder.int8.onnx in one onnxruntime session, as the service makes it
    (one_call: one call at a time on every thread instead)."""

    def __init__(self, model: BenchModel, int8: bool, provider: str, one_call: bool = False):
        import onnxruntime as ort

        from service.backend import parallelism, resolve_providers, session_options

        # as one server process: the benchmark's engine is one process
        _, self.workers, threads = parallelism(provider, 1, 1 if one_call else 0, 0)
        self.session = ort.InferenceSession(
            str(model.onnx(int8)),
            sess_options=session_options(threads),
            providers=resolve_providers(provider),
        )
        self.shape = (model.card["in_chans"], model.card["image_size"], model.card["image_size"])

    def caller(self, batch: int) -> Callable[[], object]:
        pixels = np.random.default_rng(0).standard_normal((batch, *self.shape), np.float32)
        return lambda: self.session.run(["embedding"], {"pixels": pixels})


class TorchEncoder:
    """The same network in PyTorch eager (model.embed under inference_mode)."""

    workers = 1

    def __init__(self, model: BenchModel, provider: str):
        import torch

        self.torch = torch
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.net, self.note = torch_encoder(model, self.device)
        self.shape = (model.card["in_chans"], model.card["image_size"], model.card["image_size"])

    def caller(self, batch: int) -> Callable[[], object]:
        torch = self.torch
        pixels = torch.randn(batch, *self.shape, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(self.device)

        def call():
            with torch.inference_mode():
                out = self.net.embed(pixels)
            if self.device == "cuda":
                torch.cuda.synchronize()
            return out

        return call


def make_engine(name: str, model: BenchModel, provider: str):
    if name == "torch_eager":
        return TorchEncoder(model, provider)
    return OrtEncoder(
        model, int8=name == "ort_int8", provider=provider, one_call=name == "ort_fp32_1call"
    )


def run_engines(
    model: BenchModel,
    batches: list[int],
    seconds: float,
    provider: str,
    engines=ENGINES,
    progress: Callable[[str], None] = print,
) -> dict:
    """{engine: {batch: result}} for every engine the model has (int8 only if exported)."""
    results: dict = {}
    for name in engines:
        if name == "ort_int8" and not model.has_int8:
            continue
        engine = make_engine(name, model, provider)
        results[name] = {}
        for batch in batches:
            r = measure(engine.caller(batch), batch, seconds, engine.workers)
            results[name][str(batch)] = r
            progress(f"engine {model.key} {name} batch {batch}: {r['img_s']:.1f} img/s")
        del engine
    return results
