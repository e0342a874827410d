"""Exceptions: one class per server error status, each carrying the server's code and message."""

from __future__ import annotations

import httpx


class SimmimError(Exception):
    """Base of every error this package raises."""


class APIError(SimmimError):
    """The server answered with an error.

    status: HTTP status; code: the server's error code (e.g. "invalid_image"); message: its
    explanation; index: which image of the list you passed is at fault, when one is;
    request_id: the server's id for the request (in its log); retry_after: seconds, for 429/503.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        index: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.index, self.request_id, self.retry_after = index, request_id, retry_after


class BadRequestError(APIError):
    """400: an image could not be decoded (see .index)."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class PayloadTooLargeError(APIError):
    """413: too many bytes, images or pixels in the request."""


class UnsupportedMediaTypeError(APIError):
    """415."""


class InvalidRequestError(APIError):
    """422: the request does not match the endpoint's schema."""


class QueueFullError(APIError):
    """429: the server's queue stayed full through every retry."""


class ServerError(APIError):
    """500 and other unexpected statuses."""


class ServiceUnavailableError(APIError):
    """503: not ready yet, or shutting down, through every retry."""


class GatewayTimeoutError(APIError):
    """504: the server did not get to the request within its timeout."""


class ConnectionFailedError(SimmimError):
    """The server could not be reached, through every retry."""


ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidRequestError,
    429: QueueFullError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number of seconds; HTTP dates are not used by the server)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def error_from_response(response: httpx.Response) -> APIError:
    """The typed exception for an error response (any body shape)."""
    try:
        error = response.json()["error"]
        code, message, index = error["code"], error["message"], error.get("index")
    except (ValueError, KeyError, TypeError):
        code, message, index = "http_error", response.text[:500] or response.reason_phrase, None
    cls = ERRORS_BY_STATUS.get(response.status_code, ServerError)
    return cls(
        response.status_code,
        code,
        message,
        index=index,
        request_id=response.headers.get("x-request-id"),
        retry_after=retry_after(response),
    )
