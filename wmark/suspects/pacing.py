"""How fast a suspect is asked, and how long to wait when it asks for a pause (``Retry-After``)."""

from __future__ import annotations

import datetime
import email.utils
import math
import threading
import time

# Bounds of the spacing a throttling server (HTTP 429) imposes, and how fast it recovers per answer.
MIN_SLOWED = 0.05
MAX_SLOWED = 60.0
RECOVERY = 0.95


class RateLimiter:
    """Spaces requests at least ``1/rate`` seconds apart across threads, and further apart while the server throttles.

    A 429 without ``Retry-After`` says only "too fast": backoff alone retries a query a few times within seconds,
    so a per-minute quota would turn its whole budget into failed queries. Each 429 therefore doubles the spacing
    (from at least :data:`MIN_SLOWED` to at most :data:`MAX_SLOWED` seconds), once per round of requests in flight
    (those sent before the last doubling were sent too fast already and say nothing new), and each request
    answered without an HTTP error shrinks it by the factor :data:`RECOVERY` back toward the ``1/rate`` spacing
    (or none), so the pace hovers just under the quota.

    Args:
        rate: Most requests per second (``None``: unlimited until the server throttles).
    """

    def __init__(self, rate: float | None) -> None:
        self.base = 0.0 if rate is None else 1.0 / rate
        self.interval = self.base
        self._next = time.monotonic()
        self._slowed_at = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Block until the next request may go; return its slot (a :func:`time.monotonic` instant)."""
        with self._lock:
            now = time.monotonic()
            if self.interval == 0.0:
                return now
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)
        return slot

    def throttled(self, slot: float) -> None:
        """A request sent at ``slot`` got HTTP 429: double the spacing, unless it already grew since it was sent."""
        with self._lock:
            if slot < self._slowed_at:
                return
            self.interval = min(MAX_SLOWED, max(MIN_SLOWED, 2.0 * self.interval))
            self._slowed_at = time.monotonic()
            self._next = max(self._next, self._slowed_at + self.interval)

    def answered(self) -> None:
        """A request was answered without an HTTP error: shrink the spacing a little, never below ``1/rate``."""
        with self._lock:
            if self.interval > self.base:
                shrunk = self.interval * RECOVERY
                self.interval = self.base if shrunk < max(self.base, MIN_SLOWED) else shrunk


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        # An HTTP date is always GMT; the asctime form and "-0000" parse without a zone, which .timestamp() would
        # read as local time (hours off the server's meaning anywhere but UTC).
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
