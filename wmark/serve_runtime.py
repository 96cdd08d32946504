"""Running an ASGI app with uvicorn: in a background thread (tests, benchmarks, notebooks), or in the foreground on a
socket bound once (``wmark serve``), with the header deadline of :mod:`wmark.serve_protocol` either way."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from wmark.errors import UsageError
from wmark.serve_protocol import HEADER_TIMEOUT_S, http_protocol


class BackgroundServer:
    """Runs an ASGI app with uvicorn in a daemon thread (for tests, benchmarks and notebooks).

    ``port=0`` picks a free port; read it from :attr:`url` after :meth:`start` (or use :func:`serve_in_background`).

    Args:
        app: The ASGI application.
        host: Interface to bind (default loopback only).
        port: Port (0: any free one).
        header_timeout: Seconds a connection has to send a request line and headers (:mod:`wmark.serve_protocol`).
        on_header_timeout: Called once for each connection closed at that deadline, e.g. the
            :meth:`~wmark.monitor.gate.Gate.header_timed_out` of the app's gate.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, header_timeout: float = HEADER_TIMEOUT_S,
                 on_header_timeout: Callable[[], None] | None = None) -> None:
        self.config = uvicorn.Config(app, host=host, port=port, log_level="error", access_log=False,
                                     lifespan="off", timeout_keep_alive=30,
                                     http=http_protocol(header_timeout, on_header_timeout))
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True, name="wmark-uvicorn")
        self.host = host
        self.port = port

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive() or waited > timeout:
                raise RuntimeError("the server thread did not start")
            threading.Event().wait(0.01)
            waited += 0.01
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)



@contextlib.contextmanager
def serve_in_background(app: Any, *, host: str = "127.0.0.1", port: int = 0, header_timeout: float = HEADER_TIMEOUT_S,
                        on_header_timeout: Callable[[], None] | None = None) -> Iterator[BackgroundServer]:
    """Run ``app`` on ``host:port`` (0: a free port) for the duration of a ``with`` block (see
    :class:`BackgroundServer`)."""
    server = BackgroundServer(app, host=host, port=port, header_timeout=header_timeout,
                              on_header_timeout=on_header_timeout).start()
    try:
        yield server
    finally:
        server.stop()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port the system picks) for uvicorn to listen on: bound once, not
    probed and bound again, so no other process can take the port in between and the port announced is the one
    served. uvicorn reports a busy port by logging and calling sys.exit; this says it in one sentence instead.

    Raises:
        UsageError: If the address cannot be bound (a busy port, an address not on this machine).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pick another port.") from None
    return sock


def run_until_terminated(server: uvicorn.Server, listener: socket.socket) -> None:
    """Run uvicorn on ``listener``; on SIGTERM, exit through ``finally`` blocks (uvicorn re-raises the signal after its
    graceful shutdown, and the default handler would kill the process before logs and state are saved)."""
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[listener])
        return

    def stop(_sig: int, _frame: Any) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGTERM, previous)
