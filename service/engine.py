"""The core between the routes and the backend: loading, readiness, admission, the batchers,
the thread pools, and draining.

States: loading (the backend being loaded, warmed up and its batch sizes timed) -> ready ->
draining (after SIGTERM: no new requests, admitted ones finish); failed if loading raised or a
batcher died (the server then exits with status 1). Two thread pools: `workers` threads run the
model calls (each with its share of the cores), `decode_threads` decode large images and encode
PNGs, overlapping inference; the pixels being decoded at once are bounded (DecodeBudget).

Admission happens before a request's body is read, in O(1): 503 unless ready; 429 unless its
queue has room, counting the requests admitted before it whose images are not queued yet, both
in images (max_queue) and in time (max_queue_wait_s, from the rate at which the process has
been getting through its queue), and unless its body fits in the body bytes allowed in flight.
The connections apply the same rule as soon as a request's head arrives (connections.Screen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TYPE_CHECKING

import numpy as np

from simmim_core.model_dir import ModelDir

from .backend import Backend, BackendFactory, parallelism
from .batcher import Batcher, Timing
from .calibrate import batch_cap, batch_rates
from .errors import InferenceFailed, NotReady, QueueFull, ServiceError, ShuttingDown
from .inputs import DecodeBudget, decode_images
from .metrics import Metrics
from .processes import Peers
from .settings import Settings

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger("simmim.engine")

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"
# The loop time at which the request being served times out (set by Admission.start_clock)
DEADLINE: ContextVar[float] = ContextVar("simmim_request_deadline")


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
        self.failure = ""  # why the state is FAILED
        self._inflight = 0
        self._decoding = 0  # requests whose images are being decoded
        self._arriving = {"embed": 0, "reconstruct": 0}  # admitted requests not yet queued
        self._body_bytes = 0  # declared body bytes of the admitted requests
        self._decode_budget = DecodeBudget(settings.max_decode_pixels)
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
            self.state, self.failure = FAILED, "the model failed to load"
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
        rate = self.batch_rates.get(self.max_batch_size)  # img/s of the process, start-up
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
            item_s=self.workers / rate if rate else 0.0,
            on_fatal=self._fatal,
        )

    def _fatal(self, reason: str) -> None:
        """A batcher died: unready at once; the server stops with status 1 (cli)."""
        if self.state != FAILED:
            self.state, self.failure = FAILED, reason
            self.peers.set_ready(False)
            self.metrics.ready.set(0)

    @property
    def inflight(self) -> int:
        """Inference requests admitted and not yet answered."""
        return self._inflight

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
            f"{self.failure}; see the server log"
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

    def refusal(self, queue: str, body_bytes: int) -> ServiceError | None:
        """Why a request for `queue` declaring body_bytes must be refused now, before its body
        is read (O(1)), or None: NotReady or ShuttingDown (503); QueueFull (429) when the
        queue's images, with the requests admitted before it and not yet queued, reach
        max_queue, or while there are some and their wait (Batcher.expected_wait_s, or the
        waits observed in the recent batches if longer) is over max_queue_wait_s, or when its
        body (at most max_request_bytes: a larger one gets 413) does not fit in
        max_body_bytes_in_flight."""
        try:
            self.check_ready()
        except ServiceError as e:
            return e
        s, batcher = self.settings, self._batchers[queue]
        ahead = self._arriving[queue]
        waiting = batcher.pending + ahead
        wait_s = max(batcher.expected_wait_s(ahead), batcher.recent_wait_s) if waiting else 0.0
        if waiting >= s.max_queue or wait_s > s.max_queue_wait_s:
            return QueueFull(
                f"the {queue} queue is full ({waiting} images, about {wait_s:.1f} s of work); "
                "retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        body_bytes = min(body_bytes, s.max_request_bytes)  # a larger body gets 413 (BodyLimit)
        if self._body_bytes + body_bytes > s.max_body_bytes_in_flight:
            return QueueFull(
                f"request bodies in flight fill this server process ({self._body_bytes} of "
                f"{s.max_body_bytes_in_flight} bytes); retry later",
                headers={"Retry-After": "1"},
            )
        return None

    def admit(self, queue: str, body_bytes: int) -> Admission:
        """Admit one inference request before its body is read (see refusal: raised), as an
        Admission to use as a context manager: it counts the request until it ends (for
        drain and admission)."""
        if (error := self.refusal(queue, body_bytes)) is not None:
            raise error
        return Admission(self, queue, min(body_bytes, self.settings.max_request_bytes))

    async def decode_images(self, sources: list, field: str) -> list[np.ndarray]:
        """Request images -> float32 [C, H, W] each, decoded on the decode pool within the
        pixel budget and the request's deadline. Counted while decoding: their items are
        coming, so a forming batch waits for them (up to max_wait)."""
        self._decoding += 1
        try:
            return await decode_images(
                sources,
                field,
                self.model.preprocessing,
                self.settings.max_pixels,
                self._decode_pool,
                self._decode_budget,
                self._deadline(),
            )
        finally:
            self._decoding -= 1

    def _deadline(self) -> float:
        """The request's deadline (loop time): from Admission.start_clock, else from now."""
        loop_time = asyncio.get_running_loop().time()
        return DEADLINE.get(loop_time + self.settings.request_timeout_s)

    def _timeout_s(self) -> float:
        return max(0.0, self._deadline() - asyncio.get_running_loop().time())

    async def embed(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, Timing]:
        """[C, H, W] each -> float32 [N, D] pooled embeddings (not normalised)."""
        outputs, timing = await self._batchers["embed"].submit(pixels, self._timeout_s())
        return finite(np.stack(outputs)), timing

    async def reconstruct(self, pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Timing]:
        """[C, H, W], uint8 [h, w] -> float32 [C, H, W] normalised reconstruction."""
        [output], timing = await self._batchers["reconstruct"].submit(
            [(pixels, mask)], self._timeout_s()
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


class Admission:
    """One admitted request: counted in flight (drain waits for it), in its queue's arrivals
    until queued(), and by its declared body bytes, until the `with` block ends."""

    def __init__(self, engine: Engine, queue: str, body_bytes: int):
        self.engine, self.queue, self.body_bytes = engine, queue, body_bytes
        self._arriving = True

    def __enter__(self) -> Admission:
        e = self.engine
        e._inflight += 1
        e.metrics.in_flight.inc()
        e._idle.clear()
        e._arriving[self.queue] += 1
        e._body_bytes += self.body_bytes
        return self

    def start_clock(self) -> None:
        """The body has arrived: the request timeout runs from now (decoding included)."""
        e = self.engine
        DEADLINE.set(asyncio.get_running_loop().time() + e.settings.request_timeout_s)

    def queued(self) -> None:
        """Its images are decoded and about to join the queue (counted there from now)."""
        if self._arriving:
            self._arriving = False
            self.engine._arriving[self.queue] -= 1

    def __exit__(self, *exc) -> None:
        e = self.engine
        self.queued()
        e._body_bytes -= self.body_bytes
        e._inflight -= 1
        e.metrics.in_flight.dec()
        if not e._inflight:
            e._idle.set()
