"""The header deadline of `wmark serve`'s HTTP protocol, against a real uvicorn server on 127.0.0.1 and raw sockets."""

from __future__ import annotations

import json
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from wmark.errors import UsageError
from wmark.serve import BackgroundServer
from wmark.serve_protocol import http_protocol

GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: raw\r\n\r\n"


async def _hello(_: object) -> PlainTextResponse:
    return PlainTextResponse("hello")


def _server(header_timeout: float, keep_alive: int = 30) -> BackgroundServer:
    server = BackgroundServer(Starlette(routes=[Route("/", _hello)]), header_timeout=header_timeout)
    server.config.timeout_keep_alive = keep_alive  # read by each connection as it is made
    return server.start()


def _answer(conn: socket.socket) -> bytes:
    """One whole response of the hello app (its body ends it), or what came before the server closed."""
    got = b""
    while not got.endswith(b"hello"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _closed_after(conn: socket.socket, start: float) -> tuple[float, bytes]:
    """Seconds from ``start`` until the server closes ``conn``, and what it sent before."""
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    return time.monotonic() - start, got


@pytest.mark.parametrize("kept_alive", [False, True])
def test_a_head_trickled_past_its_deadline_gets_408_and_the_connection_closed(kept_alive):
    """uvicorn put no deadline on a request's head: a client sending a header byte every few seconds held its
    connection for as long as it liked, on a fresh connection or between kept-alive requests."""
    server = _server(header_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            if kept_alive:
                conn.sendall(GET)
                assert _answer(conn).startswith(b"HTTP/1.1 200 ")
            start = time.monotonic()
            conn.settimeout(0.2)
            got = b""
            for byte in GET:  # one byte every 0.2 s: the head would take 10 s
                try:
                    conn.sendall(bytes([byte]))
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                got += chunk
                if not chunk:
                    break
            elapsed = time.monotonic() - start
    finally:
        server.stop()
    assert 0.9 < elapsed < 1.5, elapsed
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(body) == {"error": "the request line and headers did not arrive within 1 seconds; send them at "
                                         "once"}


def test_a_prompt_request_and_a_kept_alive_one_after_the_deadline_are_answered():
    """The deadline counts from connecting only to the first head: a kept-alive connection idle longer than the
    deadline between two requests (but within the keep-alive timeout) still gets its second request answered,
    and a head sent in pieces within the deadline is answered too."""
    server = _server(header_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(GET)
            assert _answer(conn).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.8)
            for piece in (GET[:10], GET[10:30], GET[30:]):
                conn.sendall(piece)
                time.sleep(0.1)
            assert _answer(conn).startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()


def test_a_pipelined_head_left_incomplete_gets_408_from_the_end_of_the_answer_before_it():
    """A second request's head sent with the first is parsed only once the first is answered; the deadline holds
    for it from then, and the first is answered as usual."""
    server = _server(header_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(GET + GET[:20])
            elapsed, got = _closed_after(conn, time.monotonic())
    finally:
        server.stop()
    first, _, second = got.partition(b"hello")
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 1.0, elapsed


def test_an_idle_kept_alive_connection_follows_uvicorns_keep_alive_timeout_not_the_header_deadline():
    server = _server(header_timeout=0.5, keep_alive=2)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(GET)
            assert _answer(conn).startswith(b"HTTP/1.1 200 ")
            elapsed, got = _closed_after(conn, time.monotonic())
    finally:
        server.stop()
    assert 1.8 < elapsed < 3.0 and got == b"", (elapsed, got)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "10"])
def test_a_header_deadline_that_is_not_a_positive_number_of_seconds_is_refused(bad):
    with pytest.raises(UsageError, match="header deadline must be a positive number of seconds"):
        http_protocol(bad)
