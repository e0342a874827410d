"""The retrieval stack end to end on Fashion-MNIST: bulk embedding on Ray, a Milvus index, and
queries through the service; the issue's targets computed from the same run.

usage: python -m benchmarks.retrieval --out benchmarks/results/retrieval [--limit N]

1. The 60k training and 10k test images are written as PNG files (a folder each; not timed):
   `simmim embed` then does what it does for any collection, reading and decoding files.
2. Engine alone: onnxruntime (service.backend, as each actor runs it) on the same images already
   preprocessed in memory, with the same layout (one call per CPU, one thread each) and batch
   size; timed just before and just after the bulk job, their mean taken. Both are also
   measured in CPU time per image (this process; for the job also every Ray process, from
   /proc), which other tenants of a shared machine disturb far less than wall-clock rates.
3. Bulk embedding: retrieval.embed.embed (what `simmim embed` runs) on the training folder, on a
   local Ray started beforehand (its start-up is reported apart), writing vectors.parquet.
   Target: img/s >= 0.8x the engine's.
4. Index: retrieval.index.index (`simmim index`) into Milvus Lite, HNSW + COSINE: seconds.
5. Queries: the test images embedded by a running `simmim serve` through simmim_client (as
   `simmim search --server` does), then searched in Milvus (k=10, ef=64, the defaults);
   recall@10 against exact search (numpy over the same vectors; target >= 0.95), class
   precision@10, and queries per second of the two steps together.
Writes OUT/results.json and OUT/results.md (benchmarks.retrieval_report). --limit N takes the
first N training and N/6 test images: a smoke run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from retrieval.embed import embed
from retrieval.encoder import open_model_dir
from retrieval.index import index
from retrieval.milvus import connect, search
from retrieval.search import embed_on_server
from retrieval.vectors import ModelStamp, embeddings, read_stamp
from service.backend import OnnxBackend
from service.settings import default_model_path
from simmim_core.preprocess import preprocess_image
from training.data import open_dataset

from .retrieval_report import write_markdown
from .run import LoadMonitor, cpu_seconds, machine_info
from .servers import simmim_serve

BATCH = 64  # simmim embed's default --batch-size
K, EF = 10, 64  # simmim search's defaults
SEARCH_CHUNK = 100  # queries per Milvus search call
EXACT_CHUNK = 1000  # queries per exact-search matrix product
TARGETS = {"embed_vs_engine": 0.8, "recall_at_10": 0.95}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


def write_pngs(split: str, limit: int | None, folder: Path) -> tuple[list[str], np.ndarray]:
    """Fashion-MNIST `split` as PNG files under `folder` -> (paths, labels [N])."""
    data = open_dataset(f"fashion-mnist:{split}")
    n = min(limit or len(data), len(data))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(data.images[i], "L").save(path)
        paths.append(str(path))
    return paths, np.asarray(data.labels[:n])


def own_cpu_s() -> float:
    """CPU seconds of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RayCPU:
    """CPU seconds used by Ray's processes (raylet, GCS, workers and actors: every process whose
    command line names ray) while the `with` block runs, sampled from /proc every 0.2 s: an
    actor's last 0.2 s before it exits may be missed."""

    def __init__(self):
        self._is_ray: dict[int, bool] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, baseline: bool = False) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            try:
                if pid not in self._is_ray:  # read a command line once per process
                    self._is_ray[pid] = (
                        pid != os.getpid() and b"ray" in (proc / "cmdline").read_bytes()
                    )
                if self._is_ray[pid]:
                    seconds = cpu_seconds(pid)
                    self._first.setdefault(pid, seconds if baseline else 0.0)  # born later: 0
                    self._last[pid] = seconds
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> RayCPU:
        self._sample(baseline=True)  # processes alive now count from here
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


def engine_speed(backend: OnnxBackend, pixels: np.ndarray, calls: int) -> tuple[float, float]:
    """(img/s, CPU ms per image) of `calls` threads at once, each embedding its share of
    `pixels` in batches."""
    batches = [pixels[i : i + BATCH] for i in range(0, len(pixels), BATCH)]

    def work(share: list[np.ndarray]) -> None:
        for batch in share:
            backend.embed(batch)

    threads = [threading.Thread(target=work, args=(batches[t::calls],)) for t in range(calls)]
    start, cpu = time.perf_counter(), own_cpu_s()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - start, own_cpu_s() - cpu
    return len(pixels) / seconds, 1e3 * cpu / len(pixels)


def exact_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indexes [Q, k] of the k largest cosine similarities, by brute force."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    found = []
    for i in range(0, len(queries), EXACT_CHUNK):
        scores = queries[i : i + EXACT_CHUNK] @ bank.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        found.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(found)


