"""The FastAPI app (DESIGN §4): `create_app(settings, backend, peers)`, its routes, and the one
path every inference request takes.

Layers: routes (here) -> engine (readiness, admission, batchers, thread pools) -> backend (a
Backend; by default onnxruntime). Each inference route names its body schema (whose `queue`
says which batcher it uses) and its task; `serve` does the rest, the same way for every route:

    admit, before the body is read (503 unless ready, 429 unless its queue has room) ->
    parse (415, 422, 413; 408 or 499 if the body does not arrive) -> check (404, 400) ->
    decode (400, 413, 504) -> task: batch and run the model (499 if the client leaves, 429,
    504) -> render (timing headers)

A new route that takes images is a schema, a task that returns an Answer, and a three-line
handler that calls `serve`: OpenAI's /v1/embeddings is one (openai_compat.py holds its bodies).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.staticfiles import StaticFiles

from simmim_core import visualize
from simmim_core.masking import check_sizes
from simmim_core.model_dir import ModelDir, ModelDirError, load_model_dir

from .backend import BackendFactory, OnnxBackend
from .batcher import Timing
from .engine import Engine
from .errors import (
    ERRORS,
    ClientDisconnected,
    ModelNotFound,
    NotReady,
    Unauthorized,
    install_error_handlers,
)
from .inputs import read_body
from .metrics import Metrics
from .middleware import BodyLimit, Observe, ShedLog
from .openai_compat import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    ModelList,
    ModelObject,
    OpenAIErrorResponse,
    check_model_id,
    embedding_list,
    model_object,
)
from .openapi import error_docs, json_body_docs, request_body_docs
from .processes import Peers
from .schemas import (
    EmbedRequest,
    EmbedResponse,
    ReconstructRequest,
    ReconstructResponse,
    RequestBody,
    SimilarityRequest,
    SimilarityResponse,
)
from .settings import Settings
from .tracing import Tracing, fastapi_telemetry, from_environment

try:
    __version__ = version("simmim-service")
except PackageNotFoundError:
    __version__ = "unknown"

T = TypeVar("T")
Body = TypeVar("Body", bound=RequestBody)
Images = dict[str, list[np.ndarray]]  # image field -> float32 [C, H, W] per image, in order

# Responses of at most this many numbers are rendered on the event loop (orjson: about 25 ns per
# number as JSON floats, 10 ns as base64), where a hand-off to a thread would cost more; larger
# ones in the decode pool.
INLINE_NUMBERS = 4096
FAILURES = error_docs(*(e for e in ERRORS if e is not ModelNotFound))  # 404: /v1 only
OPENAI_FAILURES = error_docs(*ERRORS, model=OpenAIErrorResponse)
UNTRACED = nullcontext()  # a request's stage while tracing is off

# The web page at / (package data: HTML, CSS, JavaScript; no CDN, no build step). Its policy lets
# it load nothing but this server's files and talk to nothing but this server.
PAGE_DIR = Path(__file__).with_name("page")
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# an absolute path, up to its last component (not the // of a URL)
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"]+/)*([^\s/'\"]*)")


def create_app(
    settings: Settings,
    backend: BackendFactory | None = None,
    peers: Peers | None = None,
    tracer_provider: Any = None,
) -> FastAPI:
    """Check the model directory now (ModelDirError if it cannot be served); the backend is
    loaded, warmed up and timed in the background once the server runs. backend: what loads
    it (default: onnxruntime, OnnxBackend.from_settings); peers: this process's place among
    several server processes (default: the only one); tracer_provider: an OpenTelemetry SDK
    TracerProvider to trace requests into (default: as the OTEL_* environment says, which is
    off unless it asks for traces; TracingError if it asks for what cannot run here)."""
    model = checked_model_dir(settings.model_dir)
    peers = peers or Peers()
    metrics = Metrics(multiprocess=peers.count > 1)
    tracing = Tracing(tracer_provider) if tracer_provider is not None else from_environment()
    engine = Engine(settings, model, metrics, peers, backend or OnnxBackend.from_settings, tracing)
    app = FastAPI(
        title="simmim-service",
        version=__version__,
        lifespan=lifespan,
        description=f"SimMIM image embeddings and reconstructions from {model.name!r}, "
        "batched dynamically.",
        telemetry=fastapi_telemetry(tracing),
        docs_url=None,  # add_docs_routes serves them, behind the key if settings.docs says so
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = engine
    app.state.card = without_paths(model.card)
    install_error_handlers(app)
    guarded = [Depends(api_key_guard(settings.api_key))] if settings.api_key else []
    add_routes(app, guarded)
    if settings.docs != "off":
        add_docs_routes(app, guarded if settings.docs == "key" else [])
    endpoints = {route.path for route in app.routes}
    app.state.shed_log = ShedLog()
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        Observe,
        metrics=metrics,
        endpoints=endpoints,
        log_requests=settings.log_requests,
        shed_log=app.state.shed_log,
    )
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load the model in the background while serving; at shutdown, finish what is queued
    (and export the spans)."""
    engine: Engine = app.state.engine
    engine.start()
    yield
    await engine.close()
    if engine.tracing is not None:
        engine.tracing.shutdown()


