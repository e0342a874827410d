"""Tracing with OpenTelemetry (service/tracing.py).

The spans of the real app (create_app on the embedded ONNX model), served by uvicorn in the test
process and exported to the SDK's in-memory exporter; the OTEL_* environment that turns tracing
on; a real `simmim serve` exporting over OTLP/HTTP to a collector on loopback; and, with tracing
off, no OpenTelemetry SDK imported.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode
from service_fixtures import (
    ROOT,
    InProcessServer,
    ServerProcess,
    free_port,
    png_bytes,
    wait_until,
)

from service import tracing
from service.app import create_app
from service.backend import OnnxBackend
from service.settings import Settings, default_model_path
from simmim_core.model_dir import load_model_dir

CALLER_SPAN = "b7ad6b7169203331"
IMAGE = base64.b64encode(png_bytes(0)).decode()
MODEL = load_model_dir(default_model_path()).name  # the model the in-process app serves


def traceparent(trace_id: str, sampled: bool = True) -> dict[str, str]:
    """A W3C traceparent header from a caller whose span is CALLER_SPAN."""
    return {"traceparent": f"00-{trace_id}-{CALLER_SPAN}-{'01' if sampled else '00'}"}


def hex_id(value: int, digits: int = 32) -> str:
    return format(value, f"0{digits}x")


def serve_with(environ: dict[str, str], *args: str, program: str | None = None):
    """`simmim serve ARGS` (or `program`) run to its end, under `environ` as the only OTEL_*
    variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | environ
    cmd = ["-c", program] if program else ["-m", "simmim_cli", "serve", *args]
    return subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


class HeldBackend:
    """The onnxruntime backend; embed waits while `open` is clear and raises while `fail` is
    set (the warm-up is neither held nor failed)."""

    def __init__(self, inner):
        self.inner, self.max_batch_size = inner, inner.max_batch_size
        self.open, self.fail = threading.Event(), False
        self.open.set()

    def embed(self, pixels):
        self.open.wait()
        if self.fail:
            raise RuntimeError("the model failed")
        return self.inner.embed(pixels)

    def reconstruct(self, pixels, mask):
        return self.inner.reconstruct(pixels, mask)

    def warmup(self) -> None:
        self.inner.warmup()

    def describe(self) -> dict:
        return self.inner.describe()


class Traced:
    """A served app whose spans go to `exporter`."""

    def __init__(self, server: InProcessServer, exporter: InMemorySpanExporter, backend):
        self.server, self.exporter, self.backend = server, exporter, backend

    def post(self, path: str, body: dict, trace_id: str | None = None, sampled: bool = True):
        headers = traceparent(trace_id, sampled) if trace_id else {}
        return self.server.http.post(path, json=body, headers=headers)

    def trace(self, trace_id: str) -> dict[str, list]:
        """The spans of one trace, by name, once its request span has ended (it ends just after
        the response is sent)."""

        def ended():
            spans = [
                s
                for s in self.exporter.get_finished_spans()
                if hex_id(s.context.trace_id) == trace_id
            ]
            return spans if any(s.kind == SpanKind.SERVER for s in spans) else None

        by_name = defaultdict(list)
        for span in wait_until(ended, f"the request span of trace {trace_id}"):
            by_name[span.name].append(span)
        return by_name

    def span(self, span_id: int):
        [found] = [s for s in self.exporter.get_finished_spans() if s.context.span_id == span_id]
        return found


@pytest.fixture(scope="module")
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    backends = []

    def load(model, settings, threads):
        backends.append(HeldBackend(OnnxBackend.from_settings(model, settings, threads)))
        return backends[-1]

    settings = Settings(threads=1, workers=1, processes=1, tune_batch_size=False)
    app = create_app(settings, load, tracer_provider=provider)
    with InProcessServer(app, free_port()) as server:
        server.wait_ready()
        yield Traced(server, exporter, backends[0])


@pytest.fixture
def model_fails(traced):
    traced.backend.fail = True
    yield
    traced.backend.fail = False


