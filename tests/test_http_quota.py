"""A server that enforces a request quota with bare 429s (no Retry-After): the client slows down to fit it."""

from __future__ import annotations

import threading
import time

import pytest
from httpkit import faulty_v2_app, memorising_model

from wmark.keys import generate_key
from wmark.schemes.trigger_set import generate_triggers
from wmark.serve import serve_in_background
from wmark.suspects.http import HttpOptions, open_http_suspect
from wmark.suspects.pacing import MAX_SLOWED, MIN_SLOWED, RateLimiter

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def key():
    return generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=40)


class Quota:
    """A token bucket: ``burst`` requests at once, then ``per_second``; the rest get a bare 429."""

    def __init__(self, *, burst: float, per_second: float) -> None:
        self.tokens = burst
        self.burst = burst
        self.per_second = per_second
        self.last = time.monotonic()
        self.refused = 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> int | None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_second)
            self.last = now
            if self.tokens < 1.0:
                self.refused += 1
                return 429
            self.tokens -= 1.0
            return None


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_quota_enforced_with_bare_429s_slows_the_client_instead_of_failing_queries(key, concurrency):
    quota = Quota(burst=3, per_second=20.0)
    app, _ = faulty_v2_app(memorising_model(key), name="m", shape=SHAPE, behaviour=quota)
    with serve_in_background(app) as server:
        suspect = open_http_suspect(url=server.url, protocol="v2", model_name="m", num_classes=10, input_shape=SHAPE,
                                    options=HttpOptions(backoff=0.01, retries=2, concurrency=concurrency), seed=0)
        try:
            outcomes = [outcome for _, outcome in suspect.stream(generate_triggers(key).inputs.numpy()[:30])]
        finally:
            suspect.close()
    assert quota.refused > 0  # the client did run into the quota
    assert [o.error for o in outcomes if not o.ok] == []
    assert suspect._limiter.interval <= MAX_SLOWED


def test_throttling_doubles_the_spacing_once_per_round_within_bounds_and_recovers_slowly():
    limiter = RateLimiter(None)
    slots = [limiter.wait() for _ in range(3)]  # three requests in flight, all refused
    for slot in slots:
        limiter.throttled(slot)
    assert limiter.interval == MIN_SLOWED
    for _ in range(20):
        limiter.throttled(time.monotonic())
    assert limiter.interval == MAX_SLOWED
    limiter.answered()
    assert limiter.interval == pytest.approx(0.95 * MAX_SLOWED)
    for _ in range(200):
        limiter.answered()
    assert limiter.interval == 0.0
    paced = RateLimiter(10.0)
    paced.throttled(paced.wait())
    for _ in range(100):
        paced.answered()
    assert paced.interval == pytest.approx(0.1)
