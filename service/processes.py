"""Several server processes on one port: each runs the whole app (event loop, batcher, its own
copy of the model) on a socket of its own bound with SO_REUSEPORT, so that the kernel spreads
new connections over them (by a hash of the client's address and port). A socket shared by every
process would not: the first to wake up accepts a whole burst of connections, and keep-alive
clients then stay with it.

The parent reserves the port (refusing to start if something listens there already: with
SO_REUSEPORT alone, a second server on a busy port would bind and take half its connections),
starts the processes, forwards SIGTERM/SIGINT to them (each
drains), and stops them all as soon as one exits by itself (a model that fails to load, a
crash): the orchestrator, not this process, restarts a broken server. Readiness is shared:
/health/ready answers 200 only once every process is ready. Prometheus metrics are added up
over the processes (prometheus_client's multiprocess mode, in a temporary directory).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, MutableSequence

from .settings import Settings

log = logging.getLogger("simmim.processes")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client at import


class Peers:
    """This process's place among the server's processes, and which of them are ready.

    flags: one byte per process (shared memory across processes), 1 while that one is ready;
    parent_pid: the supervising process (None when this process is the whole server)."""

    def __init__(
        self,
        index: int = 0,
        flags: MutableSequence[int] | None = None,
        parent_pid: int | None = None,
    ):
        self.index, self.parent_pid = index, parent_pid
        self.flags = flags if flags is not None else [0]

    @property
    def count(self) -> int:
        return len(self.flags)

    def set_ready(self, ready: bool) -> None:
        self.flags[self.index] = int(ready)

    def ready_count(self) -> int:
        return sum(self.flags)

    def describe(self) -> str:
        """' (process 2 of 3)' for logs; empty when this process is the whole server."""
        return f" (process {self.index + 1} of {self.count})" if self.count > 1 else ""

    def orphaned(self) -> bool:
        """True once the supervising process is gone (killed without forwarding a signal)."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (not listening yet)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def check_port_free(host: str, port: int) -> None:
    """OSError if a socket listens on host:port (a server of any kind, another `simmim serve`
    included): bound without SO_REUSEPORT, the probe conflicts with every listener, while
    SO_REUSEADDR lets it ignore connections of a previous server still closing (TIME_WAIT).
    Two servers started at the same instant can still both pass, before either listens."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def serve_processes(
    settings: Settings, count: int, child: Callable[[Settings, Peers], None]
) -> int:
    """Reserve the port and run child(settings, peers) in `count` spawned processes until they
    exit; each binds its own socket to settings.port. Returns 0 if every process exited with 0
    after a signal, else 1 (also if the port cannot be bound)."""
    context = multiprocessing.get_context("spawn")
    try:  # bound but never listening: takes no connections, keeps the port (if 0) ours
        check_port_free(settings.host, settings.port)
        reserved = reuse_port_socket(settings.host, settings.port)
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, e)
        return 1
    settings = settings.model_copy(update={"port": reserved.getsockname()[1]})
    metrics_dir = tempfile.mkdtemp(prefix="simmim-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir  # inherited by the processes
    flags = context.RawArray("b", count)
    processes = [
        context.Process(
            target=child, name=f"simmim-serve-{i}", args=(settings, Peers(i, flags, os.getpid()))
        )
        for i in range(count)
    ]
    stopping = False

    def signal_all(sig: int) -> None:
        for p in processes:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, sig)

    def forward(sig: int, frame) -> None:
        nonlocal stopping
        stopping = True
        signal_all(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for p in processes:
            p.start()
        if stopping:  # a signal came while they started
            signal_all(signal.SIGTERM)
        log.info(
            "listening on http://%s:%d with %d server processes: %s",
            settings.host,
            settings.port,
            count,
            [p.pid for p in processes],
        )
        running = list(processes)
        while running:
            multiprocessing.connection.wait([p.sentinel for p in running])
            for p in [p for p in running if p.exitcode is not None]:
                running.remove(p)
                if p.exitcode != 0 or not stopping:
                    status = 1
                if not stopping:
                    log.error(
                        "server process %s exited with status %s; stopping the others",
                        p.pid,
                        p.exitcode,
                    )
                    stopping = True
                    signal_all(signal.SIGTERM)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