# --- routes: module-level handlers, added to each app by add_routes -------------------------
def add_routes(app: FastAPI, guarded: list) -> None:
    """The page and the health routes (open to all: the page asks for the key and sends it with
    its API calls), then /info, /metrics and the inference routes (behind `guarded`: the API
    key, when one is set). Added to the app itself: an included APIRouter costs 20-40 us more
    per request (FastAPI 0.165)."""
    app.add_api_route("/", page, include_in_schema=False)
    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")
    app.add_api_route("/health/live", live, tags=["health"])
    app.add_api_route("/health/ready", ready, tags=["health"], responses=error_docs(NotReady))
    key = error_docs(Unauthorized)
    app.add_api_route("/info", info, dependencies=guarded, responses=key)
    app.add_api_route(
        "/metrics", prometheus, dependencies=guarded, response_class=Response, responses=key
    )
    app.state.queues = {}  # inference path -> its queue, for refusals at the connection
    for path, handler, schema, response_model, responses in (
        ("/embed", embed, EmbedRequest, EmbedResponse, {}),
        ("/similarity", similarity, SimilarityRequest, SimilarityResponse, {}),
        ("/reconstruct", reconstruct, ReconstructRequest, ReconstructResponse, PNG_RESPONSE),
    ):
        app.state.queues[path] = schema.queue
        app.add_api_route(
            path,
            handler,
            methods=["POST"],
            dependencies=guarded,
            response_model=response_model,
            openapi_extra=request_body_docs(schema),
            responses={**FAILURES, **responses},
        )
    openai = {"dependencies": guarded, "tags": ["OpenAI-compatible"]}
    app.state.queues["/v1/embeddings"] = EmbeddingsRequest.queue
    app.add_api_route(
        "/v1/embeddings",
        openai_embeddings,
        methods=["POST"],
        response_model=EmbeddingsResponse,
        openapi_extra=json_body_docs(EmbeddingsRequest),
        responses=OPENAI_FAILURES,
        **openai,
    )
    app.add_api_route("/v1/models", openai_models, response_model=ModelList, **openai)
    app.add_api_route(
        "/v1/models/{model}",
        openai_model,
        response_model=ModelObject,
        responses=error_docs(ModelNotFound, model=OpenAIErrorResponse),
        **openai,
    )


