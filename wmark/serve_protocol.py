"""The HTTP/1.1 protocol `wmark serve` runs uvicorn with: h11, and a deadline for each request's line and headers.

uvicorn puts no deadline on a request's head: a client sending a header byte every few seconds holds a connection
for as long as it likes (slowloris), and a few hundred such clients exhaust a server. :func:`http_protocol` gives
uvicorn's h11 protocol a header deadline: a connection must deliver a request line and headers whole within
``header_timeout`` seconds of connecting or, on a kept-alive connection, of the next request's first byte (the
wait for that byte is bounded by uvicorn's own keep-alive timeout, which this leaves as it is). Past the deadline
the server answers HTTP 408 with ``{"error": ...}`` and closes the connection; no response has begun while a head
is incomplete, so h11 lets the server answer one there, as uvicorn answers a malformed request with 400. A body has
its own deadline (:mod:`wmark.serve_input`). Each connection closed at the deadline is logged (one warning on the
``wmark.serve`` logger naming the peer's address, never the head's bytes) and reported to the ``on_timeout`` hook
given to :func:`http_protocol` (a gate's ``wmark_header_timeouts_total`` counter).

h11 rather than httptools, uvicorn's pick when it is installed: h11 refuses a request head over 16 KB (HTTP 400)
where httptools buffers headers without limit, so a head is bounded in size as well as in time, and every install
parses requests the same way. h11 before 0.16 let malformed chunked bodies through (CVE-2025-43859, request
smuggling behind a proxy): pyproject asks for 0.16.

The subclass reads attributes of uvicorn's ``H11Protocol`` that uvicorn does not document (``conn``, ``loop``,
``transport``, ``server_state``, ``client``, the ``on_response_complete`` hook its request cycle calls): checked against
uvicorn 0.23.0, the lower bound in pyproject, and 0.55.0 (tests/test_serve_protocol.py passes on both). Check
again before raising the upper end of what is tested.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from wmark.errors import UsageError

HEADER_TIMEOUT_S = 10.0
"""Default seconds a client has to send a request line and headers: far beyond what any real client needs (a head
fits in one packet), short enough that a slow client holds a connection briefly."""


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol closing a connection whose request head is not whole within :attr:`header_timeout`.

    Build a subclass with the deadline wanted by :func:`http_protocol`; uvicorn makes one instance per connection.
    """

    header_timeout: float = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request's head, buffered while the previous one was answered, is parsed only now
        self._follow_head()

    def _follow_head(self) -> None:
        """Disarm the deadline once a head is whole; arm it when the first bytes of a later request's head arrive."""
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._disarm()
        elif self._header_deadline is None and self.conn.trailing_data[0]:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
            # worded as the body deadline's refusal (wmark.serve_input.read_json)
            message = (f"the request line and headers did not arrive within {self.header_timeout:g} seconds; "
                       "send them at once")
            body = json.dumps({"error": message}).encode()
            headers = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        self.transport.close()
        # the peer's address only: the head may hold a bearer token
        peer = "an unknown peer" if not self.client else ":".join(str(part) for part in self.client)
        logging.getLogger("wmark.serve").warning(
            "closed the connection from %s: its request line and headers did not arrive within %g seconds",
            peer, self.header_timeout)
        self.header_timed_out()

    def header_timed_out(self) -> None:
        """Called once for each connection closed at the header deadline; :func:`http_protocol` reports it."""


def header_deadline(header_timeout: float) -> float:
    """``header_timeout`` as float seconds, checked (a server refuses a bad one before it loads its model).

    Raises:
        UsageError: If ``header_timeout`` is not a positive number of seconds.
    """
    if isinstance(header_timeout, bool) or not isinstance(header_timeout, int | float) \
            or not 0 < header_timeout < math.inf:
        raise UsageError(f"The request header deadline must be a positive number of seconds, got {header_timeout!r}.")
    return float(header_timeout)


def http_protocol(header_timeout: float = HEADER_TIMEOUT_S,
                  on_timeout: Callable[[], None] | None = None) -> type[HeaderDeadlineProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: h11 with a ``header_timeout`` second header deadline.

    Args:
        header_timeout: Seconds a connection has to send a request line and headers.
        on_timeout: Called (on the event loop, so it must not block) once for each connection closed at the
            deadline, e.g. to count them; the log line is written either way.

    Raises:
        UsageError: If ``header_timeout`` is not a positive number of seconds.
    """
    seconds = header_deadline(header_timeout)

    class Protocol(HeaderDeadlineProtocol):
        header_timeout = seconds

        def header_timed_out(self) -> None:
            if on_timeout is not None:
                on_timeout()

    return Protocol
