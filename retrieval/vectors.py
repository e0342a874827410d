"""vectors.parquet: what `simmim embed` writes and `simmim index` reads.

Rows:
  path       string, absolute
  embedding  fixed_size_list<float32>[D]: the raw pooled encoder output, exactly what the
             service's /embed answers with normalize=false (L2-normalise it for dot products;
             Milvus's COSINE does not depend on the norm); null when the file failed
  error      null, or why the file could not be embedded (unreadable, not an image...)
Schema metadata (the model that made the vectors): simmim.model, simmim.encoder_file,
simmim.encoder_sha256, simmim.dim, simmim.normalized ("false").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simmim_core.model_dir import ENCODER, ENCODER_INT8

from .errors import UsageError

KEYS = ("model", "encoder_file", "encoder_sha256", "dim")
PREFIX = "simmim."


@dataclass(frozen=True)
class ModelStamp:
    """Which model made a set of vectors: two sets are comparable iff encoder_sha256 agrees."""

    model: str  # the card's name
    encoder_file: str  # encoder.onnx or encoder.int8.onnx
    encoder_sha256: str
    dim: int

    @classmethod
    def from_card(cls, card: dict, int8: bool = False) -> ModelStamp:
        """From a model card (model.json, or the service's /info "model")."""
        encoder_file = ENCODER_INT8 if int8 else ENCODER
        if encoder_file not in card["files"]:
            raise UsageError(
                f"model {card['name']} has no {encoder_file} (export it with --int8, or leave "
                "out --int8)"
            )
        sha = card["files"][encoder_file]["sha256"]
        return cls(card["name"], encoder_file, sha, int(card["embedding_dim"]))

    def to_strings(self) -> dict[str, str]:
        """{"simmim.model": ..., ...}: Parquet metadata, Milvus collection properties."""
        return {PREFIX + k: str(getattr(self, k)) for k in KEYS}

    @classmethod
    def from_strings(cls, values: dict[str, str], where: str) -> ModelStamp:
        missing = [PREFIX + k for k in KEYS if PREFIX + k not in values]
        if missing:
            raise UsageError(f"{where} was not made by simmim (it lacks {', '.join(missing)})")
        v = {k: values[PREFIX + k] for k in KEYS}
        return cls(v["model"], v["encoder_file"], v["encoder_sha256"], int(v["dim"]))

    def describe(self) -> str:
        return f"{self.model} ({self.encoder_file}, sha256 {self.encoder_sha256[:12]})"


def schema(stamp: ModelStamp) -> pa.Schema:
    metadata = {**stamp.to_strings(), PREFIX + "normalized": "false"}
    return pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32(), stamp.dim)),
            ("error", pa.string()),
        ],
        metadata=metadata,
    )


def rows(paths: list[str], vectors: np.ndarray, errors: list[str | None]) -> pa.Table:
    """paths [N], vectors float32 [N, D] (rows with an error are ignored), errors [N]."""
    n, dim = vectors.shape
    failed = np.array([e is not None for e in errors], dtype=bool)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(failed))
    return pa.table({"path": pa.array(paths, pa.string()), "embedding": embedding, "error": errors})


def read_stamp(path: Path, what: str = "") -> ModelStamp:
    """The model that made the vectors file at `path`; UsageError if it is not one."""
    where = f"{what}{path}"
    if not Path(path).is_file():
        raise UsageError(f"{where}: no such file")
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        raise UsageError(f"{where}: not a Parquet file written by simmim embed") from None
    strings = {k.decode(): v.decode() for k, v in meta.items()}
    return ModelStamp.from_strings(strings, where)


def embeddings(table: pa.Table | pa.RecordBatch, dim: int) -> np.ndarray:
    """The embedding column of rows without nulls -> float32 [N, D]."""
    column = table.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
