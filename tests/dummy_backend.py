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
