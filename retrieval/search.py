"""`simmim search`: query images -> their nearest images in a Milvus collection.

The queries are embedded by a running service (--server, through simmim_client) or on this
machine (--model-dir, onnxruntime). Either way the model must be the one that built the
collection (the same encoder sha256, read from the service's /info or the model card), or the
search is refused: vectors of two models are not comparable, and mixing them fails silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simmim_core.model_dir import ENCODER_INT8

from .errors import UsageError
from .milvus import connect, require_collection, search
from .vectors import ModelStamp


@dataclass(frozen=True)
class Neighbour:
    rank: int  # 1 = nearest
    score: float  # cosine similarity
    path: str


def check_same_model(collection: ModelStamp, query: ModelStamp, query_model: str) -> None:
    """UsageError unless the queries are embedded by the encoder that built the collection."""
    if query.encoder_sha256 != collection.encoder_sha256:
        raise UsageError(
            f"the collection was built by {collection.describe()}, but {query_model} embeds "
            f"with {query.describe()}; search with the model that built it, or rebuild the "
            "collection with simmim embed and simmim index"
        )


def embed_on_server(url: str, images: list[str], collection: ModelStamp) -> np.ndarray:
    """float32 [N, D] from the service at `url`, after checking its model (/info)."""
    from simmim_client import APIError, Client, ConnectionFailedError

    with Client(url) as client:
        try:
            info = client.info()
            served = ModelStamp.from_card(info["model"], info["settings"]["int8"])
            check_same_model(collection, served, f"the service at {url}")
            return client.embed(images, normalize=False)
        except ConnectionFailedError:
            raise UsageError(
                f"--server {url}: the service does not answer; start it with simmim serve, or "
                "embed the queries here with --model-dir"
            ) from None
        except APIError as e:
            which = f"{images[e.index]}: " if e.index is not None else ""
            raise UsageError(f"--server {url}: {which}{e.message}") from None


def embed_here(model_dir: str | None, images: list[str], collection: ModelStamp) -> np.ndarray:
    """float32 [N, D] from the model directory, with the encoder file that built the collection
    (encoder.onnx or encoder.int8.onnx)."""
    from .encoder import ImageEncoder, open_model_dir

    model = open_model_dir(model_dir)
    int8 = collection.encoder_file == ENCODER_INT8 and model.has_int8
    check_same_model(
        collection, ModelStamp.from_card(model.card, int8), f"the model directory {model.path}"
    )
    encoder = ImageEncoder(model, int8)
    vectors, errors = encoder.embed_files(images)
    for path, error in zip(images, errors):
        if error is not None:
            raise UsageError(f"{path}: {error}")
    return vectors


def find(
    images: list[str],
    uri: str,
    collection: str,
    k: int = 10,
    server: str | None = None,
    model_dir: str | None = None,
    ef: int = 64,
) -> list[list[Neighbour]]:
    """For each query image, its k nearest neighbours in the collection, best first."""
    if k < 1:
        raise UsageError("-k must be at least 1")
    for image in images:
        if not Path(image).is_file():
            raise UsageError(f"{image}: no such file")
    client = connect(uri)
    try:
        stamp = require_collection(client, uri, collection)
        if server is not None:
            queries = embed_on_server(server, images, stamp)
        else:
            queries = embed_here(model_dir, images, stamp)
        client.load_collection(collection)
        found = search(client, collection, queries, k, ef)
    finally:
        client.close()
    return [
        [Neighbour(rank, score, path) for rank, (score, path) in enumerate(hits, 1)]
        for hits in found
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim search",
        description="Find the nearest images of each query image in a Milvus collection built "
        "by simmim index, and print rank, cosine similarity and path of each. The queries are "
        "embedded by a running service (--server) or on this machine (--model-dir, the "
        "default); a collection built by another model is refused.",
        epilog="A service with an API key reads it from $SIMMIM_API_KEY; a Milvus server that "
        "needs credentials reads them from $MILVUS_TOKEN.",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="query image files")
    p.add_argument(
        "--uri",
        default="vectors.db",
        help="the Milvus Lite database (a path ending in .db) or Milvus server URL the "
        "collection is in (default: vectors.db)",
    )
    p.add_argument("--collection", default="images", help="the collection (default: images)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="embed the queries with the simmim service at URL, e.g. http://127.0.0.1:8000 "
        "(default: embed them here)",
    )
    where.add_argument(
        "--model-dir",
        default=None,
        help="embed the queries here with this model directory, using the encoder file "
        "(fp32 or int8) that built the collection (default: the embedded model)",
    )
    p.add_argument(
        "--ef",
        type=int,
        default=64,
        help="HNSW candidate list while searching, at least k; larger finds more of the "
        "true neighbours, slower (default: 64)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = find(
            args.images, args.uri, args.collection, args.k, args.server, args.model_dir, args.ef
        )
    except UsageError as e:
        print(f"simmim search: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                [
                    {"query": image, "neighbours": [n.__dict__ for n in hits]}
                    for image, hits in zip(args.images, results)
                ],
                indent=2,
            )
        )
        return 0
    for image, hits in zip(args.images, results):
        print(image)
        for n in hits:
            print(f"{n.rank:>4}  {n.score:.4f}  {n.path}")
    return 0
