"""The FastAPI app (DESIGN §4): `create_app(settings)`; routes validate, call the engine, answer.

Layers: routes (here) -> engine (readiness, batchers, thread pools) -> backend (onnxruntime).
"""
from __future__ import annotations

import base64
import hmac
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from simmim_core.masking import check_sizes
from . import reconstruction
from .batcher import Timing
from .engine import Engine
from .errors import ERRORS, NotReady, Unauthorized, install_error_handlers
from .inputs import read_body
from .metrics import Metrics
from .middleware import BodyLimit, Observe
from .model_dir import ModelDirError, load_model_dir
from .schemas import (EmbedRequest, EmbedResponse, ErrorResponse, ReconstructRequest,
                      ReconstructResponse, RequestBody, SimilarityRequest, SimilarityResponse)
from .settings import Settings

try:
    __version__ = version("simmim-service")
except PackageNotFoundError:
    __version__ = "unknown"

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

    base64_image = {"type": "string", "description": "the image file in base64 (a data: URI "
                                                     "prefix is accepted; URLs are not fetched)"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": with_images(base64_image)},
        "multipart/form-data": {"schema": with_images({"type": "string", "format": "binary"})}}}}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """[N, D] -> rows of unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def record_timings(request: Request, decode_s: float, timing: Timing, images: int) -> dict:
    """Store timings for the access log; return them as response headers (milliseconds)."""
    seconds = {"decode": decode_s, "queue": timing.queue_s, "inference": timing.inference_s}
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


def api_key_guard(settings: Settings):
    """A dependency that demands 'Authorization: Bearer <key>' (constant-time comparison)."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None
    bearer = HTTPBearer(auto_error=False, description="the server's SIMMIM_API_KEY")

    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(),
                                                          expected):
            raise Unauthorized("missing or wrong API key; send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
    return guard


def create_app(settings: Settings) -> FastAPI:
    """Check the model directory now (ModelDirError if it cannot be served); the ONNX sessions
    are created and warmed up in the background once the server runs."""
    model = load_model_dir(settings.model_dir)
    card = model.card
    try:
        check_sizes(card["image_size"], card["mask_patch_size"], card["patch_size"])
    except ValueError as e:
        raise ModelDirError(f"{model.path / 'model.json'}: {e}") from None
    metrics = Metrics()
    engine = Engine(settings, model, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.close()

    app = FastAPI(title="simmim-service", version=__version__, lifespan=lifespan,
                  description=f"SimMIM image embeddings and reconstructions from "
                              f"{model.name!r} (onnxruntime, dynamic batching).")
    app.state.engine = engine
    install_error_handlers(app)
    guarded = [Depends(api_key_guard(settings))]
    failures = error_docs(*ERRORS)

    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        """200 while the process serves HTTP; 503 if the model failed to load."""
        if engine.state == "failed":
            engine.check_ready()
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses=error_docs(NotReady))
    async def ready() -> dict:
        """200 once the model is loaded and warmed up; 503 before, and while draining."""
        engine.check_ready()
        return {"status": "ready"}

    @app.get("/info", dependencies=guarded)
    async def info() -> dict:
        """The model card, the serving settings (API key left out) and the runtime."""
        return {"model": card, "settings": settings.public(), "version": __version__,
                **engine.info()}

    @app.get("/metrics", dependencies=guarded, response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/embed", dependencies=guarded, response_model=EmbedResponse,
              openapi_extra=request_body_docs(EmbedRequest), responses=failures)
    async def embed(request: Request) -> JSONResponse:
        """Embed images: [N, D] float32 pooled encoder outputs, L2-normalised unless
        normalize=false; as numbers, or as base64 of little-endian float32."""
        async with engine.admit():
            body = await read_body(request, EmbedRequest, settings.max_images)
            start = time.perf_counter()
            pixels = await engine.load_images(body.images, "images")
            decode_s = time.perf_counter() - start
            vectors, timing = await engine.embed(pixels)
            if body.normalize:
                vectors = l2_normalize(vectors)
            if body.encoding == "base64":
                out = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
            else:
                out = vectors.tolist()
            headers = record_timings(request, decode_s, timing, len(pixels))
            return JSONResponse({"model": model.name, "dim": int(vectors.shape[1]),
                                 "embeddings": out}, headers=headers)

    @app.post("/similarity", dependencies=guarded, response_model=SimilarityResponse,
              openapi_extra=request_body_docs(SimilarityRequest), responses=failures)
    async def similarity(request: Request) -> JSONResponse:
        """Cosine similarity of every image in a with every image in b (b omitted: a)."""
        async with engine.admit():
            body = await read_body(request, SimilarityRequest, settings.max_images)
            start = time.perf_counter()
            a = await engine.load_images(body.a, "a")
            b = await engine.load_images(body.b, "b") if body.b is not None else []
            decode_s = time.perf_counter() - start
            vectors, timing = await engine.embed(a + b)
            vectors = l2_normalize(vectors)
            va, vb = vectors[:len(a)], vectors[len(a):] if b else vectors[:len(a)]
            headers = record_timings(request, decode_s, timing, len(a) + len(b))
            return JSONResponse({"scores": (va @ vb.T).tolist()}, headers=headers)

    @app.post("/reconstruct", dependencies=guarded, response_model=ReconstructResponse,
              openapi_extra=request_body_docs(ReconstructRequest),
              responses={**failures, 200: {"content": {"image/png": {}}, "description":
                         "JSON, or with 'Accept: image/png' one PNG: original | masked | "
                         "reconstruction, scaled up to at least 256 px each"}})
    async def reconstruct(request: Request) -> Response:
        """Mask the image with SimMIM's random block mask and reconstruct it."""
        async with engine.admit():
            body = await read_body(request, ReconstructRequest, settings.max_images)
            start = time.perf_counter()
            [pixels] = await engine.load_images([body.image], "image")
            decode_s = time.perf_counter() - start
            ratio = card["mask_ratio"] if body.mask_ratio is None else body.mask_ratio
            mask = reconstruction.random_mask(card, ratio, body.seed)
            output, timing = await engine.reconstruct(pixels, mask)
            headers = record_timings(request, decode_s, timing, 1)
            patch, spec = card["patch_size"], model.preprocessing
            if wants_png(request):
                picture = await engine.off_loop(reconstruction.side_by_side, pixels, mask,
                                                output, spec, patch)
                return Response(picture, media_type="image/png", headers=headers)
            masked, rebuilt = await engine.off_loop(lambda: (
                reconstruction.png(reconstruction.masked_input(pixels, mask, patch), spec),
                reconstruction.png(output, spec)))
            return JSONResponse({
                "mask": mask.tolist(),
                "masked_input": base64.b64encode(masked).decode(),
                "reconstruction": base64.b64encode(rebuilt).decode(),
                "loss": reconstruction.masked_l1(pixels, output, mask, patch)}, headers=headers)

    endpoints = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(Observe, metrics=metrics, endpoints=endpoints)
    return app