def add_docs_routes(app: FastAPI, guarded: list) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc, behind `guarded` (not in the schema)."""

    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    async def swagger() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    for path, handler in (("/openapi.json", openapi), ("/docs", swagger), ("/redoc", redoc)):
        app.add_api_route(path, handler, dependencies=guarded, include_in_schema=False)


PNG_RESPONSE = {
    200: {
        "content": {"image/png": {}},
        "description": "JSON, or with 'Accept: image/png' one PNG: original | masked | "
        "reconstruction, scaled up to at least 256 px each",
    }
}


async def page(request: Request) -> FileResponse:
    """The web page: see what the model sees (service/page/, on the public API only)."""
    return FileResponse(PAGE_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


async def live(request: Request) -> dict:
    """200 while the process serves HTTP; 503 if the model failed to load."""
    engine: Engine = request.app.state.engine
    if engine.state == "failed":
        engine.check_ready()
    return {"status": "live"}


async def ready(request: Request) -> dict:
    """200 once the model is loaded and warmed up (in every server process); 503 before, and
    while draining."""
    request.app.state.engine.check_all_ready()
    return {"status": "ready"}


async def info(request: Request) -> dict:
    """The model card, the serving settings (API key left out) and the runtime; no path of
    the server's filesystem (the model directory by its name)."""
    engine: Engine = request.app.state.engine
    return {
        "model": request.app.state.card,
        "settings": engine.settings.public(),
        "version": __version__,
        **engine.info(),
    }


async def prometheus(request: Request) -> Response:
    """Prometheus text format."""
    metrics: Metrics = request.app.state.engine.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


async def embed(request: Request) -> Response:
    """Embed images: [N, D] float32 pooled encoder outputs, L2-normalised unless
    normalize=false; as numbers, or as base64 of little-endian float32."""
    return await serve(request, EmbedRequest, embed_images)


async def similarity(request: Request) -> Response:
    """Cosine similarity of every image in a with every image in b (b omitted: a)."""
    return await serve(request, SimilarityRequest, compare_images)


async def reconstruct(request: Request) -> Response:
    """Mask the image with SimMIM's random block mask and reconstruct it."""
    task = partial(reconstruct_image, png=wants_png(request))
    return await serve(request, ReconstructRequest, task)


async def openai_embeddings(request: Request) -> Response:
    """OpenAI's embeddings API, for images: the same batcher and vectors as /embed with
    normalize=true (L2-normalised)."""
    return await serve(request, EmbeddingsRequest, embed_for_openai)


async def openai_models(request: Request) -> dict:
    """The served model, in OpenAI's list of models."""
    return {"object": "list", "data": [model_object(request.app.state.engine.model)]}


async def openai_model(request: Request, model: str) -> dict:
    """The served model as OpenAI's model object; 404 for any other id."""
    served = request.app.state.engine.model
    check_model_id(model, served)
    return model_object(served)


