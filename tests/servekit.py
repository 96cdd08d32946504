"""Helpers for tests that run `wmark serve` in a subprocess on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def wait_ready(proc: subprocess.Popen, url: str, *, timeout: float = 90.0) -> None:
    """Wait until a `wmark serve` process at ``url`` answers its readiness route; fail if it dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    raise AssertionError(f"{url} was not ready within {timeout:.0f} s")


def trickle(host: str, port: int, head: bytes, *, every: float = 0.1, limit: float = 30.0) -> bytes:
    """Send a request's ``head`` (request line and headers), then its body one byte every ``every`` seconds until
    the server answers; return all it sent before closing the connection (a slowloris client).

    Raises:
        AssertionError: If the server neither answers nor closes the connection within ``limit`` seconds.
    """
    got = b""
    deadline = time.monotonic() + limit
    with socket.create_connection((host, port), timeout=limit) as conn:
        conn.sendall(head)
        conn.settimeout(every)
        while time.monotonic() < deadline:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                if not got:
                    conn.sendall(b" ")
                continue
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
    raise AssertionError(f"the server neither answered nor closed the connection within {limit:.0f} s: {got!r}")
