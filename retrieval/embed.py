"""`simmim embed`: image files -> vectors.parquet, on Ray Data.

Ray Data's map_batches runs a pool of actors (ActorPoolStrategy), each holding one onnxruntime
session of the model and decoding with the one preprocessing (retrieval.encoder), so offline
vectors are the service's /embed vectors (normalize=false). Ray runs on this machine unless
--ray-address names a cluster; there, every node needs this package installed, and the images
and the model directory at the same paths (a shared file system). The driver streams the rows
into vectors.parquet (retrieval.output: resumable and incremental).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator

import pyarrow as pa

from service.settings import default_model_path

from .encoder import ImageEncoder, open_model_dir
from .errors import UsageError
from .output import ResumableOutput, Written
from .sources import image_paths
from .vectors import ModelStamp, rows

BATCHES_PER_BLOCK = 16


class EmbedActor:
    """One Ray actor: a model session; a batch of paths in, rows (path, embedding, error) out."""

    def __init__(self, model_dir: str, int8: bool, threads: int):
        self.encoder = ImageEncoder(open_model_dir(model_dir), int8, threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch["path"].to_pylist()
        vectors, errors = self.encoder.embed_files(paths)
        return rows(paths, vectors, errors)


def check_reachable(address: str) -> None:
    """UsageError unless a TCP connection to the HOST:PORT of a Ray address (HOST:PORT or
    ray://HOST:PORT; "auto" and "local" are left to Ray) opens within a few seconds."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        reason = e if isinstance(e, OSError) else "not HOST:PORT"
        raise UsageError(
            f"--ray-address {address}: no Ray cluster answers there ({reason}); give HOST:PORT of "
            "its head (ray start --head prints it) or ray://HOST:10001, or leave out "
            "--ray-address to run on this machine"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for this job: the one already initialised in this process, else a connection to
    `address` (None: a new local instance, even where `ray start` runs one), shut down at the
    end."""
    import ray

    if address is not None:
        check_reachable(address)  # ray.init retries an unreachable address for minutes
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as e:
        if "InvalidAuthToken" in f"{e} {e.__cause__}":
            raise UsageError(
                f"--ray-address {address}: the cluster wants its token; set RAY_AUTH_MODE=token "
                "and give the token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
            ) from None
        raise UsageError(
            f"--ray-address {address}: cannot connect to a Ray cluster there ({e}); start one "
            "with `ray start --head`, or leave out --ray-address to run on this machine"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def embed(
    source: str,
    out: str,
    model_dir: str | None = None,
    int8: bool = False,
    ray_address: str | None = None,
    batch_size: int = 64,
    actors: int = 0,
    progress: bool = True,
) -> Written:
    """Embed every image SOURCE names into `out` (see the module docstring)."""
    if batch_size < 1 or actors < 0:
        raise UsageError("--batch-size must be at least 1 and --actors at least 0")
    model = open_model_dir(model_dir)
    stamp = ModelStamp.from_card(model.card, int8)
    output = ResumableOutput(out, stamp, image_paths(source))
    if not output.todo:
        return output.finish()
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm.auto import tqdm

    with ray_session(ray_address):
        DataContext.get_current().enable_progress_bars = False  # ours counts images...
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # ...and its INFO goes to files
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"
        cpus = ray.cluster_resources().get("CPU", 1.0)
        actors = min(actors or max(1, int(cpus)), math.ceil(len(output.todo) / batch_size))
        # a Ray task per block costs the driver and the actor milliseconds of bookkeeping, so a
        # block holds up to BATCHES_PER_BLOCK batches, while there are 4 blocks per actor or more
        blocks = max(4 * actors, math.ceil(len(output.todo) / (BATCHES_PER_BLOCK * batch_size)))
        # all CPUs go to the actors (no other task runs: the paths come from the driver), and
        # each actor runs onnxruntime on its share of them
        per_actor = cpus / actors
        data = ray.data.from_items([{"path": p} for p in output.todo], override_num_blocks=blocks)
        data = data.map_batches(
            EmbedActor,
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ActorPoolStrategy(size=actors),
            num_cpus=per_actor,
            fn_constructor_kwargs={
                "model_dir": str(model.path.absolute()),
                "int8": int8,
                "threads": max(1, int(per_actor)),
            },
        )
        bar = tqdm(total=len(output.todo), unit="img", desc="embed", disable=not progress)
        try:
            for table in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                output.write(table)
                bar.update(table.num_rows)
        finally:
            output.close_part()  # what is done stays done, whatever stopped the run
            bar.close()
    return output.finish()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim embed",
        description="Embed image files into a Parquet file of vectors (path, embedding, "
        "error; the model's name, encoder sha256 and dimension in the file's metadata), on Ray "
        "Data: a pool of actors, each with an onnxruntime session and the service's "
        "preprocessing, so the vectors are the service's /embed vectors with normalize=false "
        "(raw pooled encoder outputs; simmim index uses COSINE, which ignores the norm). "
        "Resumable and incremental: a rerun embeds only the paths with no vector in --out yet "
        "(finished rows of an interrupted run are kept in OUT.partial/), retries failed files, "
        "and drops rows of paths no longer in SOURCE.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder of images (searched recursively), or a text file (one path per line) "
        "or a Parquet file (a 'path' column) listing image paths; relative paths in a list "
        "are relative to the list's folder",
    )
    p.add_argument("--out", required=True, help="the Parquet file to write (or to complete)")
    p.add_argument(
        "--model-dir",
        default=None,
        help=f"model directory to embed with (default: the embedded model, {default_model_path()})",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="embed with encoder.int8.onnx instead of encoder.onnx (default: off)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="a Ray cluster to run on, e.g. ray://head:10001 or head:6379 (its nodes need "
        "simmim-service[retrieval] and the images and model directory at the same paths); "
        "default: a local Ray instance on this machine",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per model call in each actor (default: 64)",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=0,
        help="actors, each with a model session; they share the cluster's CPUs, one "
        "onnxruntime thread per CPU of their share (default 0: one actor per CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        written = embed(
            args.source,
            args.out,
            args.model_dir,
            args.int8,
            args.ray_address,
            args.batch_size,
            args.actors,
            progress=not args.no_progress,
        )
    except UsageError as e:
        print(f"simmim embed: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    rate = f", {written.embedded / seconds:.1f} img/s" if written.embedded else ""
    print(
        f"{os.fspath(args.out)}: {written.rows} rows; embedded {written.embedded} now, kept "
        f"{written.kept} from an earlier run; {written.failed} failed (see the error column); "
        f"{seconds:.1f} s{rate}"
    )
    return 0