# --- the spans of a request ----------------------------------------------------------------
def test_a_request_is_a_server_span_with_decode_queue_inference_and_render_children(traced):
    trace_id = secrets.token_hex(16)
    assert traced.post("/embed", {"images": [IMAGE, IMAGE]}, trace_id).status_code == 200
    spans = traced.trace(trace_id)
    assert {name: len(s) for name, s in spans.items()} == {
        "POST /embed": 1,
        "decode": 1,
        "queue": 1,
        "inference": 1,
        "render": 1,
    }
    [request] = spans["POST /embed"]
    assert request.kind == SpanKind.SERVER
    for name in ("decode", "queue", "inference", "render"):
        [child] = spans[name]
        assert child.parent.span_id == request.context.span_id, name


def test_the_stages_follow_each_other_within_the_request_span(traced):
    trace_id = secrets.token_hex(16)
    traced.post("/embed", {"images": [IMAGE]}, trace_id)
    spans = traced.trace(trace_id)
    [request], [decode], [queue], [inference], [render] = (
        spans[n] for n in ("POST /embed", "decode", "queue", "inference", "render")
    )
    assert request.start_time <= decode.start_time < decode.end_time <= queue.start_time
    assert queue.start_time <= queue.end_time == inference.start_time < inference.end_time
    assert inference.end_time <= render.start_time < render.end_time <= request.end_time


@pytest.mark.parametrize(
    "path, body, images, task",
    [
        ("/embed", {"images": [IMAGE, IMAGE]}, 2, "embed"),
        ("/similarity", {"a": [IMAGE, IMAGE], "b": [IMAGE]}, 3, "embed"),
        ("/reconstruct", {"image": IMAGE, "seed": 0}, 1, "reconstruct"),
        ("/v1/embeddings", {"model": MODEL, "input": [IMAGE, IMAGE]}, 2, "embed"),
    ],
)
def test_each_route_is_traced_with_its_route_status_images_and_task(
    traced, path, body, images, task
):
    trace_id = secrets.token_hex(16)
    response = traced.post(path, body, trace_id)
    assert response.status_code == 200
    spans = traced.trace(trace_id)
    [request] = spans[f"POST {path}"]
    assert request.attributes["http.route"] == path
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["simmim.images"] == images
    assert request.attributes["simmim.request_id"] == response.headers["x-request-id"]
    [inference] = spans["inference"]
    assert inference.attributes["simmim.task"] == task
    assert inference.attributes["simmim.images"] == images
    assert inference.attributes["simmim.batch.size"] == images


def test_the_callers_traceparent_is_the_parent_of_the_request_span(traced):
    trace_id = secrets.token_hex(16)
    traced.post("/embed", {"images": [IMAGE]}, trace_id)
    [request] = traced.trace(trace_id)["POST /embed"]
    assert hex_id(request.context.trace_id) == trace_id
    assert hex_id(request.parent.span_id, 16) == CALLER_SPAN and request.parent.is_remote


def test_a_request_without_a_traceparent_starts_a_trace_of_its_own(traced):
    response = traced.post("/embed", {"images": [IMAGE]})
    request_id = response.headers["x-request-id"]

    def request_span():
        return next(
            (
                s
                for s in traced.exporter.get_finished_spans()
                if s.attributes.get("simmim.request_id") == request_id
            ),
            None,
        )

    request = wait_until(request_span, "the request span")
    assert request.parent is None
    spans = traced.trace(hex_id(request.context.trace_id))
    assert set(spans) == {"POST /embed", "decode", "queue", "inference", "render"}


def test_an_unsampled_traceparent_records_no_span(traced):
    unsampled, sampled = secrets.token_hex(16), secrets.token_hex(16)
    assert traced.post("/embed", {"images": [IMAGE]}, unsampled, sampled=False).status_code == 200
    traced.post("/embed", {"images": [IMAGE]}, sampled)
    traced.trace(sampled)  # ended after the unsampled request's spans would have
    finished = traced.exporter.get_finished_spans()
    assert not [s for s in finished if hex_id(s.context.trace_id) == unsampled]
    assert not [
        s for s in finished for link in s.links if hex_id(link.context.trace_id) == unsampled
    ]


