"""Projections fitted on training features: PCA and PCA-whitening (numpy).

A projection maps x [N, D] to (x - mean) @ matrix, [N, d]; `simmim export --project` bakes it
into encoder.onnx, and `simmim evaluate --project` applies the same to any features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("pca", "pca-whiten")


@dataclass(frozen=True)
class Projection:
    kind: str  # pca | pca-whiten
    mean: np.ndarray  # float32 [D]
    matrix: np.ndarray  # float32 [D, d]
    explained: float  # share of the variance kept by the d axes

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [N, D] -> [N, d] float32."""
        return ((x - self.mean) @ self.matrix).astype(np.float32)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "input_dim": int(self.mean.shape[0]),
            "explained_variance": round(self.explained, 6),
        }


def parse_projection(text: str) -> tuple[str, int]:
    """'pca:D' or 'pca-whiten:D' -> (kind, D); ValueError naming what is wrong."""
    kind, _, dim = text.partition(":")
    if kind not in KINDS or not dim.isdigit() or int(dim) < 1:
        raise ValueError(
            f"projection {text!r} is not one of pca:D or pca-whiten:D "
            "(D a positive number of dimensions, e.g. pca-whiten:256)"
        )
    return kind, int(dim)


def fit_projection(features: np.ndarray, kind: str, dim: int) -> Projection:
    """Fit on features [N, D]: centre, keep the top `dim` principal axes, and for pca-whiten
    divide by their standard deviations (so every kept axis has unit variance)."""
    n, d = features.shape
    if not 1 <= dim <= min(n, d):
        raise ValueError(
            f"cannot keep {dim} principal axes of {n} features of {d} dimensions "
            f"(at most {min(n, d)})"
        )
    x = features.astype(np.float64)
    mean = x.mean(0)
    x -= mean
    cov = (x.T @ x) / max(1, n - 1)  # [D, D]
    values, vectors = np.linalg.eigh(cov)  # ascending
    values, vectors = values[::-1][:dim], vectors[:, ::-1][:, :dim]
    values = np.maximum(values, 0.0)
    explained = float(values.sum() / max(np.trace(cov), 1e-12))
    if kind == "pca-whiten":
        vectors = vectors / np.sqrt(values + 1e-6 * max(values[0], 1e-12))
    elif kind != "pca":
        raise ValueError(f"unknown projection kind {kind!r}; choose one of {KINDS}")
    return Projection(kind, mean.astype(np.float32), vectors.astype(np.float32), explained)
