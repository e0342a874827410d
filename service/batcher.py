"""Dynamic batching: one asyncio task owns a bounded queue of items and feeds the model.

Every image is one item carrying its own future. The task gathers items from any number of
concurrent requests into batches of at most max_batch_size, waiting at most max_wait_s after the
oldest item's admission for more to arrive, and only while more are on their way (`coming`: a
lone request is not held back for company that will not come). Up to `workers` batches run at
once, each on a worker thread (never on the event loop); the next batch forms while they run.
Each result goes back to its own future, so every caller gets exactly its own results, in
order. Items whose request gave up (timeout, disconnect) are dropped before batching; a batch
whose model call raises an Exception fails only its own items, and the loop keeps running.

Supervision: if the loop itself dies, or a model call raises what no Exception handler catches
(SystemExit, KeyboardInterrupt: its worker is gone), every unanswered item fails at once with
WorkerFailed, later submits too, and `on_fatal(reason)` tells the engine, which stops the
process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InferenceFailed, QueueFull, RequestTimeout, ShuttingDown, WorkerFailed
from .metrics import TaskMetrics

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger("simmim.batcher")
RECENT = 0.2  # weight of the newest batch in the moving averages (about the last 10 batches)


@dataclass(eq=False)
class Item:
    input: Any
    future: asyncio.Future
    admitted: float  # loop.time() at admission, seconds
    wait_s: float = 0.0  # admission -> start of its batch
    batch: int = -1  # which batch ran it
    batch_s: float = 0.0  # that batch's model call
    trace: tuple | None = None  # while tracing: (its request's span, admission time in ns)


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in seconds."""

    queue_s: float  # longest wait of its items for a batch
    inference_s: float  # sum of the model calls of the batches it was in


