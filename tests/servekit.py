"""Helpers for tests that serve over HTTP on 127.0.0.1: `wmark serve` in a subprocess, slow clients, ports."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import httpx


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago, for a client that must find no server there.

    Not for starting a server on: another process may take the port before the server binds it. A server of ours
    binds port 0 itself (``serve_in_background``, :func:`start_serve`) and says which port it got.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(*args: str, env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start ``wmark serve ARGS --port 0``; return the process, the ``http://127.0.0.1:PORT`` it announced and the
    line announcing it.

    The server binds a free port itself and announces it, so no other process can take the port first. Call
    :func:`wait_ready` before sending requests; terminate the process when done.

    Raises:
        AssertionError: If the process exits before announcing a URL.
    """
    proc = subprocess.Popen([sys.executable, "-c", "from wmark.cli import main; main()", "serve", *args, "--port", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    said = []
    while line := proc.stderr.readline().decode():
        found = re.match(r"serving .* on (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return proc, found[1], line
        said.append(line)  # a warning printed before the announcement
    proc.wait(timeout=10)
    raise AssertionError(f"wmark serve exited with {proc.returncode} before announcing its URL: {''.join(said)}")


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
