"""Helpers for the service and client tests: a real `simmim serve` (uvicorn) in a subprocess on a
free loopback port, polling with deadlines instead of sleeps, Prometheus parsing, test images
made by Pillow, and references computed directly from the model directory (onnxruntime, or the
dummy backend)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import onnxruntime as ort
from dummy_backend import DummyBackend
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from simmim_core.model_dir import ENCODER, RECONSTRUCT, load_model_dir
from simmim_core.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("service_launcher.py")
API_KEY = "test-key-0123456789"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """Poll condition() until it returns something truthy, and return that; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)
    return value


class ServerProcess:
    """`simmim serve` through tests/service_launcher.py (torch blocked), logging to a file.

    env: extra SIMMIM_* settings; dummy: serve tests/dummy_backend.py instead of onnxruntime;
    fail: "raise" or "kill", every model call after the warm-up raises (dummy_backend.failing);
    gated: every model call waits for open_gate() (the warm-up too, so a gated server starts
    unready); program: another command line that takes the serve options, instead of the
    launcher; args: more serve options; processes: server processes (2: the default on a CPU
    with 2 cores or more, one model call each).
    """

    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        env: dict[str, str] | None = None,
        dummy: bool = False,
        fail: str | None = None,
        gated: bool = False,
        api_key: str | None = API_KEY,
        program: list[str] | None = None,
        args: tuple[str, ...] = (),
        processes: int = 1,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = workdir / "server.log"
        self.gate_file = workdir / "gate" if gated else None
        cmd = list(program or [sys.executable, str(LAUNCHER)])
        if dummy:
            cmd.append("--dummy")
        if fail:
            cmd += ["--fail", fail]
        if gated:
            cmd += ["--gate", str(self.gate_file)]
        # gated: one process, one model call at a time, so that a closed gate holds exactly one
        # batch; otherwise two calls on one shared session per process, whatever the machine's
        # CPU count. Batches fill up to max_batch_size: no cap timed at start-up
        # (test_service_calibrate does that)
        assert not (gated and processes > 1), "the gate holds one process only"
        workers = "1" if gated else "2"
        cmd += [
            "--model-dir",
            str(model_dir),
            "--port",
            str(self.port),
            "--threads",
            "1",
            "--processes",
            str(processes),
            "--workers",
            workers,
            "--no-tune-batch-size",
            *args,
        ]
        full_env = {**os.environ, "SIMMIM_LOG_LEVEL": "info", **(env or {})}
        full_env.pop("SIMMIM_API_KEY", None)
        if api_key:
            full_env["SIMMIM_API_KEY"] = api_key
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        try:
            self.wait_live()
        except BaseException:
            self.stop()
            raise

    # --- state ------------------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text()

    def _get_status(self, path: str) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.http.get(path).status_code
        except httpx.TransportError:
            return None

    def wait_live(self) -> None:
        wait_until(lambda: self._get_status("/health/live") == 200, "/health/live")

    def wait_ready(self) -> None:
        wait_until(lambda: self._get_status("/health/ready") == 200, "/health/ready")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 when absent)."""
        return metric_value(self.http.get("/metrics").text, name, **labels)

    def batches_of_size(self, task: str, low: int, high: int) -> float:
        """How many batches of `task` had low < size <= high (histogram buckets)."""
        bucket = "simmim_batch_size_bucket"
        return self.metric(bucket, task=task, le=f"{float(high)}") - self.metric(
            bucket, task=task, le=f"{float(low)}"
        )

    # --- control ----------------------------------------------------------------------------
    def _gate(self, sig: int, state: str) -> None:
        self.proc.send_signal(sig)
        wait_until(
            lambda: self.gate_file.exists() and self.gate_file.read_text() == state, f"gate {state}"
        )

    def open_gate(self) -> None:
        self._gate(signal.SIGUSR1, "open")

    def close_gate(self) -> None:
        self._gate(signal.SIGUSR2, "closed")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        if self.proc.poll() is None:
            if self.gate_file is not None:
                self.proc.send_signal(signal.SIGUSR1)  # nothing may stay held
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class InProcessServer:
    """`app` served by uvicorn on a free loopback port, on a thread of the test process (so that
    the test can see what the app does in process: its spans, its imports)."""

    def __init__(self, app, port: int):
        import uvicorn

        self.app, self.url = app, f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self._thread.start()
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self._thread.is_alive():
                raise AssertionError("the in-process server stopped")
            try:
                return self.http.get("/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "/health/ready")

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.http.get("/metrics").text, name, **labels)

    def stop(self) -> None:
        """Shut down as on SIGTERM: uvicorn's shutdown, then the app's lifespan end."""
        self._server.should_exit = True
        self._thread.join(60)
        self.http.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in `text` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- images --------------------------------------------------------------------------------
def make_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A distinct picture per seed: a smooth gradient, a bright rectangle and some noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = (x * rng.uniform(1, 5) + y * rng.uniform(1, 5)) % 256
    rgb = np.stack([base, base[::-1], np.full_like(base, rng.integers(0, 256))], axis=-1)
    x0, y0 = rng.integers(0, w // 2 + 1), rng.integers(0, h // 2 + 1)
    rgb[y0 : y0 + h // 3, x0 : x0 + w // 3] = 255
    rgb += rng.normal(0, 8, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(make_image(seed, size))


# --- onnxruntime directly on the model directory -------------------------------------------
class Reference:
    """The model directory run by onnxruntime in the test process, on the shared preprocessing."""

    def __init__(self, model_dir: Path):
        self.model = load_model_dir(model_dir)
        self.spec = self.model.preprocessing
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(str(self.model.file(ENCODER)), providers=providers)
        self._recon = ort.InferenceSession(str(self.model.file(RECONSTRUCT)), providers=providers)

    def pixels(self, images: list[bytes]) -> np.ndarray:
        return preprocess(images, self.spec)

    def embed(self, images: list[bytes]) -> np.ndarray:
        """Raw (not normalised) embeddings, [N, D]."""
        return self._encoder.run(["embedding"], {"pixels": self.pixels(images)})[0]

    def reconstruct(self, image: bytes, mask: np.ndarray) -> np.ndarray:
        """[C, H, W] reconstruction for one image and its [h, w] mask."""
        return self._recon.run(
            ["reconstruction"],
            {"pixels": self.pixels([image]), "mask": mask[None].astype(np.float32)},
        )[0][0]


class DummyReference:
    """What a server on the dummy backend answers (its reconstruction: the pixels themselves)."""

    def __init__(self, model_dir: Path):
        self.model = load_model_dir(model_dir)
        self.spec = self.model.preprocessing
        self._backend = DummyBackend(self.model)

    def pixels(self, images: list[bytes]) -> np.ndarray:
        return preprocess(images, self.spec)

    def embed(self, images: list[bytes]) -> np.ndarray:
        """Raw (not normalised) embeddings, [N, D]."""
        return self._backend.embed(self.pixels(images))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
