"""A deterministic stand-in for the model, for the API tests where the model does not matter:
served through the Backend seam (create_app(settings, backend=DummyBackend)), no ONNX session.

embed: a fixed random projection of the pixels (seed 0), so that every pixel counts and equal
pixels give equal vectors; reconstruct: the input itself. The model directory still gives the
shapes and the preprocessing.
"""

from __future__ import annotations

import numpy as np

from service.settings import Settings
from simmim_core.model_dir import ModelDir


class DummyBackend:
    """A BackendFactory too: DummyBackend(model, settings, threads)."""

    def __init__(self, model: ModelDir, settings: Settings | None = None, threads: int = 1):
        card = model.card
        c, s = card["in_chans"], card["image_size"]
        self.image_shape = (c, s, s)
        self.mask_shape = (s // card["patch_size"], s // card["patch_size"])
        self.max_batch_size = settings.max_batch_size if settings else 1
        self.threads = threads
        rng = np.random.default_rng(0)
        self._projection = rng.standard_normal((c * s * s, card["embedding_dim"])) / np.sqrt(
            c * s * s
        )

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] -> float32 [N, D] (in float64, then rounded: an image gets the
        same vector, to float32 precision, whatever else is in its batch)."""
        flat = pixels.reshape(len(pixels), -1).astype(np.float64)
        return (flat @ self._projection).astype(np.float32)

    def reconstruct(self, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W], [N, h, w] -> the pixels, unchanged."""
        assert mask.shape[1:] == self.mask_shape, mask.shape
        return pixels.copy()

    def warmup(self) -> None:
        pixels = np.zeros((self.max_batch_size, *self.image_shape), np.float32)
        self.embed(pixels)

    def describe(self) -> dict:
        return {"runtime": "dummy (tests/dummy_backend.py)", "threads": self.threads}


class WorkerKilled(BaseException):
    """What no `except Exception` catches: stands for a model worker that dies (as SystemExit
    or KeyboardInterrupt raised in its thread would)."""


class FailingBackend:
    """`inner` (warm-up included), except that every model call raises `error`."""

    def __init__(self, inner, error: type[BaseException]):
        self.inner, self.error = inner, error
        self.max_batch_size = inner.max_batch_size

    def embed(self, pixels):
        raise self.error("the test backend fails")

    reconstruct = embed

    def warmup(self) -> None:
        self.inner.warmup()

    def describe(self) -> dict:
        return self.inner.describe()


def failing(load, mode: str, model, settings, threads) -> FailingBackend:
    """A BackendFactory with functools.partial(failing, load, mode) (it pickles, for several
    server processes): load's backend, each model call after the warm-up raising RuntimeError
    (mode "raise": a failed batch) or WorkerKilled (mode "kill": a model worker that dies)."""
    error = {"raise": RuntimeError, "kill": WorkerKilled}[mode]
    return FailingBackend(load(model, settings, threads), error)
