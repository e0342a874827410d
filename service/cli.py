"""`simmim serve`: the HTTP service under uvicorn, in one process or several (service.processes),
with a real drain on SIGTERM.

Every option is also a SIMMIM_* environment variable (service.settings.Settings); a flag given on
the command line overrides the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import logging
import os
import socket
import sys
from typing import Literal, get_args, get_origin

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from simmim_core.model_dir import ModelDirError

from .app import checked_model_dir, create_app
from .backend import BackendFactory, parallelism
from .connections import Screen, protocol_class
from .engine import FAILED, Engine
from .errors import describe_validation
from .logs import configure_logging
from .processes import Peers, reuse_port_socket, serve_processes
from .settings import ENV_PREFIX, Settings
from .tracing import TracingError, check_environment

log = logging.getLogger("simmim.serve")
ENV_ONLY = ("api_key",)  # secrets stay out of the process list


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim serve",
        description="Serve a model directory over HTTP: POST /embed, /similarity, /reconstruct; "
        "GET /health/live, /health/ready, /info, /metrics, /docs. Each option can "
        "also be set by the environment variable named in its help; the flag wins.",
        epilog=f"{ENV_PREFIX}API_KEY (environment only): "
        f"{Settings.model_fields['api_key'].description}. On SIGTERM or SIGINT the "
        "server drains: readiness and new requests answer 503 while admitted requests "
        "finish, for up to --drain-timeout-s; then the connections still open are cut and it "
        "exits 0; a second signal stops it at once. If the model fails to load, or a batcher "
        "or model worker dies, the server exits with status 1. Tracing (OpenTelemetry, the "
        "tracing extra) is off unless the standard OTEL_* variables ask for it, e.g. "
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318.",
    )
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        default = field.get_default(call_default_factory=True)
        help_ = f"{field.description} [{ENV_PREFIX}{name.upper()}; default: {default}]"
        help_ = help_.replace("%", "%%")  # argparse formats help with %
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif get_origin(field.annotation) is Literal:
            p.add_argument(flag, choices=get_args(field.annotation), default=None, help=help_)
        else:
            p.add_argument(flag, metavar=name.split("_")[-1].upper(), default=None, help=help_)
    return p


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains before uvicorn's own shutdown and
    the whole shutdown keeps within drain_timeout_s (then the remaining connections are cut),
    that a failed engine (a model that fails to load, a batcher that died) stops the server
    (failed), and that one of several server processes stops when its parent is gone."""

    def __init__(
        self, config: uvicorn.Config, engine: Engine, drain_timeout_s: float, peers: Peers
    ):
        super().__init__(config)
        self.engine, self.drain_timeout_s, self.peers = engine, drain_timeout_s, peers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None
        self._drain_end: float | None = None  # loop time by which the server must be done
        self.failed = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.state == FAILED:
            log.error("%s (see above); stopping", self.engine.failure)
            self.failed = True
            return True
        if self.peers.orphaned():
            log.error("the parent process is gone; stopping")
            return True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame) -> None:
        """A signal handler: hand the drain over to the event loop, thread-safely."""
        if self._loop is None or self._draining:
            return super().handle_exit(sig, frame)  # before start-up, or a second signal
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_end = self._loop.time() + self.drain_timeout_s
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.engine.drain(self.drain_timeout_s)
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown within what is left of the drain time (at least a second for
        the requests still running to end); requests still in flight after the drain timeout
        have their connections cut first, so that they end as 499s at once."""
        if self._drain_end is not None and self.engine.inflight:
            log.warning(
                "cutting %d connections still open after the drain timeout",
                len(self.server_state.connections),
            )
            for connection in list(self.server_state.connections):
                connection.transport.close()
        left = (
            self.drain_timeout_s if self._drain_end is None else self._drain_end - self._loop.time()
        )
        self.config.timeout_graceful_shutdown = max(1.0, left)
        await super().shutdown(sockets)


def parse_settings(argv: list[str] | None) -> Settings:
    """Flags, over SIMMIM_* environment variables, over defaults. Raises ValidationError."""
    args = build_parser().parse_args(argv)
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once. Its mmap threshold grows
    to the largest block freed (up to 32 MB), so that decoded images, request bodies and their
    parsed strings freed by the decode threads stay in per-thread heaps: with 4 threads that
    kept about 0.3 GB per process after decoding 40-megapixel images here, one at a time.
    A fixed threshold of 4 MiB (M_MMAP_THRESHOLD, which also stops the growth) serves every
    block of 4 MiB or more from mmap: about 10 MB kept instead, for page faults that made the
    decoding of a 16-bit 40-megapixel PNG about a third slower. No-op where the C library is
    not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_server(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Serve `app` under uvicorn (on `sockets` if given, else on host:port) until it stops;
    0 after a clean stop, 1 if it never started or the model failed to load."""
    return_freed_memory()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(
            settings, Screen(app.state.engine, app.state.queues, app.state.shed_log)
        ),
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    engine: Engine = app.state.engine
    server = DrainingServer(config, engine, settings.drain_timeout_s, engine.peers)
    server.run(sockets)
    return 0 if server.started and not server.failed else 1


def serve_one_of_several(
    settings: Settings, peers: Peers, backend: BackendFactory | None = None
) -> None:
    """The body of each server process (see service.processes)."""
    os.setpgid(0, 0)  # signals come from the parent, which forwards them (one Ctrl-C)
    configure_logging(settings.log_json, settings.log_level)
    app = create_app(settings, backend, peers)
    sys.exit(run_server(app, settings, [reuse_port_socket(settings.host, settings.port)]))


def main(argv: list[str] | None = None, backend: BackendFactory | None = None) -> int:
    """`simmim serve`; returns the exit status. backend: what loads the model runtime
    (default: onnxruntime); with several processes it is sent to each, so it must pickle."""
    try:
        settings = parse_settings(argv)
    except ValidationError as e:
        print(f"simmim serve: invalid settings: {describe_validation(e)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_json, settings.log_level)
    processes, _, _ = parallelism(
        settings.provider, settings.processes, settings.workers, settings.threads
    )
    try:
        if processes > 1:
            checked_model_dir(settings.model_dir)
            check_environment()
        else:
            app = create_app(settings, backend)
    except (ModelDirError, TracingError) as e:
        print(f"simmim serve: {e}", file=sys.stderr)
        return 2
    if processes > 1:
        child = functools.partial(serve_one_of_several, backend=backend)
        return serve_processes(settings, processes, child)
    return run_server(app, settings)
