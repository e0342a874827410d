"""Run `simmim serve` for the tests: torch, torchvision and timm made unimportable (the service
must not need them), on the real backend or the dummy one, optionally behind a gate.

usage: python tests/service_launcher.py [--dummy] [--fail raise|kill] [--gate STATE_FILE]
           [SERVE OPTIONS...]

--dummy serves tests/dummy_backend.DummyBackend instead of onnxruntime (through service.cli's
backend argument, in every server process). --fail makes every model call after the warm-up
raise: RuntimeError (raise: a failed batch) or a BaseException (kill: a model worker that
dies). With --gate, every model call (the warm-up too)
waits while the gate is closed. It starts closed, so the server stays unready. SIGUSR1 opens it,
SIGUSR2 closes it, and each change is acknowledged by writing "open" or "closed" to STATE_FILE,
so a test can wait for the acknowledgement instead of sleeping. The gate holds one server
process (signals reach the parent only).
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import signal
import sys
import threading
from pathlib import Path

BLOCKED = {"torch", "torchvision", "timm"}


class BlockHeavyImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the service must run without it")
        return None


class GatedBackend:
    """`inner` with every model call waiting while `gate` is clear."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate = inner, gate
        self.max_batch_size = inner.max_batch_size

    def embed(self, pixels):
        self.gate.wait()
        return self.inner.embed(pixels)

    def reconstruct(self, pixels, mask):
        self.gate.wait()
        return self.inner.reconstruct(pixels, mask)

    def warmup(self) -> None:
        self.gate.wait()
        self.inner.warmup()

    def describe(self) -> dict:
        return self.inner.describe()


def install_gate(state_file: Path, load):
    """A backend factory: load's backend behind a gate that SIGUSR1/SIGUSR2 open and close."""
    gate = threading.Event()

    def set_gate(is_open: bool) -> None:
        gate.set() if is_open else gate.clear()
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text("open" if is_open else "closed")
        os.replace(tmp, state_file)

    signal.signal(signal.SIGUSR1, lambda *_: set_gate(True))
    signal.signal(signal.SIGUSR2, lambda *_: set_gate(False))
    set_gate(False)
    return lambda model, settings, threads: GatedBackend(load(model, settings, threads), gate)


def main(argv: list[str]) -> int:
    from service.backend import OnnxBackend
    from service.cli import main as serve

    backend = OnnxBackend.from_settings
    if argv[:1] == ["--dummy"]:
        from dummy_backend import DummyBackend

        backend, argv = DummyBackend, argv[1:]
    if argv[:1] == ["--fail"]:
        from dummy_backend import failing

        backend, argv = functools.partial(failing, backend, argv[1]), argv[2:]
    if argv[:1] == ["--gate"]:
        backend, argv = install_gate(Path(argv[1]), backend), argv[2:]
    return serve(argv, backend=backend)


if __name__ in ("__main__", "__mp_main__"):  # __mp_main__: a server process it spawned
    sys.meta_path.insert(0, BlockHeavyImports())
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
