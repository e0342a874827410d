"""The core between the routes and the backend: loading, readiness, the batchers, the thread
pools, and draining.

States: loading (the backend being loaded, warmed up and its batch sizes timed) -> ready ->
draining (after SIGTERM: no new requests, admitted ones finish); failed if loading raised. Two
thread pools: `workers` threads run the model calls (each with its share of the cores),
`decode_threads` decode large images and encode PNGs, overlapping inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from simmim_core.model_dir import ModelDir

from .backend import Backend, BackendFactory, parallelism
from .batcher import Batcher, Timing
from .calibrate import batch_cap, batch_rates
from .errors import InferenceFailed, NotReady, ShuttingDown
from .inputs import decode_images
from .metrics import Metrics
from .processes import Peers
from .settings import Settings

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger("simmim.engine")

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


def finite(output: np.ndarray) -> np.ndarray:
    """`output`, or InferenceFailed if the model gave NaN or infinity for these images."""
    if not np.isfinite(output).all():
        log.warning("the model produced NaN or infinite values")
        raise InferenceFailed("the model produced NaN or infinite values for this request's images")
    return output


class Engine:
    """load_backend: called once start() has begun loading (BackendFactory); peers: this
    process's place among the server's processes; tracing: spans of batches and of requests'
    waits and model calls (None: off)."""

    def __init__(
        self,
        settings: Settings,
        model: ModelDir,
        metrics: Metrics,
        peers: Peers,
        load_backend: BackendFactory,
        tracing: Tracing | None = None,
    ):
        self.settings, self.model, self.metrics, self.peers = settings, model, metrics, peers
        self.tracing = tracing
        self.state = LOADING
        self._load_backend = load_backend
        self.backend: Backend | None = None
        _, self.workers, threads = parallelism(
            settings.provider, self.peers.count, settings.workers, settings.threads
        )
        self.max_batch_size = settings.max_batch_size  # then capped by tune_batch_size
        self.batch_rates: dict[int, float] = {}
        self._threads = threads
        self._infer_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="simmim-infer")
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="simmim-decode"
        )
        self._batchers: dict[str, Batcher] = {}
        self._load_task: asyncio.Task | None = None
        self._inflight = 0
        self._decoding = 0  # requests whose images are being decoded
        self._idle = asyncio.Event()
        self._idle.set()

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading in the background, so /health/live answers at once."""
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend = await loop.run_in_executor(
                self._infer_pool, self._load_backend, self.model, self.settings, self._threads
            )
            await asyncio.gather(
                *(
                    loop.run_in_executor(self._infer_pool, backend.warmup)
                    for _ in range(self.workers)
                )
            )
            if self.settings.tune_batch_size:
                card = self.model.card
                shape = (card["in_chans"], card["image_size"], card["image_size"])
                self.batch_rates = await loop.run_in_executor(
                    None,
                    batch_rates,
                    backend.embed,
                    shape,
                    self.max_batch_size,
                    self.workers,
                    self._infer_pool,
                )
                self.max_batch_size = batch_cap(self.batch_rates)
        except Exception:
            log.exception("loading the model from %s failed", self.model.path)
            self.state = FAILED
            return
        self.backend = backend
        self._batchers = {
            "embed": self._batcher("embed", lambda xs: backend.embed(np.stack(xs))),
            "reconstruct": self._batcher(
                "reconstruct",
                lambda xs: backend.reconstruct(
                    np.stack([p for p, _ in xs]), np.stack([m for _, m in xs])
                ),
            ),
        }
        for batcher in self._batchers.values():
            batcher.start()
        if self.state == LOADING:
            self.state = READY
            self.peers.set_ready(True)
            self.metrics.ready.set(1)
            log.info(
                "ready%s: %s, %d model calls at once, batches of up to %d (img/s by "
                "batch size: %s)",
                self.peers.describe(),
                self.model.name,
                self.workers,
                self.max_batch_size,
                {n: round(r, 1) for n, r in self.batch_rates.items()} or "not measured",
            )

    def _batcher(self, name: str, run: Callable) -> Batcher:
        s = self.settings
        return Batcher(
            name,
            run,
            max_batch_size=self.max_batch_size,
            max_wait_s=s.max_wait_ms / 1e3,
            max_queue=s.max_queue,
            executor=self._infer_pool,
            metrics=self.metrics.task(name),
            coming=lambda: self._decoding,
            workers=self.workers,
            tracing=self.tracing,
        )

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503) and wait up to timeout_s for admitted ones to finish;
        True if they all did."""
        self.state = DRAINING
        self.peers.set_ready(False)
        self.metrics.ready.set(0)
        log.info("draining: %d requests in flight", self._inflight)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timeout: %d requests still in flight", self._inflight)
            return False
        log.info("drained")
        return True

    async def close(self) -> None:
        """Stop loading, run what is still queued, and release the threads."""
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        for batcher in self._batchers.values():
            await batcher.close()
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- requests -------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.state == READY:
            return
        if self.state == DRAINING:
            raise ShuttingDown("the server is shutting down; send new requests elsewhere")
        message = (
            "the model failed to load; see the server log"
            if self.state == FAILED
            else "the model is loading; retry shortly"
        )
        raise NotReady(message, headers={"Retry-After": "1"})

    def check_all_ready(self) -> None:
        """check_ready(), and NotReady until every server process is ready."""
        self.check_ready()
        ready = self.peers.ready_count()
        if ready < self.peers.count:
            raise NotReady(
                f"{ready} of {self.peers.count} server processes are ready; retry shortly",
                headers={"Retry-After": "1"},
            )

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Around one inference request: 503 unless ready; counted until it ends (for drain)."""
        self.check_ready()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def decode_images(self, sources: list, field: str) -> list[np.ndarray]:
        """Request images -> float32 [C, H, W] each, decoded on the decode pool. Counted while
        decoding: their items are coming, so a forming batch waits for them (up to max_wait)."""
        self._decoding += 1
        try:
            return await decode_images(
                sources,
                field,
                self.model.preprocessing,
                self.settings.max_pixels,
                self._decode_pool,
            )
        finally:
            self._decoding -= 1

    async def embed(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, Timing]:
        """[C, H, W] each -> float32 [N, D] pooled embeddings (not normalised)."""
        outputs, timing = await self._batchers["embed"].submit(
            pixels, self.settings.request_timeout_s
        )
        return finite(np.stack(outputs)), timing

    async def reconstruct(self, pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Timing]:
        """[C, H, W], uint8 [h, w] -> float32 [C, H, W] normalised reconstruction."""
        [output], timing = await self._batchers["reconstruct"].submit(
            [(pixels, mask)], self.settings.request_timeout_s
        )
        return finite(output), timing

    async def off_loop(self, fn: Callable, *args):
        """Run CPU work (PNG encoding, large JSON) on the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    def info(self) -> dict:
        backend = self.backend.describe() if self.backend else None
        if backend:
            backend.update(
                workers=self.workers,
                max_batch_size=self.max_batch_size,
                img_s_by_batch_size=self.batch_rates,
            )
        process = {"index": self.peers.index, "of": self.peers.count, "pid": os.getpid()}
        return {"state": self.state, "process": process, "backend": backend}
