"""`simmim index`: vectors.parquet (from simmim embed) -> a Milvus collection (HNSW, COSINE).

Rows with an error are skipped and counted. A new collection records the model that made the
vectors; an existing one takes more rows only from the same model (rows of a path already there
are replaced), and --replace rebuilds it from scratch.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UsageError
from .milvus import collection_stamp, connect, create_collection
from .vectors import embeddings, read_stamp

INSERT_BYTES = 16 << 20  # vectors per insert call: about this many bytes


@dataclass(frozen=True)
class Indexed:
    inserted: int  # rows written into the collection
    skipped: int  # rows with an error, not indexed
    total: int  # rows in the collection afterwards


def index(
    vectors: str,
    uri: str,
    collection: str,
    replace: bool = False,
    m: int = 16,
    ef_construction: int = 200,
) -> Indexed:
    """Load the vectors file into `collection` at `uri` (see the module docstring)."""
    stamp = read_stamp(vectors)
    client = connect(uri)
    try:
        found = collection_stamp(client, uri, collection)
        if found is not None and replace:
            client.drop_collection(collection)
        elif found is not None and found.encoder_sha256 != stamp.encoder_sha256:
            raise UsageError(
                f"collection {collection!r} at {uri} holds vectors of {found.describe()}; "
                f"{vectors} holds vectors of {stamp.describe()}: index them into another "
                "--collection, or rebuild this one with --replace"
            )
        if found is None or replace:
            create_collection(client, collection, stamp, m, ef_construction)
            write = client.insert  # a new collection: no row to replace
        else:
            write = client.upsert
        inserted = skipped = 0
        rows_per_call = max(1, INSERT_BYTES // (4 * stamp.dim))
        for batch in pq.ParquetFile(vectors).iter_batches(rows_per_call):
            ok = batch.filter(pc.is_null(batch["error"]))
            skipped += batch.num_rows - ok.num_rows
            if ok.num_rows:
                paths, matrix = ok["path"].to_pylist(), embeddings(ok, stamp.dim)
                write(collection, [{"path": p, "embedding": v} for p, v in zip(paths, matrix)])
                inserted += ok.num_rows
        client.flush(collection)
        client.load_collection(collection)
        total = client.get_collection_stats(collection)["row_count"]
    finally:
        client.close()
    return Indexed(inserted, skipped, int(total))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim index",
        description="Load a Parquet file of vectors made by simmim embed into a Milvus "
        "collection with an HNSW index and the COSINE metric. The collection records the "
        "model's name and encoder sha256, and refuses vectors of another model. Rows with an "
        "error are skipped and counted; indexing the same paths again replaces their rows.",
        epilog="A Milvus server that needs credentials reads them from $MILVUS_TOKEN "
        "(user:password, or an API key).",
    )
    p.add_argument("vectors", metavar="VECTORS", help="the Parquet file written by simmim embed")
    p.add_argument(
        "--uri",
        default="vectors.db",
        help="a Milvus Lite database (a path ending in .db; embedded, nothing to run) or a "
        "Milvus server or cluster, e.g. http://localhost:19530 (default: vectors.db)",
    )
    p.add_argument(
        "--collection",
        default="images",
        help="the collection to create or add to (default: images)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="drop the collection first and build it anew (default: add to it)",
    )
    p.add_argument(
        "--hnsw-m",
        type=int,
        default=16,
        help="HNSW links per node, for a new collection (default: 16)",
    )
    p.add_argument(
        "--ef-construction",
        type=int,
        default=200,
        help="HNSW candidate list while building, for a new collection (default: 200)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        done = index(
            args.vectors, args.uri, args.collection, args.replace, args.hnsw_m, args.ef_construction
        )
    except UsageError as e:
        print(f"simmim index: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.uri} {args.collection}: indexed {done.inserted} vectors (HNSW, COSINE), skipped "
        f"{done.skipped} rows with an error; {done.total} in the collection; "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0
