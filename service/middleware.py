"""ASGI middleware: the request-body limit, and per-request observation (id, log line, metrics)."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLarge, error_response
from .metrics import Metrics

access_log = logging.getLogger("simmim.access")

QUIET_PATHS = ("/health/live", "/health/ready", "/metrics")  # logged at debug level only
SHED_LOG_INTERVAL_S = 10.0  # at most one access-log line per this many seconds for 429s
_REQUEST_ID = re.compile(r"[\w.:-]{1,64}")


class BodyLimit:
    """413 for bodies over max_bytes: at once from Content-Length, or as soon as a streamed
    (chunked) body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self._error(), scope["path"])(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)


class Observe:
    """Per request: an id (the client's X-Request-ID if sane, else a new one; echoed back), one
    log line with status and timings, and the request count and latency metrics.

    Routes add their timings in seconds to scope["state"]["timings"]. Lines of successful
    requests to QUIET_PATHS, or to any path unless log_requests, are logged at debug level.
    Requests shed with 429 under overload are counted, not logged one by one: at most one line
    per SHED_LOG_INTERVAL_S, whose `count` says how many 429s it stands for (a line per 429
    would cost the loop the time it sheds them to save)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        endpoints: set[str],
        log_requests: bool,
        shed_log: ShedLog,
    ):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self.log_requests, self.shed_log = log_requests, shed_log
        # new ids: random per process, then a counter (uuid4 costs a system call per request)
        self._prefix, self._ids = secrets.token_hex(4), itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = (
            given if _REQUEST_ID.fullmatch(given) else f"{self._prefix}{next(self._ids):08x}"
        )
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # if the app raises before answering

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"]
            endpoint = path if path in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            quiet = status < 400 and (path in QUIET_PATHS or not self.log_requests)
            level = logging.DEBUG if quiet else logging.INFO
            count = self.shed_log.count() if status == 429 else 1
            if count and access_log.isEnabledFor(level):
                timings = {
                    f"{k}_ms": round(v * 1e3, 2) for k, v in state.get("timings", {}).items()
                }
                access_log.log(
                    level,
                    "%s %s",
                    scope["method"],
                    path,
                    extra={
                        "request_id": request_id,
                        "status": status,
                        "duration_ms": round(seconds * 1e3, 2),
                        **timings,
                        **state.get("log", {}),
                        **({"count": count} if status == 429 else {}),
                    },
                )


class ShedLog:
    """The access log of requests answered 429 under overload: at most one line per
    SHED_LOG_INTERVAL_S (per process), which stands for `count` of them. Shared by Observe and
    the connections' early refusals (connections.Screen)."""

    def __init__(self) -> None:
        self._count, self._logged = 0, -SHED_LOG_INTERVAL_S

    def count(self) -> int:
        """For one 429: how many 429s a line logged now stands for, or 0 to log none."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged < SHED_LOG_INTERVAL_S:
            return 0
        count, self._count, self._logged = self._count, 0, now
        return count
