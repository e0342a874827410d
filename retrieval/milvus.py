"""Milvus through pymilvus's MilvusClient: the same code for Milvus Lite (a local `.db` path,
embedded, `pip install` only) and a Milvus server or cluster (`http://host:19530`; a token, if
it needs one, from $MILVUS_TOKEN).

A collection holds `path` (VARCHAR, the primary key, so that indexing the same rows again
replaces them) and `embedding` (FLOAT_VECTOR [D]) under an HNSW index with the COSINE metric.
Its properties record the model that made the vectors (simmim.model, simmim.encoder_file,
simmim.encoder_sha256, simmim.dim), so that vectors of two models are never mixed or compared.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from .errors import UsageError
from .vectors import ModelStamp

SERVER_SCHEMES = ("http://", "https://", "tcp://")
MAX_PATH = 65_535  # Milvus's longest VARCHAR
CONNECT_TIMEOUT_S = 10.0
# pymilvus pings every 10 s, idle or not; gRPC servers with default settings (Milvus Lite's)
# answer pings more often than every 5 minutes without data with GOAWAY "too_many_pings", and the
# connection is lost for good. So: no pings while idle, and at most one per 5.5 minutes.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 330_000, "grpc.keepalive_permit_without_calls": False}


def connect(uri: str) -> MilvusClient:
    """A client for `uri`: a Milvus Lite database file (a path ending in .db, its folder must
    exist) or a Milvus server (http(s)://host:port). Raises UsageError when it cannot."""
    if uri.startswith(SERVER_SCHEMES):
        where = f"the Milvus server at {uri}"
    elif uri.endswith(".db"):
        folder = Path(uri).absolute().parent
        if not folder.is_dir():
            raise UsageError(f"--uri {uri}: the folder {folder} does not exist; create it first")
        where = f"the Milvus Lite database {uri}"
    else:
        raise UsageError(
            f"--uri {uri}: give a Milvus Lite database file ending in .db (e.g. ./vectors.db) "
            "or a Milvus server URL (e.g. http://localhost:19530)"
        )
    try:
        return MilvusClient(
            uri=uri,
            token=os.environ.get("MILVUS_TOKEN", ""),
            timeout=CONNECT_TIMEOUT_S,
            grpc_options=GRPC_OPTIONS,
        )
    except MilvusException as e:
        raise UsageError(
            f"--uri {uri}: cannot open {where} ({e.message}); is it running, or is the "
            "database open in another process?"
        ) from None


def collection_stamp(client: MilvusClient, uri: str, name: str) -> ModelStamp | None:
    """The model whose vectors collection `name` holds; None if there is no such collection;
    UsageError if it exists but was not made by simmim index."""
    if not client.has_collection(name):
        return None
    properties = client.describe_collection(name).get("properties", {})
    return ModelStamp.from_strings(properties, f"collection {name!r} at {uri}")


def require_collection(client: MilvusClient, uri: str, name: str) -> ModelStamp:
    stamp = collection_stamp(client, uri, name)
    if stamp is None:
        found = ", ".join(client.list_collections()) or "none"
        raise UsageError(
            f"--collection {name}: no such collection at {uri} (collections there: {found}); "
            "build it with simmim index"
        )
    return stamp


def create_collection(
    client: MilvusClient, name: str, stamp: ModelStamp, m: int, ef_construction: int
) -> None:
    """An empty collection for vectors of `stamp`, with its HNSW + COSINE index."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=stamp.dim)
    index = client.prepare_index_params()
    index.add_index(
        "embedding",
        index_type="HNSW",
        metric_type="COSINE",
        params={"M": m, "efConstruction": ef_construction},
    )
    client.create_collection(
        name,
        schema=schema,
        index_params=index,
        description=f"simmim embeddings of {stamp.describe()}",
        properties=stamp.to_strings(),
    )


def search(
    client: MilvusClient, name: str, queries: np.ndarray, k: int, ef: int
) -> list[list[tuple[float, str]]]:
    """float32 [Q, D] -> for each query its k nearest (cosine similarity, path), best first."""
    hits = client.search(
        name,
        data=[q.tolist() for q in queries],
        limit=k,
        output_fields=["path"],
        search_params={"metric_type": "COSINE", "params": {"ef": max(ef, k)}},
    )
    return [[(float(h["distance"]), h["entity"]["path"]) for h in found] for found in hits]