def run(args: argparse.Namespace) -> dict:
    import ray

    work = Path(args.work or tempfile.mkdtemp(prefix="simmim-retrieval-"))
    result: dict = {
        "command": "python -m benchmarks.retrieval " + " ".join(sys.argv[1:]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
    }
    t0 = time.perf_counter()
    model = open_model_dir(args.model_dir)
    stamp = ModelStamp.from_card(model.card)
    result["model"] = {"path": str(model.path), **asdict(stamp)}

    progress("writing the Fashion-MNIST images as PNG files")
    train, train_labels = write_pngs("train", args.limit, work / "train")
    test, test_labels = write_pngs("test", args.limit and max(1, args.limit // 6), work / "test")
    result["data"] = {
        "train_images": len(train),
        "test_images": len(test),
        "png_bytes_mean": round(float(np.mean([os.path.getsize(p) for p in train[:1000]])), 1),
    }
    with LoadMonitor() as load:
        progress("Ray start-up")
        start = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        ray_init_s = time.perf_counter() - start
        cpus = int(ray.cluster_resources()["CPU"])
        try:
            progress("preprocessing the training images for the engine alone")
            pixels = np.stack(
                [preprocess_image(Path(p).read_bytes(), model.preprocessing) for p in train]
            )
            backend = OnnxBackend(model, "cpu", threads=1, max_batch_size=BATCH)
            backend.embed(pixels[:BATCH])  # first call allocates
            progress(f"engine alone: {cpus} calls at once, 1 thread each, batch {BATCH}")
            engine_before, engine_cpu_before = engine_speed(backend, pixels, cpus)
            progress(f"simmim embed on {len(train)} files ({engine_before:.0f} img/s engine)")
            out = work / "vectors.parquet"
            start, cpu = time.perf_counter(), own_cpu_s()
            with RayCPU() as ray_cpu:
                written = embed(
                    str(work / "train"), str(out), str(model.path), batch_size=BATCH, progress=False
                )
            embed_s, driver_cpu = time.perf_counter() - start, own_cpu_s() - cpu
            progress("engine alone, again")
            engine_after, engine_cpu_after = engine_speed(backend, pixels, cpus)
        finally:
            ray.shutdown()
        table = pq.read_table(out)
        order = {p: i for i, p in enumerate(table["path"].to_pylist())}
        bank = embeddings(table, stamp.dim)[[order[p] for p in train]]  # in train order
        sample = np.random.default_rng(0).choice(len(train), min(1000, len(train)), replace=False)
        engine_mean = (engine_before + engine_after) / 2
        engine_cpu = (engine_cpu_before + engine_cpu_after) / 2
        embed_cpu = 1e3 * (driver_cpu + ray_cpu.seconds) / len(train)
        result["embed"] = {
            "images": len(train),
            "failed": written.failed,
            "seconds": embed_s,
            "img_s": len(train) / embed_s,
            "ray_init_s": ray_init_s,
            "actors": cpus,
            "batch_size": BATCH,
            "parquet_mb": out.stat().st_size / 2**20,
            "cpu_ms_per_image": embed_cpu,
            "cpu_ms_per_image_driver": 1e3 * driver_cpu / len(train),
            "max_abs_diff_vs_engine": float(
                np.abs(bank[sample] - backend.embed(pixels[sample])).max()
            ),
        }
        result["engine"] = {
            "img_s_before": engine_before,
            "img_s_after": engine_after,
            "img_s": engine_mean,
            "cpu_ms_per_image_before": engine_cpu_before,
            "cpu_ms_per_image_after": engine_cpu_after,
            "cpu_ms_per_image": engine_cpu,
            "calls_at_once": cpus,
            "threads_per_call": 1,
            "batch_size": BATCH,
        }
        del pixels

        progress("simmim index into Milvus Lite")
        uri = str(work / "vectors.db")
        start = time.perf_counter()
        indexed = index(str(out), uri, "fmnist", replace=True)
        index_s = time.perf_counter() - start
        result["index"] = {
            "vectors": indexed.total,
            "seconds": index_s,
            "vectors_s": indexed.total / index_s,
            "index": "HNSW, COSINE, M 16, efConstruction 200",
        }

        progress(f"{len(test)} queries through simmim serve, then Milvus")
        with simmim_serve(model.path, work / "serve.log") as server:
            start = time.perf_counter()
            queries = embed_on_server(server.url, test, read_stamp(out))
            query_embed_s = time.perf_counter() - start
        client = connect(uri)
        start = time.perf_counter()
        hits = []
        for i in range(0, len(queries), SEARCH_CHUNK):
            hits += search(client, "fmnist", queries[i : i + SEARCH_CHUNK], K, EF)
        search_s = time.perf_counter() - start
        client.close()
        progress("exact search for recall")
        exact = exact_neighbours(bank, queries, K)
    index_of = {p: i for i, p in enumerate(train)}
    found = np.array([[index_of[path] for _, path in h] for h in hits])
    recall = np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)])
    result["queries"] = {
        "queries": len(test),
        "k": K,
        "ef": EF,
        "embed_s": query_embed_s,
        "search_s": search_s,
        "qps": len(test) / (query_embed_s + search_s),
        "embed_qps": len(test) / query_embed_s,
        "search_qps": len(test) / search_s,
        "recall_at_10": float(recall),
        "precision_at_10": float(np.mean(train_labels[found] == test_labels[:, None])),
        "exact_precision_at_10": float(np.mean(train_labels[exact] == test_labels[:, None])),
    }
    ratio = result["embed"]["img_s"] / engine_mean
    result["cpu_ratio"] = engine_cpu / embed_cpu
    result["targets"] = [
        {
            "name": "bulk embedding img/s / engine alone img/s",
            "measured": ratio,
            "needed": TARGETS["embed_vs_engine"],
            "passed": bool(ratio >= TARGETS["embed_vs_engine"]),
        },
        {
            "name": "recall@10 of Milvus HNSW against exact search",
            "measured": float(recall),
            "needed": TARGETS["recall_at_10"],
            "passed": bool(recall >= TARGETS["recall_at_10"]),
        },
    ]
    result["load"] = load.summary()
    result["seconds"] = time.perf_counter() - t0
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and .md")
    p.add_argument(
        "--model-dir",
        default=None,
        help=f"model directory (default: the embedded model, {default_model_path()})",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N training images (and N/6 test images): a smoke run (default: all)",
    )
    p.add_argument(
        "--work",
        default=None,
        help="folder for the PNG files, vectors and database, kept (default: a temporary "
        "folder, removed at the end)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "results.md")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