# --- the request path ----------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """A response body still to be built: by build() on the event loop if `inline` (cheap),
    else on the decode pool. images: how many the request held (for the access log)."""

    build: Callable[[], bytes]
    media_type: str
    images: int
    inline: bool


# A route's work between decoding and rendering: (engine, parsed body, decoded images) ->
# (the answer, where the model time went). Runs on the event loop; awaits the batchers.
Task = Callable[[Engine, Body, Images], Awaitable[tuple[Answer, Timing]]]


async def serve(request: Request, schema: type[Body], task: Task[Body]) -> Response:
    """The path of every inference request:
    1. admit, before reading the body: 503 unless ready, 429 unless schema.queue has room and
       the body fits in the bytes in flight; counted until answered (drain waits for it);
    2. parse the body (JSON or multipart) into `schema`: 415, 422, 413 over max_images; then
       what the served model cannot do (schema.check: 404, 400);
    3. decode its images, field by field, to model input: 400 or 413 naming the image; the
       request timeout runs from here;
    4. task: submit them to the batchers and wait, cancelled with 499 if the client leaves;
    5. render the task's Answer, with the request's timings as headers.
    While tracing, decode and render are spans (the batcher adds queue and inference)."""
    engine: Engine = request.app.state.engine
    spans = engine.tracing
    with engine.admit(schema.queue, declared_bytes(request, engine.settings)) as admission:
        body = await read_body(request, schema, engine.settings.max_images)
        admission.start_clock()
        body.check(engine.model)
        lists = body.image_lists()
        if spans:
            count = sum(len(sources) for sources in lists.values())
            spans.annotate({"simmim.images": count, "simmim.request_id": request.state.request_id})
        start = time.perf_counter()
        with spans.stage("decode") if spans else UNTRACED:
            images = {
                field: await engine.decode_images(sources, field)
                for field, sources in lists.items()
            }
        decode_s = time.perf_counter() - start
        admission.queued()
        answer, timing = await cancel_on_disconnect(request, task(engine, body, images))
        start = time.perf_counter()
        with spans.stage("render") if spans else UNTRACED:
            content = answer.build() if answer.inline else await engine.off_loop(answer.build)
        seconds = {
            "decode": decode_s,
            "queue": timing.queue_s,
            "inference": timing.inference_s,
            "serialize": time.perf_counter() - start,
        }
        return Response(
            content,
            media_type=answer.media_type,
            headers=record_timings(request, seconds, answer.images),
        )


def declared_bytes(request: Request, settings: Settings) -> int:
    """The body's Content-Length, or the most it may hold when it is not declared (chunked)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else settings.max_request_bytes


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (after the body has been read); if the client goes away first, cancel it,
    so that its items leave the queue, and answer 499 (to the log: nobody reads it).

    A watcher task cancels this one on disconnect (half the cost of running `work` as a task
    of its own and waiting for either)."""
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # this request itself is being cancelled
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()  # handled here: not a cancellation of the task
        raise ClientDisconnected("the client closed the connection before the results") from None
    finally:
        watcher.cancel()


def record_timings(request: Request, seconds: dict[str, float], images: int) -> dict:
    """Store the request's timings for the access log; return them as response headers (ms).

    decode: decoding and preprocessing; queue: waiting for a batch; inference: the model calls;
    serialize: rendering the response body (JSON, or the PNG)."""
    request.state.timings = seconds
    request.state.log = {"images": images}
    return {f"x-{k}-time-ms": f"{v * 1e3:.2f}" for k, v in seconds.items()}


# --- the tasks -----------------------------------------------------------------------------
async def embed_images(engine: Engine, body: EmbedRequest, images: Images) -> tuple[Answer, Timing]:
    """/embed: float32 [N, D], L2-normalised unless body.normalize is false."""
    vectors, timing = await engine.embed(images["images"])
    if body.normalize:
        vectors = l2_normalize(vectors)
    name = engine.model.name
    answer = json_answer(
        lambda: embeddings_body(vectors, body.encoding, name),
        len(vectors),
        inline=vectors.size <= INLINE_NUMBERS,
    )
    return answer, timing


async def embed_for_openai(
    engine: Engine, body: EmbeddingsRequest, images: Images
) -> tuple[Answer, Timing]:
    """/v1/embeddings: float32 [N, D] L2-normalised (as /embed's), or its first body.dimensions
    columns renormalised (a projected model; checked by body.check)."""
    vectors, timing = await engine.embed(images["input"])
    vectors = l2_normalize(vectors[:, : body.dimensions] if body.dimensions else vectors)
    name, encoding = engine.model.name, body.encoding_format
    answer = json_answer(
        lambda: embedding_list(base64_rows(vectors) if encoding == "base64" else vectors, name),
        len(vectors),
        inline=vectors.size <= INLINE_NUMBERS,
    )
    return answer, timing


async def compare_images(
    engine: Engine, body: SimilarityRequest, images: Images
) -> tuple[Answer, Timing]:
    """/similarity: [len(a), len(b)] cosines (b omitted: a); a and b embedded in one submit."""
    a, b = images["a"], images.get("b", [])
    vectors, timing = await engine.embed(a + b)
    vectors = l2_normalize(vectors)
    va = vectors[: len(a)]
    vb = vectors[len(a) :] if b else va
    scores = va @ vb.T
    answer = json_answer(
        lambda: {"scores": scores}, len(vectors), inline=scores.size <= INLINE_NUMBERS
    )
    return answer, timing


async def reconstruct_image(
    engine: Engine, body: ReconstructRequest, images: Images, *, png: bool
) -> tuple[Answer, Timing]:
    """/reconstruct: a random block mask (body's ratio and seed, else the model's ratio and a
    fresh mask), the model's reconstruction with the visible patches pasted back (unless
    body.paste_visible is false), rendered as JSON or (png) one picture. The loss is the raw
    output's masked L1 (pasting changes no masked pixel)."""
    card, spec = engine.model.card, engine.model.preprocessing
    patch = card["patch_size"]
    [pixels] = images["image"]
    ratio = card["mask_ratio"] if body.mask_ratio is None else body.mask_ratio
    mask = visualize.random_mask(card, ratio, body.seed)
    output, timing = await engine.reconstruct(pixels, mask)
    shown = visualize.paste_visible(pixels, mask, output, patch) if body.paste_visible else output
    if png:
        picture = partial(visualize.side_by_side, pixels, mask, shown, spec, patch)
        return Answer(picture, "image/png", 1, inline=False), timing

    def png_base64(image: np.ndarray) -> str:
        return base64.b64encode(visualize.png(image, spec)).decode()

    answer = json_answer(
        lambda: {
            "mask": mask.tolist(),
            "original": png_base64(pixels),
            "masked_input": png_base64(visualize.masked_input(pixels, mask, patch)),
            "reconstruction": png_base64(shown),
            "loss": visualize.masked_l1(pixels, output, mask, patch),
        },
        1,
        inline=False,
    )
    return answer, timing


