"""Helpers for tests that run `wmark serve` in a subprocess on 127.0.0.1."""

from __future__ import annotations

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
