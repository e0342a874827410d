"""The model runtime behind the batcher: synchronous, a batch in, a batch out. `Backend` is the
seam (what the engine calls); `OnnxBackend` is the one `simmim serve` runs (onnxruntime); a
`BackendFactory` loads one, in the background after start-up.

Shapes: pixels float32 [N, C, H, W] normalised; mask uint8 [N, h, w] at the encoder's patch grid
(1 = masked); embedding float32 [N, D] pooled, not normalised; reconstruction float32
[N, C, H, W] in normalised pixel space.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from simmim_core.model_dir import ENCODER, ENCODER_INT8, RECONSTRUCT, ModelDir, ModelDirError

from .settings import Settings

log = logging.getLogger("simmim.backend")

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


class Backend(Protocol):
    """What the batcher needs: a largest batch, the two model calls, and a warm-up."""

    max_batch_size: int

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] -> float32 [N, D]."""

    def reconstruct(self, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W], uint8 [N, h, w] -> float32 [N, C, H, W]."""

    def warmup(self) -> None:
        """Run each model once at max_batch_size, so the first request pays no allocation."""

    def describe(self) -> dict:
        """What /info shows about the runtime (JSON-ready)."""


class BackendFactory(Protocol):
    """Loads a Backend for a model directory: called once, on a worker thread, after the server
    has started (threads: intra-op threads per model call, from service.backend.parallelism).
    With several server processes it is sent to each, so it must pickle (a module-level class
    or function). OnnxBackend.from_settings is the default."""

    def __call__(self, model: ModelDir, settings: Settings, threads: int) -> Backend: ...


def resolve_providers(provider: str) -> list[str]:
    """auto -> CUDA (then CPU) when onnxruntime can use CUDA, else CPU; cuda -> CUDA or an error."""
    available = ort.get_available_providers()
    if provider == "cpu" or (provider == "auto" and CUDA not in available):
        return [CPU]
    if CUDA not in available:
        raise RuntimeError(
            f"provider 'cuda' requested but onnxruntime offers only {available} "
            "(install onnxruntime-gpu, and check the CUDA libraries)"
        )
    return [CUDA, CPU]


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's --cpus), which onnxruntime itself does not see."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = cgroup_cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus or 1


def parallelism(provider: str, processes: int, workers: int, threads: int) -> tuple[int, int, int]:
    """(server processes, model calls at once per process, intra-op threads per call), 0 meaning
    automatic. On CUDA: one process, one call. On the CPU: two processes if there are at least
    2 CPUs; each process takes its share of the CPUs and runs two calls if the share is at
    least 2 CPUs, else one; each call gets its share of the process's CPUs."""
    cuda = provider == "cuda" or (provider == "auto" and CUDA in ort.get_available_providers())
    cpus = available_cpus()
    processes = processes or (1 if cuda or cpus < 2 else 2)
    share = max(1, cpus // processes)
    workers = workers or (1 if cuda or share < 2 else 2)
    return processes, workers, threads or max(1, share // workers)


def session_options(threads: int) -> ort.SessionOptions:
    """All graph optimisations; `threads` intra-op threads (0: available_cpus()); no spinning,
    so idle worker threads give the cores back to decoding and the event loop."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _check_io(
    session: ort.InferenceSession, path: Path, kind: str, expected: dict[str, tuple]
) -> None:
    """Raise ModelDirError unless each named input/output has the expected fixed dims.

    expected: name -> dims, where None stands for the (dynamic) batch axis.
    """
    args = session.get_inputs() if kind == "input" else session.get_outputs()
    found = {a.name: a.shape for a in args}
    for name, dims in expected.items():
        if name not in found:
            raise ModelDirError(f"{path}: has no {kind} named {name!r} (found {sorted(found)})")
        shape = found[name]
        if len(shape) != len(dims):
            raise ModelDirError(f"{path}: {kind} {name!r} has shape {shape}, expected {dims}")
        if isinstance(shape[0], int):
            raise ModelDirError(
                f"{path}: {kind} {name!r} has a fixed batch size {shape[0]}; "
                "export it with a dynamic batch axis"
            )
        for got, want in zip(shape[1:], dims[1:]):
            if isinstance(got, int) and got != want:
                raise ModelDirError(
                    f"{path}: {kind} {name!r} has shape {shape}, but model.json implies {dims}"
                )


class OnnxBackend:
    """encoder.onnx (or encoder.int8.onnx) and reconstruct.onnx in onnxruntime sessions, created
    once. Session.run releases the GIL, so calling it from worker threads keeps the event loop
    free; it is thread-safe, so several workers share one session (and one copy of the
    weights), each call running on `threads` intra-op threads."""

    def __init__(
        self,
        model: ModelDir,
        provider: str = "auto",
        threads: int = 0,
        max_batch_size: int = 32,
        int8: bool = False,
    ):
        card = model.card
        if int8 and not model.has_int8:
            raise ModelDirError(
                f"{model.path}: int8 requested but model.json lists no {ENCODER_INT8}"
            )
        self.max_batch_size = max_batch_size
        self.provider = provider
        self.providers = resolve_providers(provider)
        options = session_options(threads)
        self.threads = options.intra_op_num_threads
        c, s, p = card["in_chans"], card["image_size"], card["patch_size"]
        self.image_shape = (c, s, s)
        self.mask_shape = (s // p, s // p)
        self.encoder_file = ENCODER_INT8 if int8 else ENCODER
        self._encoder = self._session(model.file(self.encoder_file), options)
        self._reconstructor = self._session(model.file(RECONSTRUCT), options)
        pixels = (None, c, s, s)
        _check_io(self._encoder, model.file(self.encoder_file), "input", {"pixels": pixels})
        _check_io(
            self._encoder,
            model.file(self.encoder_file),
            "output",
            {"embedding": (None, card["embedding_dim"])},
        )
        _check_io(
            self._reconstructor,
            model.file(RECONSTRUCT),
            "input",
            {"pixels": pixels, "mask": (None, *self.mask_shape)},
        )
        _check_io(
            self._reconstructor, model.file(RECONSTRUCT), "output", {"reconstruction": pixels}
        )
        mask_type = next(i.type for i in self._reconstructor.get_inputs() if i.name == "mask")
        if mask_type not in ORT_DTYPES:
            raise ModelDirError(
                f"{model.file(RECONSTRUCT)}: input 'mask' has unsupported type {mask_type}"
            )
        self._mask_dtype = ORT_DTYPES[mask_type]
        log.info(
            "onnxruntime %s, providers %s, %s + %s",
            ort.__version__,
            self._encoder.get_providers(),
            self.encoder_file,
            RECONSTRUCT,
        )

    @classmethod
    def from_settings(cls, model: ModelDir, settings: Settings, threads: int) -> OnnxBackend:
        """The BackendFactory of `simmim serve`."""
        return cls(model, settings.provider, threads, settings.max_batch_size, settings.int8)

    def _session(self, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        """A session on self.providers; 'cuda' fails loudly if onnxruntime fell back to the CPU
        (e.g. the CUDA or cuDNN libraries could not be loaded)."""
        session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        if CUDA in self.providers and CUDA not in session.get_providers():
            if self.provider == "cuda":
                raise RuntimeError(
                    f"provider 'cuda' requested but onnxruntime could not use it "
                    f"for {path.name} (got {session.get_providers()}); check the "
                    "CUDA and cuDNN libraries"
                )
            log.warning("CUDA is installed but unusable for %s; running on the CPU", path.name)
        return session

    def describe(self) -> dict:
        return {
            "runtime": f"onnxruntime {ort.__version__}",
            "threads": self.threads,
            "providers": self._encoder.get_providers(),
            "encoder_file": self.encoder_file,
        }

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return self._encoder.run(["embedding"], {"pixels": pixels})[0]

    def reconstruct(self, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"pixels": pixels, "mask": mask.astype(self._mask_dtype, copy=False)}
        return self._reconstructor.run(["reconstruction"], feeds)[0]

    def warmup(self) -> None:
        n = self.max_batch_size
        pixels = np.zeros((n, *self.image_shape), np.float32)
        self.embed(pixels)
        self.reconstruct(pixels, np.ones((n, *self.mask_shape), np.uint8))
