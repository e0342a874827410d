"""Tracing with OpenTelemetry: off unless the standard OTEL_* environment asks for it.

On, every request traced is one trace: FastAPI's server span (`POST /embed`: method, route,
status; the caller's W3C `traceparent` is its parent) with these children:

    decode     decoding and preprocessing the request's images
    queue      its images waiting for a batch: admission -> that batch's model call starts
    inference  the model call of a batch holding its images, linked to the batch's span
    render     building the response body

(one queue and one inference span per batch its images were in). A batch serves several
requests, so its model call is a span of its own (`embed batch`, `reconstruct batch`), the root
of its own trace, linked to the span of every request in it. /health/* and /metrics are not
traced.

Off (the default), this module imports no OpenTelemetry module, FastAPI's native telemetry is
switched off, and the request path only checks `engine.tracing is None`. The SDK and the OTLP
exporter are the `tracing` extra; the SDK itself reads OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* and OTEL_EXPORTER_OTLP_*.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .middleware import QUIET_PATHS

log = logging.getLogger("simmim.tracing")

INSTALL = "pip install 'simmim-service[tracing]'"
EXPORTER_GROUP = "opentelemetry_traces_exporter"  # the SDK's entry points for span exporters
OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
SHUTDOWN_TIMEOUT_S = 5.0
UNRECORDED = nullcontext()


class TracingError(Exception):
    """The OTEL_* environment asks for traces that this installation cannot send."""


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters the environment asks for, as entry-point names; [] means off.

    Off unless OTEL_TRACES_EXPORTER names exporters (comma-separated), or is unset while an OTLP
    endpoint is (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT); always off
    with OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. `otlp` takes its protocol from
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL: http/protobuf (the
    specification's default) or grpc."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names and (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        names = "otlp"
    chosen = [n.strip().lower() for n in names.split(",") if n.strip().lower() not in ("", "none")]
    if "otlp" in chosen:
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in OTLP_BY_PROTOCOL:
            raise TracingError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported for traces; "
                f"use one of {', '.join(OTLP_BY_PROTOCOL)}"
            )
        chosen = [OTLP_BY_PROTOCOL[protocol] if n == "otlp" else n for n in chosen]
    return chosen


def exporter_classes(names: Sequence[str]) -> list[type]:
    """The SpanExporter classes installed under these names; TracingError if the SDK or one of
    them is missing. Imports the SDK."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise TracingError(
            f"the OTEL_* environment asks for traces ({', '.join(names)}), but the "
            f"OpenTelemetry SDK is not installed: {INSTALL}, or unset OTEL_TRACES_EXPORTER "
            "and OTEL_EXPORTER_OTLP_ENDPOINT"
        ) from None
    from importlib.metadata import entry_points

    classes = []
    for name in names:
        found = list(entry_points(group=EXPORTER_GROUP, name=name))
        if not found:
            raise TracingError(
                f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed (the tracing "
                "extra has otlp over http/protobuf and console; otlp over grpc needs "
                "opentelemetry-exporter-otlp-proto-grpc)"
            )
        classes.append(found[0].load())
    return classes


def check_environment() -> None:
    """TracingError now, rather than in each server process, if tracing is asked for but
    cannot run."""
    if names := exporter_names():
        exporter_classes(names)


def from_environment() -> Tracing | None:
    """Tracing as the OTEL_* environment asks (a TracerProvider exporting through a batch
    processor to each exporter), or None when it leaves tracing off."""
    names = exporter_names()
    if not names:
        return None
    exporters = exporter_classes(names)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "simmim-service"}))
    # shut down by Tracing.shutdown, within a time limit; the SDK's own hook at exit has none
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    log.info(
        "tracing on: service.name %s, exporters %s, sampler %s",
        resource.attributes[SERVICE_NAME],
        ", ".join(names),
        provider.sampler.get_description(),
    )
    return Tracing(provider)


def fastapi_telemetry(tracing: Tracing | None) -> dict:
    """FastAPI(telemetry=...): its server span per request on our provider, or nothing at all
    (its metrics and logs stay off: /metrics and the access log have them)."""
    if tracing is None:
        return {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}
    return {
        "tracer_provider": tracing.provider,
        "metrics": False,
        "logs": False,
        "operation_spans": False,  # ours instead: decode, queue, inference, render
        "auto_configure": False,
        "exclude": lambda scope: scope.get("path") in QUIET_PATHS,
    }


class Tracing:
    """The service's spans, on an OpenTelemetry SDK TracerProvider (whose processors export
    them). Every method but the constructor runs only while tracing is on."""

    def __init__(self, provider: Any):
        from opentelemetry import trace
        from opentelemetry.context import Context

        self.provider = provider
        self._trace, self._root = trace, Context()
        self._tracer = provider.get_tracer("simmim-service")

    def stage(self, name: str) -> AbstractContextManager:
        """A span around one stage of the current request (a child of its span); nothing if
        the request is not being recorded (not sampled)."""
        if not self._trace.get_current_span().is_recording():
            return UNRECORDED
        return self._tracer.start_as_current_span(name)

    def annotate(self, attributes: dict[str, Any]) -> None:
        """Attributes on the current span (in a route: the request's)."""
        self._trace.get_current_span().set_attributes(attributes)

    def enqueue(self, items: Sequence[Any]) -> None:
        """At admission to a batcher: remember the request's span and the time on each item
        (`item.trace`), unless the request is not being recorded (not sampled)."""
        span = self._trace.get_current_span()
        if span.is_recording():
            mark = (span, time.time_ns())
            for item in items:
                item.trace = mark

    def batch_call(self, task: str, items: Sequence[Any], call: Callable) -> Callable:
        """`call` (the model call on the batch's inputs, made on a worker thread) within the
        batch's span, which links to each request's span; once it returns or raises, each
        request gets its queue and inference spans. `call` itself if no request is traced."""
        requests: dict[tuple, int] = {}  # (request span, admitted ns) -> its items here
        for item in items:
            if item.trace is not None:
                requests[item.trace] = requests.get(item.trace, 0) + 1
        if not requests:
            return call
        trace, tracer, size = self._trace, self._tracer, len(items)

        def traced(inputs: list) -> Any:
            start = time.time_ns()
            batch = tracer.start_span(
                f"{task} batch",
                context=self._root,
                links=[trace.Link(span.get_span_context()) for span, _ in requests],
                attributes={"simmim.task": task, "simmim.batch.size": size},
                start_time=start,
            )
            failed = None
            try:
                return call(inputs)
            except Exception as e:
                failed = e
                batch.record_exception(e)
                batch.set_status(trace.StatusCode.ERROR, type(e).__name__)
                raise
            finally:
                end = time.time_ns()
                batch.end(end)
                link = [trace.Link(batch.get_span_context())]
                for (span, admitted), n in requests.items():
                    parent = trace.set_span_in_context(span)
                    attributes = {"simmim.task": task, "simmim.images": n}
                    tracer.start_span(
                        "queue", parent, attributes=attributes, start_time=admitted
                    ).end(start)
                    inference = tracer.start_span(
                        "inference",
                        parent,
                        links=link,
                        attributes={**attributes, "simmim.batch.size": size},
                        start_time=start,
                    )
                    if failed is not None:
                        inference.set_status(trace.StatusCode.ERROR, type(failed).__name__)
                    inference.end(end)

        return traced

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Export the spans still queued, waiting at most timeout_s (an unreachable collector
        must not hold up the exit)."""
        worker = threading.Thread(
            target=self.provider.shutdown, name="simmim-tracing-shutdown", daemon=True
        )
        worker.start()
        worker.join(timeout_s)