class Batcher:
    """`run` maps a list of item inputs to a sequence of as many outputs (on `executor`).

    coming() -> how many requests will submit items soon (e.g. are being decoded); while it is 0
    a batch runs at once instead of waiting for company. None: always wait up to max_wait_s.
    workers: most batches running at once (`executor` needs at least as many threads).
    tracing: spans for each batch and each request's wait and model call (None: off).
    item_s: seconds of model time per item, until model calls have measured it (e.g. from the
    start-up timings; 0: unknown). on_fatal(reason): called once if the batcher dies."""

    def __init__(
        self,
        name: str,
        run: Callable[[list], Sequence],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        executor: Executor,
        metrics: TaskMetrics,
        coming: Callable[[], int] | None = None,
        workers: int = 1,
        tracing: Tracing | None = None,
        item_s: float = 0.0,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.name, self._run, self._coming = name, run, coming
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.workers, self._tracing = workers, tracing
        self._executor, self._metrics, self._on_fatal = executor, metrics, on_fatal
        self._queue: deque[Item] = deque()
        self._items: set[Item] = set()  # admitted items whose future is not done
        self._arrived = asyncio.Event()
        self._batches = 0  # model calls so far
        self._item_s = item_s  # moving average of model seconds per item
        # batches whose worker went straight on to the next: their items and the seconds from
        # their start to the next one's, each sum decayed by RECENT a batch (items per worker
        # second: times the workers, the capacity)
        self._busy_items = self._busy_s = 0.0
        self.recent_wait_s = 0.0  # moving average of the longest queue wait in each batch
        self._closing = False
        self.dead: str | None = None  # why the batcher died
        self._task: asyncio.Task | None = None
        metrics.capacity.set(max_queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)

    @property
    def pending(self) -> int:
        return len(self._items)

    def expected_wait_s(self, extra: int = 0) -> float:
        """Seconds until the items pending now, and `extra` more, have probably been run: the
        items over the rate at which the workers got through them while each found items
        waiting when it was free (what the process really gets through, event loop and all),
        or, until they have been that busy, over the model time per item and worker."""
        items = len(self._items) + extra
        if self._busy_items:
            return items * self._busy_s / (self._busy_items * self.workers)
        return items * self._item_s / self.workers

    def retry_after(self) -> int:
        """Whole seconds until the items pending now have probably been answered, at least 1."""
        return max(1, math.ceil(self.expected_wait_s()))

    async def submit(self, inputs: Sequence, timeout_s: float) -> tuple[list, Timing]:
        """Admit every input as one item (all or none), then wait for the outputs, in order.

        Raises QueueFull (no room for all of them), RequestTimeout (outputs not ready within
        timeout_s), InferenceFailed (the model call of one of their batches raised) or
        ShuttingDown (the batcher is closing).
        """
        if self.dead:
            raise self._failure()
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self.pending + len(inputs) > self.max_queue:
            raise QueueFull(
                f"the {self.name} queue is full ({self.pending} of "
                f"{self.max_queue} images pending); retry later",
                headers={"Retry-After": str(self.retry_after())},
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [Item(x, loop.create_future(), now) for x in inputs]
        if self._tracing is not None:
            self._tracing.enqueue(items)
        for item in items:
            item.future.add_done_callback(lambda _, item=item: self._items.discard(item))
        self._items.update(items)
        self._queue.extend(items)
        self._metrics.queue_depth.set(len(self._queue))
        self._arrived.set()
        futures = [item.future for item in items]
        try:
            done, pending = await asyncio.wait(
                futures, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION
            )
        finally:
            for f in futures:  # frees the rest after a failure, timeout or cancel
                f.cancel()
        errors = [f.exception() for f in done if not f.cancelled()]
        if any(errors):
            raise next(e for e in errors if e)
        if pending:
            raise RequestTimeout(
                f"no result within the request timeout of {timeout_s:g} s; the server is overloaded"
            )
        outputs = [f.result() for f in futures]
        batches = {item.batch: item.batch_s for item in items}
        return outputs, Timing(max(item.wait_s for item in items), sum(batches.values()))

    async def close(self) -> None:
        """Take no new items, run every queued one, then stop the task."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def _supervise(self) -> None:
        """Run the loop; if it ends other than by close(), the batcher is dead."""
        try:
            await self._loop()
        except asyncio.CancelledError:
            self._die("its task was cancelled")
            raise
        except BaseException as e:  # a bug in the loop, or what stopped it
            self._die(f"its loop raised {type(e).__name__}", e)
        else:
            if not self._closing:
                self._die("its loop ended")

    def _die(self, reason: str, exc: BaseException | None = None) -> None:
        """Fail every unanswered item (WorkerFailed), refuse new ones, tell on_fatal (once)."""
        if self.dead:
            return
        self.dead = reason
        log.critical(
            "%s: the batcher died (%s); failing its %d unanswered images",
            self.name,
            reason,
            self.pending,
            exc_info=exc,
        )
        self._queue.clear()
        for item in list(self._items):
            if not item.future.done():
                item.future.set_exception(self._failure())
        if self._on_fatal is not None:
            self._on_fatal(f"the {self.name} batcher died ({reason})")

    def _failure(self) -> WorkerFailed:
        return WorkerFailed(
            f"this server process's {self.name} worker died ({self.dead}); it is exiting: "
            "retry, another process or replica will answer"
        )

    async def _loop(self) -> None:
        """Form a batch whenever a worker is free; on closing, wait for the running ones."""
        free = asyncio.Semaphore(self.workers)
        running: set[asyncio.Task] = set()
        ran: deque[tuple[float, int] | None] = deque()  # each freed worker's last batch

        def finished(task: asyncio.Task) -> None:
            """Free the worker; keep what its batch took if items are waiting for it."""
            running.discard(task)
            ran.append(task.result() if self._queue and not task.cancelled() else None)
            free.release()

        while not self.dead:
            await free.acquire()
            last = ran.popleft() if ran else None  # this worker's last batch
            if (formed := await self._next_batch()) is None:
                break
            batch, busy = formed
            task = asyncio.get_running_loop().create_task(
                self._guarded_run(batch, last if busy else None)
            )
            running.add(task)
            task.add_done_callback(finished)
        if running:
            await asyncio.wait(running)

    async def _guarded_run(
        self, batch: list[Item], last: tuple[float, int] | None
    ) -> tuple[float, int] | None:
        try:
            return await self._run_batch(batch, last)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not strand the waiting requests
            log.exception("%s: batch bookkeeping failed", self.name)
            self._fail(batch)
        except BaseException as e:  # SystemExit, KeyboardInterrupt...: the worker is gone
            self._die(f"a model call raised {type(e).__name__}", e)

    async def _next_batch(self) -> tuple[list[Item], bool] | None:
        """Up to max_batch_size live items, once the batch is full, the oldest has waited
        max_wait_s, no more items are coming, or the batcher is closing, and whether an item
        was waiting when the worker came for it (False: the worker idled); None when closing
        and nothing is left."""
        loop = asyncio.get_running_loop()
        batch: list[Item] = []
        busy = True
        while True:
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                if item.future.done():  # its request timed out or went away
                    self._metrics.dropped.inc()
                else:
                    batch.append(item)
            self._metrics.queue_depth.set(len(self._queue) + len(batch))
            if len(batch) == self.max_batch_size or self._closing:
                return (batch, busy) if batch else None
            timeout = None
            if batch:
                timeout = batch[0].admitted + self.max_wait_s - loop.time()
                if timeout <= 0 or (self._coming is not None and not self._coming()):
                    return batch, busy
            else:
                busy = False
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return batch, busy

    async def _run_batch(
        self, batch: list[Item], last: tuple[float, int] | None
    ) -> tuple[float, int] | None:
        """Run `batch` on a worker -> (its start, its live items), None if none was live.
        last: the (start, items) of the batch this worker ran before, if it went straight on
        to this one (it found items waiting): a measure of the capacity."""
        live = [item for item in batch if not item.future.done()]
        self._metrics.dropped.inc(len(batch) - len(live))
        if not live:
            return None
        self._metrics.queue_depth.set(len(self._queue))
        loop = asyncio.get_running_loop()
        start = loop.time()
        self._batches += 1
        for item in live:
            item.wait_s, item.batch = start - item.admitted, self._batches
            self._metrics.queue_wait.observe(item.wait_s)
        self.recent_wait_s += (live[0].wait_s - self.recent_wait_s) * RECENT
        if last is not None:
            self._busy_items = self._busy_items * (1 - RECENT) + last[1]
            self._busy_s = self._busy_s * (1 - RECENT) + (start - last[0])
        self._metrics.batch_size.observe(len(live))
        self._metrics.running.inc(len(live))
        call = self._call
        if self._tracing is not None:
            call = self._tracing.batch_call(self.name, live, call)
        try:
            outputs, seconds = await loop.run_in_executor(
                self._executor, call, [item.input for item in live]
            )
        except Exception:
            log.exception("%s: model call failed for a batch of %d", self.name, len(live))
            self._metrics.failed_batches.inc()
            self._fail(live)
            return None
        finally:
            self._metrics.running.dec(len(live))
        self._item_s += (seconds / len(live) - self._item_s) / min(self._batches, 20)
        self._metrics.inference.observe(seconds)
        self._metrics.images.inc(len(live))
        for item, output in zip(live, outputs):
            item.batch_s = seconds
            if not item.future.done():
                item.future.set_result(output)
        return start, len(live)

    def _call(self, inputs: list) -> tuple[Sequence, float]:
        """On the worker thread: the model call and its duration in seconds."""
        start = time.perf_counter()
        outputs = self._run(inputs)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"{len(inputs)} inputs gave {len(outputs)} outputs")
        return outputs, time.perf_counter() - start

    @staticmethod
    def _fail(items: list[Item]) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(
                    InferenceFailed(
                        "the model failed on a batch holding this request's images; see the "
                        "server log"
                    )
                )
