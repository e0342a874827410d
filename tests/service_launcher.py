"""Run `simmim serve` for the tests: torch, torchvision and timm made unimportable (the service
must not need them), and optionally a gate in front of every model call.

usage: python tests/service_launcher.py [--gate STATE_FILE] [SERVE OPTIONS...]

With --gate, the real OnnxBackend's embed and reconstruct wait while the gate is closed. It
starts closed, so the warm-up waits and the server stays unready. SIGUSR1 opens it, SIGUSR2
closes it, and each change is acknowledged by writing "open" or "closed" to STATE_FILE, so a test
can wait for the acknowledgement instead of sleeping.
"""

from __future__ import annotations

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


def install_gate(state_file: Path) -> None:
    from service.backend import OnnxBackend

    gate = threading.Event()

    def set_gate(is_open: bool) -> None:
        gate.set() if is_open else gate.clear()
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text("open" if is_open else "closed")
        os.replace(tmp, state_file)

    def gated(method):
        def wait_then_call(self, *args):
            gate.wait()
            return method(self, *args)

        return wait_then_call

    OnnxBackend.embed = gated(OnnxBackend.embed)
    OnnxBackend.reconstruct = gated(OnnxBackend.reconstruct)
    signal.signal(signal.SIGUSR1, lambda *_: set_gate(True))
    signal.signal(signal.SIGUSR2, lambda *_: set_gate(False))
    set_gate(False)


def main(argv: list[str]) -> int:
    sys.meta_path.insert(0, BlockHeavyImports())
    if argv[:1] == ["--gate"]:
        install_gate(Path(argv[1]))
        argv = argv[2:]
    from service.cli import main as serve

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
