"""Servers under test, each a subprocess on a free loopback port: the real `simmim serve` and the
naive PyTorch endpoint. Started, polled until ready (with a deadline), stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    """A server subprocess; `with Server(...) as s:` starts it and waits until it is ready."""

    def __init__(
        self,
        cmd: list[str],
        port: int,
        log_path: Path,
        env: dict | None = None,
        ready_timeout: float = 300.0,
    ):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SIMMIM_")}
        self.env = {**inherited, **(env or {})}  # only the settings given here
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(self.cmd)} exited {self.proc.returncode}; log: {self.log_path}"
                )
            try:
                if http_get(self.url + "/health/ready", 1.0)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(
                    f"{' '.join(self.cmd)} not ready after "
                    f"{self.ready_timeout:g} s; log: {self.log_path}"
                )
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def info(self) -> dict:
        return json.loads(http_get(self.url + "/info")[1])

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{label=value,...}': value}."""
        text = http_get(self.url + "/metrics")[1].decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


def simmim_serve(
    model_dir: Path, log_path: Path, settings: dict[str, str] | None = None, provider: str = "cpu"
) -> Server:
    """`simmim serve` with default settings (logging included) except the provider and those
    given (SIMMIM_* names, without the prefix)."""
    port = free_port()
    env = {f"SIMMIM_{k.upper()}": str(v) for k, v in (settings or {}).items()}
    env["SIMMIM_PROVIDER"] = provider
    cmd = [
        sys.executable,
        "-m",
        "simmim_cli",
        "serve",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
    ]
    return Server(cmd, port, log_path, env)


def naive_serve(
    model_dir: Path,
    checkpoint: Path | None,
    log_path: Path,
    provider: str = "cpu",
    threads: int = 0,
) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.naive_server",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cuda" if provider == "cuda" else "cpu",
        "--threads",
        str(threads),
    ]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    return Server(cmd, port, log_path)