# --- batches shared by requests --------------------------------------------------------------
def test_requests_sharing_a_batch_link_to_its_span_and_it_to_theirs(traced):
    first, second, third = (secrets.token_hex(16) for _ in range(3))
    server = traced.server

    def post(trace_id):
        return traced.post("/embed", {"images": [IMAGE]}, trace_id)

    traced.backend.open.clear()
    try:
        with ThreadPoolExecutor(3) as pool:
            held = pool.submit(post, first)
            wait_until(
                lambda: server.metric("simmim_running_items", task="embed") == 1,
                "the first request's batch held in the model",
            )
            queued = [pool.submit(post, second), pool.submit(post, third)]
            wait_until(
                lambda: server.metric("simmim_queue_depth", task="embed") == 2,
                "two requests queued behind it",
            )
            traced.backend.open.set()
            assert [f.result().status_code for f in [held, *queued]] == [200] * 3
    finally:
        traced.backend.open.set()
    [alone] = traced.trace(first)["inference"]
    assert alone.attributes["simmim.batch.size"] == 1
    requests, batches = [], set()
    for trace_id in (second, third):
        spans = traced.trace(trace_id)
        [inference], [request] = spans["inference"], spans["POST /embed"]
        assert inference.attributes["simmim.batch.size"] == 2
        [link] = inference.links
        batches.add(link.context.span_id)
        requests.append(request.context.span_id)
    [batch_id] = batches
    batch = traced.span(batch_id)
    assert batch.name == "embed batch" and batch.parent is None  # the root of its own trace
    assert hex_id(batch.context.trace_id) not in (second, third)
    assert dict(batch.attributes) == {"simmim.task": "embed", "simmim.batch.size": 2}
    assert sorted(link.context.span_id for link in batch.links) == sorted(requests)


# --- failures --------------------------------------------------------------------------------
def test_a_bad_image_is_traced_with_its_400_and_a_failed_decode(traced):
    trace_id = secrets.token_hex(16)
    response = traced.post("/embed", {"images": [IMAGE, "not base64!"]}, trace_id)
    assert response.status_code == 400
    spans = traced.trace(trace_id)
    assert set(spans) == {"POST /embed", "decode"}
    [request], [decode] = spans["POST /embed"], spans["decode"]
    assert request.attributes["http.response.status_code"] == 400
    assert request.status.status_code == StatusCode.UNSET  # a client error, not the server's
    assert decode.status.status_code == StatusCode.ERROR
    assert "images[1]" in decode.events[0].attributes["exception.message"]


def test_a_failed_model_call_marks_its_batch_and_the_requests_inference_as_errors(
    traced, model_fails
):
    trace_id = secrets.token_hex(16)
    assert traced.post("/embed", {"images": [IMAGE]}, trace_id).status_code == 500
    spans = traced.trace(trace_id)
    [request], [inference] = spans["POST /embed"], spans["inference"]
    assert request.status.status_code == StatusCode.ERROR
    assert request.attributes["http.response.status_code"] == 500
    assert inference.status.status_code == StatusCode.ERROR
    batch = traced.span(inference.links[0].context.span_id)
    assert batch.status.status_code == StatusCode.ERROR
    assert batch.events[0].attributes["exception.message"] == "the model failed"


def test_health_and_metrics_are_not_traced_and_other_routes_are(traced):
    untraced, info = secrets.token_hex(16), secrets.token_hex(16)
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert traced.server.http.get(path, headers=traceparent(untraced)).status_code == 200
    traced.server.http.get("/info", headers=traceparent(info))
    assert set(traced.trace(info)) == {"GET /info"}
    finished = traced.exporter.get_finished_spans()
    assert not [s for s in finished if hex_id(s.context.trace_id) == untraced]


