"""Image files -> raw embeddings on this machine: the service's onnxruntime backend
(service.backend.OnnxBackend) behind the one preprocessing (simmim_core.preprocess), so a file
gives the vector that the service's /embed gives for its bytes (normalize=false)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from service.backend import OnnxBackend
from service.settings import default_model_path
from simmim_core.model_dir import ModelDir, ModelDirError, load_model_dir
from simmim_core.preprocess import ImageDecodeError, preprocess_image

from .errors import UsageError
from .vectors import ModelStamp


def open_model_dir(path: os.PathLike | str | None) -> ModelDir:
    """load_model_dir (sha256 of every file checked), its errors as UsageError."""
    try:
        return load_model_dir(default_model_path() if path is None else path)
    except ModelDirError as e:
        raise UsageError(f"--model-dir: {e}") from None


class ImageEncoder:
    """A model directory's encoder.onnx (or encoder.int8.onnx) in onnxruntime on the CPU, with
    `threads` intra-op threads (0: every CPU this process may use)."""

    def __init__(self, model: ModelDir, int8: bool = False, threads: int = 0):
        self.stamp = ModelStamp.from_card(model.card, int8)
        self.spec = model.preprocessing
        self.backend = OnnxBackend(model, "cpu", threads, max_batch_size=1, int8=int8)

    def embed_files(self, paths: list[str]) -> tuple[np.ndarray, list[str | None]]:
        """N paths -> (float32 [N, D] raw pooled embeddings, N errors). A file that cannot be
        read, decoded or embedded gets its error (and a row of zeros) instead of raising."""
        errors: list[str | None] = []
        pixels = []
        for path in paths:
            try:
                pixels.append(preprocess_image(Path(path).read_bytes(), self.spec))
                errors.append(None)
            except OSError as e:
                errors.append(f"cannot read the file ({e.strerror or type(e).__name__})")
            except ImageDecodeError as e:
                errors.append(str(e))
            except Exception as e:  # an image Pillow chokes on: still the file's fault
                errors.append(f"image could not be processed ({type(e).__name__})")
        vectors = np.zeros((len(paths), self.stamp.dim), np.float32)
        ok = [i for i, e in enumerate(errors) if e is None]
        if ok:
            vectors[ok] = self.backend.embed(np.stack(pixels))
            for i in ok:
                if not np.isfinite(vectors[i]).all():
                    errors[i] = "the model produced NaN or infinite values for this image"
        return vectors, errors