# --- rendering -----------------------------------------------------------------------------
def json_answer(payload: Callable[[], dict], images: int, inline: bool) -> Answer:
    """An Answer whose body is payload() as JSON (numpy arrays allowed)."""
    return Answer(lambda: to_json(payload()), "application/json", images, inline)


def to_json(payload: dict) -> bytes:
    """JSON bytes; numpy arrays as numbers (float32 as the shortest text that reads back the
    same float32)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """[N, D] -> rows of unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def base64_rows(vectors: np.ndarray) -> list[str]:
    """float32 [N, D] -> each row as base64 of its little-endian float32 bytes."""
    return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]


def embeddings_body(vectors: np.ndarray, encoding: str, model_name: str) -> dict:
    """float32 [N, D] -> the /embed response: rows as numbers, or as base64 of little-endian
    float32 bytes."""
    out = base64_rows(vectors) if encoding == "base64" else vectors
    return {"model": model_name, "dim": int(vectors.shape[1]), "embeddings": out}


def wants_png(request: Request) -> bool:
    """True when Accept ranks image/png above application/json (ties go to JSON)."""
    quality = {}
    for part in request.headers.get("accept", "").split(","):
        kind, *params = [p.strip() for p in part.split(";")]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            quality[kind.lower()] = float(q)
        except ValueError:
            continue
    json_q = max(quality.get("application/json", 0), quality.get("*/*", 0))
    return quality.get("image/png", 0) > json_q


# --- start-up ------------------------------------------------------------------------------
def api_key_guard(key: SecretStr):
    """A dependency that demands 'Authorization: Bearer <key>' (constant-time comparison)."""
    expected = key.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, description="the server's SIMMIM_API_KEY")

    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), expected
        ):
            raise Unauthorized(
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return guard


def without_paths(value):
    """`value` (JSON-like) with every absolute path in its strings cut to its last component
    (a model card's commands name the training machine's folders)."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(r"\1", value)
    return value


def checked_model_dir(path: Path) -> ModelDir:
    """The model directory, if it can be served; else ModelDirError."""
    model = load_model_dir(path)
    card = model.card
    try:
        check_sizes(card["image_size"], card["mask_patch_size"], card["patch_size"])
    except ValueError as e:
        raise ModelDirError(f"{model.path / 'model.json'}: {e}") from None
    return model