# --- tracing off -----------------------------------------------------------------------------
OFF_PROBE = """
import sys
sys.path.insert(0, "tests")
from dummy_backend import DummyBackend
from service_fixtures import InProcessServer, free_port, png_bytes
from service.app import create_app
from service.settings import Settings
import base64

app = create_app(Settings(processes=1, workers=1, threads=1, tune_batch_size=False), DummyBackend)
with InProcessServer(app, free_port()) as server:
    server.wait_ready()
    image = base64.b64encode(png_bytes(0)).decode()
    assert server.http.post("/embed", json={"images": [image]}).status_code == 200
assert app.state.engine.tracing is None
sdk = ("opentelemetry.sdk", "opentelemetry.exporter")
print(sorted(m for m in sys.modules if m.startswith(sdk)))
"""


def test_with_tracing_off_no_opentelemetry_sdk_or_exporter_is_imported():
    proc = serve_with({}, program=OFF_PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


# --- the OTEL_* environment ------------------------------------------------------------------
@pytest.mark.parametrize(
    "environ, exporters",
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp_proto_http"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp_proto_http"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_http"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ["otlp_proto_grpc"],
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "console, otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            ["console", "otlp_proto_grpc"],
        ),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, []),
    ],
)
def test_the_otel_environment_chooses_the_span_exporters(environ, exporters):
    assert tracing.exporter_names(environ) == exporters


@pytest.fixture
def otel_env(monkeypatch):
    """A clean OTEL_* environment for the test to set."""
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_tracing_from_the_environment_honours_service_name_and_sampler(otel_env):
    otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
    otel_env.setenv("OTEL_SERVICE_NAME", "embedder-eu")
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    traces = tracing.from_environment()
    try:
        assert traces.provider.resource.attributes["service.name"] == "embedder-eu"
        assert "TraceIdRatioBased{0.25}" in traces.provider.sampler.get_description()
    finally:
        traces.shutdown()


def test_the_service_name_defaults_to_simmim_service(otel_env):
    otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
    traces = tracing.from_environment()
    try:
        assert traces.provider.resource.attributes["service.name"] == "simmim-service"
    finally:
        traces.shutdown()


@pytest.mark.parametrize(
    "environ, processes, message",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "2", "no span exporter 'zipkin' is installed"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "1",
            "'http/json' is not supported",
        ),
    ],
)
def test_serve_refuses_tracing_it_cannot_run_in_one_line(environ, processes, message):
    proc = serve_with(environ, "--processes", processes)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("simmim serve: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


NO_SDK = """
import importlib.abc, sys
class NoSdk(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(name)
sys.meta_path.insert(0, NoSdk())
from service.cli import main
sys.exit(main(["--processes", "1"]))
"""


def test_serve_asked_for_traces_without_the_sdk_says_how_to_install_it():
    proc = serve_with({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, program=NO_SDK)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert tracing.INSTALL in proc.stderr and proc.stderr.count("\n") == 1


# --- end to end: simmim serve -> OTLP/HTTP -> a collector --------------------------------------
class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: keeps every span sent to /v1/traces, with its
    resource's service.name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), CollectorHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class CollectorHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        export = ExportTraceServiceRequest.FromString(body if self.path == "/v1/traces" else b"")
        with self.server.lock:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.server.spans.append((resource["service.name"], span))
        ok = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(ok)))
        self.end_headers()
        self.wfile.write(ok)

    def log_message(self, *args):
        pass


def test_simmim_serve_exports_its_spans_over_otlp_with_only_otel_variables(tmp_path):
    collector = Collector()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_SERVICE_NAME": "simmim-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # so that only the flush at shutdown sends them
    }
    trace_id = secrets.token_hex(16)
    try:
        with ServerProcess(
            default_model_path(), tmp_path, env=env, dummy=True, api_key=None, processes=2
        ) as server:
            server.wait_ready()
            response = server.http.post(
                "/embed", json={"images": [IMAGE]}, headers=traceparent(trace_id)
            )
            assert response.status_code == 200
            assert server.stop() == 0
            assert "tracing on: service.name simmim-e2e, exporters otlp_proto_http" in server.log()
    finally:
        collector.shutdown()
    names = {
        span.name
        for service, span in collector.spans
        if service == "simmim-e2e" and span.trace_id.hex() == trace_id
    }
    assert names == {"POST /embed", "decode", "queue", "inference", "render"}
    assert "embed batch" in {span.name for _, span in collector.spans}
