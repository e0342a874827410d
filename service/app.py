"""The FastAPI app (DESIGN §4): `create_app(settings)`; routes validate, call the engine, answer.

Layers: routes (here) -> engine (readiness, batchers, thread pools) -> backend (onnxruntime).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import sys
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from simmim_core import visualize
from simmim_core.masking import check_sizes
from simmim_core.model_dir import ModelDir, ModelDirError, load_model_dir

from .batcher import Timing
from .engine import Engine
from .errors import ERRORS, ClientDisconnected, NotReady, Unauthorized, install_error_handlers
from .inputs import read_body
from .metrics import Metrics
from .middleware import BodyLimit, Observe
from .processes import Peers
from .schemas import (
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    ReconstructRequest,
    ReconstructResponse,
    RequestBody,
    SimilarityRequest,
    SimilarityResponse,
)
from .settings import Settings

try:
    __version__ = version("simmim-service")
except PackageNotFoundError:
    __version__ = "unknown"

T = TypeVar("T")

# Responses of at most this many numbers are rendered on the event loop (orjson: about 25 ns per
# number as JSON floats, 10 ns as base64), where a hand-off to a thread would cost more; larger
# ones in the decode pool.
INLINE_NUMBERS = 4096


def error_docs(*exceptions) -> dict:
    """OpenAPI `responses` for the given ServiceError types (by status)."""
    return {ERRORS[e][0]: {"model": ErrorResponse} for e in exceptions}


def request_body_docs(model: type[RequestBody]) -> dict:
    """OpenAPI requestBody: the model as JSON (images in base64) or multipart (images as files)."""
    schema = model.model_json_schema()

    def with_images(image: dict) -> dict:
        properties = dict(schema["properties"])
        for name in model.files:
            properties[name] = {"type": "array", "items": image} if name in model.lists else image
        return {**schema, "properties": properties}

    base64_image = {
        "type": "string",
        "description": "the image file in base64 (a data: URI "
        "prefix is accepted; URLs are not fetched)",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": with_images(base64_image)},
                "multipart/form-data": {
                    "schema": with_images({"type": "string", "format": "binary"})
                },
            },
        }
    }


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """[N, D] -> rows of unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embeddings_body(vectors: np.ndarray, encoding: str, model_name: str) -> dict:
    """float32 [N, D] -> the /embed response: rows as numbers, or as base64 of little-endian
    float32 bytes."""
    out = (
        [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        if encoding == "base64"
        else vectors
    )
    return {"model": model_name, "dim": int(vectors.shape[1]), "embeddings": out}


def to_json(payload: dict) -> bytes:
    """JSON bytes; numpy arrays as numbers (float32 as the shortest text that reads back the
    same float32)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def record_timings(request: Request, timing: Timing, images: int, serialize_s: float) -> dict:
    """Store the request's timings for the access log; return them as response headers (ms).

    decode: decoding and preprocessing; queue: waiting for a batch; inference: the model calls;
    serialize: rendering the response body (JSON, or the PNG)."""
    seconds = {
        "decode": request.state.decode_s,
        "queue": timing.queue_s,
        "inference": timing.inference_s,
        "serialize": serialize_s,
    }
    request.state.timings = seconds
    request.state.log = {"images": images}
    return {f"x-{k}-time-ms": f"{v * 1e3:.2f}" for k, v in seconds.items()}


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


def checked_model_dir(path: Path) -> ModelDir:
    """The model directory, if it can be served; else ModelDirError."""
    model = load_model_dir(path)
    card = model.card
    try:
        check_sizes(card["image_size"], card["mask_patch_size"], card["patch_size"])
    except ValueError as e:
        raise ModelDirError(f"{model.path / 'model.json'}: {e}") from None
    return model


def create_app(settings: Settings, peers: Peers | None = None) -> FastAPI:
    """Check the model directory now (ModelDirError if it cannot be served); the ONNX sessions
    are created and warmed up in the background once the server runs. peers: this process's
    place among several server processes (default: the only one)."""
    model = checked_model_dir(settings.model_dir)
    card = model.card
    peers = peers or Peers()
    metrics = Metrics(multiprocess=peers.count > 1)
    engine = Engine(settings, model, metrics, peers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.close()

    app = FastAPI(
        title="simmim-service",
        version=__version__,
        lifespan=lifespan,
        description=f"SimMIM image embeddings and reconstructions from "
        f"{model.name!r} (onnxruntime, dynamic batching).",
    )
    app.state.engine = engine
    install_error_handlers(app)
    guarded = [Depends(api_key_guard(settings.api_key))] if settings.api_key else []
    failures = error_docs(*ERRORS)

    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        """200 while the process serves HTTP; 503 if the model failed to load."""
        if engine.state == "failed":
            engine.check_ready()
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses=error_docs(NotReady))
    async def ready() -> dict:
        """200 once the model is loaded and warmed up (in every server process); 503 before,
        and while draining."""
        engine.check_all_ready()
        return {"status": "ready"}

    @app.get("/info", dependencies=guarded)
    async def info() -> dict:
        """The model card, the serving settings (API key left out) and the runtime."""
        return {
            "model": card,
            "settings": settings.public(),
            "version": __version__,
            **engine.info(),
        }

    @app.get("/metrics", dependencies=guarded, response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    async def load(request: Request, sources: list, field: str) -> list[np.ndarray]:
        """Decode and preprocess (off the loop), adding the time to the request's decode_s."""
        start = time.perf_counter()
        pixels = await engine.decode_images(sources, field)
        request.state.decode_s = getattr(request.state, "decode_s", 0.0) + (
            time.perf_counter() - start
        )
        return pixels

    async def answer(
        request: Request, timing: Timing, images: int, render, inline: bool
    ) -> Response:
        """JSON of render() -> dict (numpy arrays allowed), with the timing headers; rendered
        on the loop if `inline` (cheap), else on the decode pool."""
        start = time.perf_counter()
        body = to_json(render()) if inline else await engine.off_loop(lambda: to_json(render()))
        headers = record_timings(request, timing, images, time.perf_counter() - start)
        return Response(body, media_type="application/json", headers=headers)

    @app.post(
        "/embed",
        dependencies=guarded,
        response_model=EmbedResponse,
        openapi_extra=request_body_docs(EmbedRequest),
        responses=failures,
    )
    async def embed(request: Request) -> Response:
        """Embed images: [N, D] float32 pooled encoder outputs, L2-normalised unless
        normalize=false; as numbers, or as base64 of little-endian float32."""
        async with engine.admit():
            body = await read_body(request, EmbedRequest, settings.max_images)
            pixels = await load(request, body.images, "images")
            vectors, timing = await cancel_on_disconnect(request, engine.embed(pixels))
            if body.normalize:
                vectors = l2_normalize(vectors)
            return await answer(
                request,
                timing,
                len(vectors),
                lambda: embeddings_body(vectors, body.encoding, model.name),
                inline=vectors.size <= INLINE_NUMBERS,
            )

    @app.post(
        "/similarity",
        dependencies=guarded,
        response_model=SimilarityResponse,
        openapi_extra=request_body_docs(SimilarityRequest),
        responses=failures,
    )
    async def similarity(request: Request) -> Response:
        """Cosine similarity of every image in a with every image in b (b omitted: a)."""
        async with engine.admit():
            body = await read_body(request, SimilarityRequest, settings.max_images)
            a = await load(request, body.a, "a")
            b = await load(request, body.b, "b") if body.b is not None else []
            vectors, timing = await cancel_on_disconnect(request, engine.embed(a + b))
            vectors = l2_normalize(vectors)
            va = vectors[: len(a)]
            vb = vectors[len(a) :] if b else va
            scores = va @ vb.T
            return await answer(
                request,
                timing,
                len(vectors),
                lambda: {"scores": scores},
                inline=scores.size <= INLINE_NUMBERS,
            )

    @app.post(
        "/reconstruct",
        dependencies=guarded,
        response_model=ReconstructResponse,
        openapi_extra=request_body_docs(ReconstructRequest),
        responses={
            **failures,
            200: {
                "content": {"image/png": {}},
                "description": "JSON, or with 'Accept: image/png' one PNG: original | masked | "
                "reconstruction, scaled up to at least 256 px each",
            },
        },
    )
    async def reconstruct(request: Request) -> Response:
        """Mask the image with SimMIM's random block mask and reconstruct it."""
        async with engine.admit():
            body = await read_body(request, ReconstructRequest, settings.max_images)
            [pixels] = await load(request, [body.image], "image")
            ratio = card["mask_ratio"] if body.mask_ratio is None else body.mask_ratio
            mask = visualize.random_mask(card, ratio, body.seed)
            output, timing = await cancel_on_disconnect(request, engine.reconstruct(pixels, mask))
            patch, spec = card["patch_size"], model.preprocessing
            if wants_png(request):
                start = time.perf_counter()
                picture = await engine.off_loop(
                    visualize.side_by_side, pixels, mask, output, spec, patch
                )
                headers = record_timings(request, timing, 1, time.perf_counter() - start)
                return Response(picture, media_type="image/png", headers=headers)
            return await answer(
                request,
                timing,
                1,
                lambda: {
                    "mask": mask.tolist(),
                    "masked_input": base64.b64encode(
                        visualize.png(visualize.masked_input(pixels, mask, patch), spec)
                    ).decode(),
                    "reconstruction": base64.b64encode(visualize.png(output, spec)).decode(),
                    "loss": visualize.masked_l1(pixels, output, mask, patch),
                },
                inline=False,
            )

    endpoints = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        Observe, metrics=metrics, endpoints=endpoints, log_requests=settings.log_requests
    )
    return app
