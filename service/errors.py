"""Every error the service answers with, and the one table that maps them to HTTP statuses.

Body of every error response: {"error": {"code": str, "message": str, "index": int?}}, where
index names the offending image in the request's list (counting from 0) when there is one. On
the OpenAI-compatible routes (/v1/...) the same errors take OpenAI's shape instead:
{"error": {"message": str, "type": str, "param": str | null, "code": str}}, param naming the
request field at fault ("model", "input[2]").
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("simmim.errors")


class ServiceError(Exception):
    """An error whose message is written for the client; ERRORS gives its status and code."""

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.index, self.param, self.headers = message, index, param, headers or {}


class InvalidImage(ServiceError):
    """An input that is not a decodable image (or not valid base64)."""


class UnsupportedDimensions(ServiceError):
    """/v1/embeddings: `dimensions` the served model cannot give."""


class ModelNotFound(ServiceError):
    """/v1: a model id other than the served model's."""


class Unauthorized(ServiceError):
    """Missing or wrong API key."""


class PayloadTooLarge(ServiceError):
    """Request body over max_request_bytes."""


class TooManyImages(ServiceError):
    """More images in one request than max_images."""


class ImageTooLarge(ServiceError):
    """An image with more pixels than max_pixels (seen in its header, before decoding)."""


class UnsupportedMediaType(ServiceError):
    """A body that is neither application/json nor multipart/form-data."""


class InvalidRequest(ServiceError):
    """A body that does not match the endpoint's schema."""


class QueueFull(ServiceError):
    """The batch queue cannot take the request's images now; retry after Retry-After seconds."""


class InferenceFailed(ServiceError):
    """The model call for a batch raised; details are in the server log only."""


class ClientDisconnected(ServiceError):
    """The client went away before its results were ready, or in the middle of sending its
    body (logged; nobody reads the answer)."""


class BodyTimeout(ServiceError):
    """The request body did not arrive in full within body_timeout_s (the connection is then
    closed)."""


class WorkerFailed(ServiceError):
    """A batcher or model worker of this process died: the process is exiting; retry (another
    process or replica answers)."""


class NotReady(ServiceError):
    """The model is still loading or warming up."""


class ShuttingDown(ServiceError):
    """The server is draining after SIGTERM and takes no new work."""


class RequestTimeout(ServiceError):
    """Results did not arrive within request_timeout_s."""


ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    InvalidImage: (400, "invalid_image"),
    UnsupportedDimensions: (400, "unsupported_dimensions"),
    Unauthorized: (401, "unauthorized"),
    ModelNotFound: (404, "model_not_found"),
    BodyTimeout: (408, "body_timeout"),
    PayloadTooLarge: (413, "payload_too_large"),
    TooManyImages: (413, "too_many_images"),
    ImageTooLarge: (413, "image_too_large"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    InvalidRequest: (422, "invalid_request"),
    QueueFull: (429, "queue_full"),
    ClientDisconnected: (499, "client_closed_request"),
    InferenceFailed: (500, "inference_failed"),
    NotReady: (503, "not_ready"),
    ShuttingDown: (503, "shutting_down"),
    WorkerFailed: (503, "worker_failed"),
    RequestTimeout: (504, "timeout"),
}


# An error message is at most this many characters (an error body a few hundred bytes more):
# nothing a client sent comes back at length.
MAX_MESSAGE = 1000
MAX_ERRORS = 5  # validation errors described in one message
MAX_NAME = 40  # characters of a field name (the client's own key) quoted in a message


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


OPENAI_PREFIX = "/v1/"  # routes whose errors take OpenAI's shape


def error_body(code: str, message: str, index: int | None = None) -> dict:
    error = {"code": code, "message": clip(message, MAX_MESSAGE)}
    if index is not None:
        error["index"] = index
    return {"error": error}


def openai_error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_payload(
    path: str,
    status: int,
    code: str,
    message: str,
    index: int | None = None,
    param: str | None = None,
) -> dict:
    """The body of an error answer to a request for `path`: OpenAI's shape under /v1/, else
    ours; the message clipped to MAX_MESSAGE characters."""
    if path.startswith(OPENAI_PREFIX):
        error = {"message": clip(message, MAX_MESSAGE), "type": openai_error_type(status)}
        return {"error": {**error, "param": param, "code": code}}
    return error_body(code, message, index)


def error_json(
    path: str,
    status: int,
    code: str,
    message: str,
    *,
    index: int | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error response for a request to `path` (error_payload)."""
    body = error_payload(path, status, code, message, index, param)
    return JSONResponse(body, status, headers=headers)


def error_response(exc: ServiceError, path: str) -> JSONResponse:
    status, code = ERRORS[type(exc)]
    return error_json(
        path, status, code, exc.message, index=exc.index, param=exc.param, headers=exc.headers
    )


def describe_validation(exc: ValidationError | RequestValidationError) -> str:
    """'field.sub: what is wrong; ...' for the first MAX_ERRORS errors, without echoing the
    input values back (field names clipped to MAX_NAME characters)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    parts = [
        f"{'.'.join(clip(str(p), MAX_NAME) for p in e['loc']) or 'body'}: {e['msg']}"
        for e in errors[:MAX_ERRORS]
    ]
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more errors")
    return "; ".join(parts)


def invalid_request(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    """The 422 for a body that does not match its schema; param: the first field at fault."""
    loc = exc.errors()[0]["loc"] if exc.errors() else ()
    return InvalidRequest(describe_validation(exc), param=str(loc[0]) if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through ERRORS (or the HTTP status it already carries)."""

    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, request.url.path)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(exc), request.url.path)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return error_json(
            request.url.path, exc.status_code, code, str(exc.detail), headers=exc.headers
        )

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error on %s %s",
            request.method,
            request.url.path,
            exc_info=exc,
            extra={"request_id": getattr(request.state, "request_id", None)},
        )
        return error_json(
            request.url.path, 500, "internal", "internal server error; see the server log"
        )

    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        """The body stopped coming: the server cut it (connections.py, body timeout: 408)
        or the client went away (499). Either way nobody reads this answer."""
        if request.scope["state"].get("body_timeout"):
            gone = BodyTimeout("the request body did not arrive in time")
        else:
            gone = ClientDisconnected("the client closed the connection mid-body")
        return error_response(gone, request.url.path)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
