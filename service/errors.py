"""Every error the service answers with, and the one table that maps them to HTTP statuses.

Body of every error response: {"error": {"code": str, "message": str, "index": int?}}, where
index names the offending image in the request's list (counting from 0) when there is one.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger("simmim.errors")


class ServiceError(Exception):
    """An error whose message is written for the client; ERRORS gives its status and code."""

    def __init__(
        self, message: str, *, index: int | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message, self.index, self.headers = message, index, headers or {}


class InvalidImage(ServiceError):
    """An input that is not a decodable image (or not valid base64)."""


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
    """The client went away before its results were ready (logged; nobody reads the answer)."""


class NotReady(ServiceError):
    """The model is still loading or warming up."""


class ShuttingDown(ServiceError):
    """The server is draining after SIGTERM and takes no new work."""


class RequestTimeout(ServiceError):
    """Results did not arrive within request_timeout_s."""


ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    InvalidImage: (400, "invalid_image"),
    Unauthorized: (401, "unauthorized"),
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
    RequestTimeout: (504, "timeout"),
}


def error_body(code: str, message: str, index: int | None = None) -> dict:
    error = {"code": code, "message": message}
    if index is not None:
        error["index"] = index
    return {"error": error}


def error_response(exc: ServiceError) -> JSONResponse:
    status, code = ERRORS[type(exc)]
    return JSONResponse(error_body(code, exc.message, exc.index), status, headers=exc.headers)


def describe_validation(exc: ValidationError | RequestValidationError) -> str:
    """'field.sub: what is wrong; ...' without echoing the input values back."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through ERRORS (or the HTTP status it already carries)."""

    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequest(describe_validation(exc)))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal", "internal server error; see the server log"), 500
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
