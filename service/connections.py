"""Connections: uvicorn's HTTP protocol (httptools) with the limits uvicorn leaves out.

Per connection: the request head must arrive within header_timeout_s of the connection opening
or of its previous response, and hold at most MAX_HEAD_BYTES (else it is closed: 408 or 431);
a body must arrive in full within body_timeout_s of its head (else 408, closed; the app sees the
client gone, and answers BodyTimeout). Idle keep-alive connections close after keep_alive_s
(uvicorn's own timer). Per process: at most `max_connections` open connections (capped below
the open-file limit). At the limit, a new connection takes the place of the oldest one waiting
for a request head (one that never sent a request first, then one idle between requests), which
is closed; only when every connection has a request in progress does the new one get 503 as
soon as its head has arrived, and is closed. So idle or slow connections can neither exhaust
the open files nor lock out clients with requests to make.
These answers are written here, before the app, as a few bytes prepared once.

Overload is refused here too (Screen): an inference request that the engine would refuse
(Engine.refusal: not ready, draining, queue full, bodies in flight) gets its 429 or 503 as soon
as its head has arrived, with no ASGI task, routing or middleware (about a tenth of the app's
cost), and the connection stays open, its body discarded. A refused request that arrives whole
in one read is answered before the HTTP parser sees it (LimitedProtocol._refused_whole). It is
counted in simmim_requests_total and the sampled access log like the app's own answers (in
OpenAI's error shape under /v1/), but carries no request id or trace span, and it comes before
the API key is checked. A keep-alive connection refused again within refusal_interval_ms of
its previous refusal gets its answer only once the interval has passed, reading nothing
meanwhile: a client that resends refused requests at once (a closed loop with no backoff)
costs the server one refusal per interval and connection, not as many as it can send.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from http import HTTPStatus

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .engine import Engine
from .errors import ERRORS, error_body, error_payload
from .middleware import ShedLog, access_log
from .settings import Settings

log = logging.getLogger("simmim.connections")

MAX_HEAD_BYTES = 65_536  # request line and headers
RESERVED_FILES = 64  # open files kept for everything but connections (model, logs, pipes)


def canned(status: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response in the service's error format, closing the
    connection."""
    body = orjson.dumps(error_body(code, message))
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    ).encode() + body


def connection_limit(wanted: int) -> int:
    """`wanted`, or fewer if the open-file limit cannot hold them: the soft limit is raised
    towards the hard one first (RLIMIT_NOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    limit = max(1, soft - RESERVED_FILES)
    log.warning(
        "the open-file limit (%d) allows %d connections per server process, fewer than "
        "max_connections (%d)",
        soft,
        limit,
        wanted,
    )
    return limit


class Screen:
    """screen(path, headers) -> a complete response refusing the request, or None to let the
    app take it. queues: inference path -> the queue its images go to."""

    def __init__(self, engine: Engine, queues: dict[str, str], shed_log: ShedLog):
        self.engine, self.queues, self.shed_log = engine, queues, shed_log
        self.max_body = engine.settings.max_request_bytes

    def __call__(self, path: str, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        queue = self.queues.get(path)
        if queue is None:
            return None
        length = next((v for k, v in headers if k == b"content-length"), b"")
        declared = int(length) if length.isdigit() else self.max_body
        error = self.engine.refusal(queue, declared)
        if error is None:
            return None
        status, code = ERRORS[type(error)]
        self.engine.metrics.requests.labels(path, str(status)).inc()
        count = self.shed_log.count() if status == 429 else 1
        if count:
            access_log.info("POST %s", path, extra={"status": status, "count": count})
        body = orjson.dumps(error_payload(path, status, code, error.message))
        extra = "".join(f"{k}: {v}\r\n" for k, v in error.headers.items())
        return (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json"
            f"\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
        ).encode() + body


def protocol_class(settings: Settings, screen: Screen | None = None) -> type[HttpToolsProtocol]:
    """The HTTP protocol class for uvicorn.Config(http=...), with these settings' limits, and
    `screen` refusing overload early."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedProtocol,),
        {
            "max_connections": connection_limit(settings.max_connections),
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "refusal_interval_s": settings.refusal_interval_ms / 1e3,
            "screen": screen,
            "unused": {},
            "between": {},
        },
    )


class LimitedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with timers for the request head and body, a head size limit and a
    connection limit (class attributes, set by protocol_class)."""

    max_connections = 1000
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    refusal_interval_s = 0.1
    screen: Screen | None = None
    # connections waiting for a request head, oldest first (dicts keep insertion order):
    unused: dict[LimitedProtocol, None] = {}  # that never sent a whole request head
    between: dict[LimitedProtocol, None] = {}  # idle after an answer
    TOO_MANY = canned(
        "503 Service Unavailable",
        "too_many_connections",
        "this server process has too many open connections; retry shortly",
        "retry-after: 1\r\n",
    )
    HEAD_TIMEOUT = canned(
        "408 Request Timeout", "header_timeout", "the request head did not arrive in time"
    )
    HEAD_TOO_LARGE = canned(
        "431 Request Header Fields Too Large",
        "header_too_large",
        f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
    )
    BODY_TIMEOUT = canned(
        "408 Request Timeout", "body_timeout", "the request body did not arrive in time"
    )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._refused = False  # the current request was refused by the screen: skip its body
        self._body_done = True  # the current request's body has been read (or there is none)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._waiting: dict | None = None  # unused or between, while waiting for a head
        self._refused_at = -math.inf  # loop time of this connection's last refusal answer
        self._paced: tuple[asyncio.TimerHandle, bytes] | None = None  # a refusal held back
        self.over_limit = len(self.connections) >= self.max_connections and not self._evict()
        super().connection_made(transport)
        self._await_head(self.unused)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._paced is not None:
            self._paced[0].cancel()
            self._paced = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._answer_paced()
        super().shutdown()

    def _evict(self) -> bool:
        """Close the oldest connection waiting for a head, to make room; False if none is."""
        for waiting in (self.unused, self.between):
            if waiting:
                next(iter(waiting))._end(None)
                return True
        return False

    def _await_head(self, waiting: dict) -> None:
        """A new request head may start: it must be complete within header_timeout_s."""
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._end, self.HEAD_TIMEOUT)
        self._waiting = waiting
        waiting[self] = None

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._waiting is not None:
            self._waiting.pop(self, None)
            self._waiting = None

    def _cancel_timers(self) -> None:
        self._head_arrived()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _end(self, answer: bytes | None) -> None:
        """Write `answer` (if given) and close the connection; a request in progress sees its
        client gone."""
        self._cancel_timers()
        if self.transport.is_closing():
            return
        self._answer_paced()
        if answer is not None:
            self.transport.write(answer)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now reports the client gone
            cycle.message_event.set()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._answer_paced()  # (reading was paused: only bytes already received come here)
        reading_head = self._head_timer is not None
        if reading_head and self._head_bytes == 0 and self._refused_whole(data):
            return
        super().data_received(data)
        if reading_head and self._head_timer is not None:  # the head is still incomplete
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._end(self.HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self._answer_paced()  # a pipelined request: answers keep their order
        self._head_arrived()
        self._body_done = False
        if self.over_limit:
            self._end(self.TOO_MANY)
            return
        if self._screened():
            return
        super().on_headers_complete()
        if self.transport.is_closing():
            return
        has_body = any(
            name in (b"content-length", b"transfer-encoding") and value not in (b"0",)
            for name, value in self.headers
        )
        if has_body:
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_late)

    def _body_late(self) -> None:
        """The body is late: 408 unless the request was answered already (then just close)."""
        self._body_timer = None
        cycle = self.cycle
        cycle.scope["state"]["body_timeout"] = True
        self._end(None if cycle.response_started else self.BODY_TIMEOUT)

    def _screened(self) -> bool:
        """Refuse the request whose head just arrived if the screen says so (only between
        requests: a pipelined one waits its turn in the app)."""
        if self.screen is None or self.parser.get_method() != b"POST":
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        answer = self.screen(httptools.parse_url(self.url).path.decode("ascii"), self.headers)
        if answer is None:
            return False
        self._refused = True
        if self.parser.should_keep_alive():
            self._answer_refusal(answer)
        else:
            self._end(answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1))
        return True

    def _refused_whole(self, data: bytes) -> bool:
        """The screen's fast path, for the commonest request under overload: `data` is one
        whole POST (head and body, nothing after it) with a Content-Length, HTTP/1.1 keep-alive,
        to a path the screen refuses. It is answered without the HTTP parser and uvicorn's
        per-request state, and the connection waits for its next request. Anything else
        (another shape, a partial or pipelined request, an unusual header) returns False and
        goes the normal way: the parser sees every byte of it."""
        if self.screen is None or self.over_limit or not data.startswith(b"POST /"):
            return False
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        lone = data[:end].replace(b"\r\n", b"")
        if b"\n" in lone or b"\r" in lone:  # a bare LF or CR: the parser's to judge
            return False
        request_line, *lines = data[:end].split(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return False
        headers, length = [], None
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                return False
            name, value = name.lower(), value.strip(b" \t")
            if name in (b"transfer-encoding", b"connection", b"expect"):
                return False
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return False
                length = int(value)
            headers.append((name, value))
        if length is None or len(data) != end + 4 + length:
            return False
        try:
            path = parts[1].partition(b"?")[0].decode("ascii")
        except UnicodeDecodeError:
            return False
        answer = self.screen(path, headers)
        if answer is None:
            return False
        self._head_arrived()
        self._answer_refusal(answer)
        self._after_refusal()
        return True

    def _answer_refusal(self, answer: bytes) -> None:
        """Write a refusal on this keep-alive connection: at once, or, within
        refusal_interval_s of its previous refusal, when the interval has passed, reading
        nothing more meanwhile."""
        due = self._refused_at + self.refusal_interval_s
        if due <= self.loop.time():
            self._refused_at = self.loop.time()
            self.transport.write(answer)
            return
        self.flow.pause_reading()
        self._paced = (self.loop.call_at(due, self._answer_paced), answer)

    def _answer_paced(self) -> None:
        """Write the refusal held back, if any, now, and read again."""
        if self._paced is None:
            return
        handle, answer = self._paced
        self._paced = None
        handle.cancel()
        if self.transport.is_closing():
            return
        self._refused_at = self.loop.time()
        self.transport.write(answer)
        self.flow.resume_reading()

    def _after_refusal(self) -> None:
        """A refused request is done with: the connection waits for the next head, idle for
        at most keep_alive_s."""
        self._await_head(self.between)
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def on_body(self, body: bytes) -> None:
        if not (self.over_limit or self._refused):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.over_limit:
            return
        self._body_done = True
        if self._refused:  # its body is discarded: the connection is ready for the next
            self._refused = False
            self._after_refusal()
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        self._await_next()  # if it was answered before its body ended (a 413 by its length)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_next()

    def _await_next(self) -> None:
        """Once the latest request is answered and its body read (nothing pipelined behind
        it), the next head may start: until then its bytes are body, not head."""
        if self.transport.is_closing() or self.pipeline or self.cycle is None:
            return
        if self.cycle.response_complete and self._body_done:
            self._await_head(self.between)
