"""Prometheus metrics, in a registry of their own per app (so apps and tests never collide).

Times are in seconds; `task` is embed or reconstruct; `endpoint` is the route path. With several
server processes, each writes its values to prometheus_client's multiprocess directory and
/metrics adds them up (gauges: summed, except simmim_ready: the least); the process_* metrics
are then left out, since they would describe one process only.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class TaskMetrics:
    """The batcher's metrics for one task (label values already bound)."""

    queue_depth: Gauge  # items admitted, not yet in the model
    capacity: Gauge  # most items admitted and unanswered (max_queue)
    running: Gauge  # items in the batches the model is running
    queue_wait: Histogram  # per item: admitted -> its batch starts
    batch_size: Histogram  # per batch: items
    inference: Histogram  # per batch: the model call
    dropped: Counter  # items whose request gave up before they were batched
    failed_batches: Counter  # model calls that raised
    images: Counter  # items the model has processed


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        r = self.registry = CollectorRegistry()
        if not multiprocess:
            ProcessCollector(registry=r)
        self.requests = Counter(
            "simmim_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "simmim_request_duration_seconds",
            "HTTP request latency, first byte in to response sent",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "simmim_requests_in_flight",
            "inference requests admitted and not yet answered (a drain waits for them)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ready = Gauge(
            "simmim_ready",
            "1 once the model is loaded and warmed up, 0 while loading or draining",
            multiprocess_mode="livemin",
            registry=r,
        )
        self._queue_depth = Gauge(
            "simmim_queue_depth",
            "items admitted and not yet in the model",
            ["task"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self._capacity = Gauge(
            "simmim_queue_capacity",
            "most items admitted and not yet answered (SIMMIM_MAX_QUEUE; summed over the "
            "server processes): simmim_queue_depth / simmim_queue_capacity is the queue's fill",
            ["task"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self._running = Gauge(
            "simmim_running_items",
            "items in the batches the model is running",
            ["task"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self._queue_wait = Histogram(
            "simmim_queue_wait_seconds",
            "per item, time from admission to the start of its batch",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._batch_size = Histogram(
            "simmim_batch_size", "items per model call", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self._inference = Histogram(
            "simmim_inference_seconds",
            "duration of one model call",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._dropped = Counter(
            "simmim_items_dropped",
            "items dropped before batching because their request timed out or went away",
            ["task"],
            registry=r,
        )
        self._failed = Counter(
            "simmim_failed_batches", "model calls that raised", ["task"], registry=r
        )
        self._images = Counter(
            "simmim_images",
            "images processed by the model (task embed: images embedded)",
            ["task"],
            registry=r,
        )

    def task(self, name: str) -> TaskMetrics:
        return TaskMetrics(
            *(
                m.labels(name)
                for m in (
                    self._queue_depth,
                    self._capacity,
                    self._running,
                    self._queue_wait,
                    self._batch_size,
                    self._inference,
                    self._dropped,
                    self._failed,
                    self._images,
                )
            )
        )

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process)
        return generate_latest(every_process)
