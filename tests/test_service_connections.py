"""The screen's fast path (connections.LimitedProtocol._refused_whole), in process: a refused
request that arrives whole is answered without the HTTP parser; any other shape goes through
the parser, every byte of it. A connection refused again within refusal_interval_ms gets its
answer once the interval has passed. Black-box behaviour under overload is in
test_service_reliability.py."""

from __future__ import annotations

import asyncio

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.connections import protocol_class
from service.settings import Settings

REFUSAL = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n"
BODY = b'{"images": ["aGk="]}'


def post(path: str = "/embed", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (
        f"POST {path} {version}\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n{extra}\r\n"
    ).encode() + BODY


class Transport:
    """What the protocol uses of an asyncio.Transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Fed:
    """The protocol's HTTP parser, recording what it is fed."""

    def __init__(self, parser) -> None:
        self.parser, self.fed = parser, b""

    def feed_data(self, data: bytes) -> None:
        self.fed += data
        self.parser.feed_data(data)

    def __getattr__(self, name: str):
        return getattr(self.parser, name)


async def app(scope, receive, send) -> None:
    """An ASGI app for requests the screen lets through (never reached here: see teardown)."""


class RefuseEmbed:
    """A screen (connections.Screen's interface) refusing every request to /embed."""

    def __call__(self, path: str, headers: list) -> bytes | None:
        return REFUSAL if path == "/embed" else None


@pytest.fixture
def connection():
    """(protocol, transport, parser) of one connection whose screen refuses every /embed."""
    loop = asyncio.new_event_loop()

    cls = protocol_class(Settings(), RefuseEmbed())
    config = Config(app=app, http=cls)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = Transport()
    protocol.connection_made(transport)
    protocol.parser = Fed(protocol.parser)
    yield protocol, transport, protocol.parser
    protocol.connection_lost(None)
    tasks = asyncio.all_tasks(loop)  # the app's, for a request the parser passed on
    for task in tasks:
        task.cancel()
        loop.run_until_complete(asyncio.wait([task]))
    loop.close()


def test_a_whole_refused_request_is_answered_without_the_parser(connection):
    protocol, transport, parser = connection
    protocol.data_received(post())
    assert transport.written == [REFUSAL] and not transport.closed
    assert parser.fed == b""


def test_the_connection_then_waits_for_the_next_request_under_the_head_timeout(connection):
    protocol, transport, _ = connection
    protocol.data_received(post())
    assert transport.written == [REFUSAL]
    assert protocol._head_timer is not None and protocol.timeout_keep_alive_task is not None


def elapse(protocol, seconds: float) -> None:
    """Run the protocol's event loop for `seconds`."""
    protocol.loop.run_until_complete(asyncio.sleep(seconds))


def test_a_refusal_within_the_interval_is_answered_once_it_has_passed(connection):
    protocol, transport, _ = connection
    protocol.data_received(post())
    protocol.data_received(post())
    assert transport.written == [REFUSAL] and not transport.reading
    elapse(protocol, protocol.refusal_interval_s * 1.5)
    assert transport.written == [REFUSAL, REFUSAL] and transport.reading


def test_a_refusal_after_the_interval_is_answered_at_once(connection):
    protocol, transport, _ = connection
    protocol.data_received(post())
    elapse(protocol, protocol.refusal_interval_s * 1.5)
    protocol.data_received(post())
    assert transport.written == [REFUSAL, REFUSAL] and transport.reading


def test_held_refusals_keep_the_order_of_pipelined_requests(connection):
    protocol, transport, _ = connection
    protocol.data_received(post())
    protocol.data_received(post() + post())  # through the parser: the first is held
    assert transport.written == [REFUSAL, REFUSAL]  # the second's head sent the first's out
    elapse(protocol, protocol.refusal_interval_s * 1.5)
    assert transport.written == [REFUSAL] * 3 and transport.reading


def test_a_held_refusal_is_dropped_with_its_connection(connection):
    protocol, transport, _ = connection
    protocol.data_received(post())
    protocol.data_received(post())
    protocol.connection_lost(None)
    elapse(protocol, protocol.refusal_interval_s * 1.5)
    assert transport.written == [REFUSAL]


@pytest.mark.parametrize(
    "data",
    [
        post() + post(),  # pipelined
        post()[:-1],  # the body incomplete
        post(version="HTTP/1.0"),
        post(extra="Connection: close\r\n"),
        post(extra="Transfer-Encoding: chunked\r\n"),
        post(extra=f"Content-Length: {len(BODY)}\r\n"),  # the length twice
        post(extra="X-Folded: a\r\n b\r\n"),  # an obsolete folded header
        post(extra="X-Spaced : a\r\n"),  # a space before the colon
        post(extra="X-Bare: a\nX-Other: b\r\n"),  # a bare line feed
        post(extra="X-Bare: a\rb\r\n"),  # a bare carriage return
        post(path="/health/live"),  # a path the screen does not refuse
    ],
    ids=[
        "pipelined",
        "partial",
        "http-1.0",
        "connection-close",
        "chunked",
        "length-twice",
        "folded",
        "spaced",
        "bare-lf",
        "bare-cr",
        "not-refused",
    ],
)
def test_any_other_shape_goes_through_the_parser_whole(connection, data):
    protocol, _, parser = connection
    protocol.data_received(data)
    assert parser.fed == data
