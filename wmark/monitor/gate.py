"""The request-path side of the policy and the monitor: admit or refuse, shape the answer, watch, count.

:class:`Gate` is what :func:`wmark.serve.build_app` consults on each inference request: :meth:`Gate.precheck`
before any work on its inputs (a text endpoint's tokenizer), :meth:`Gate.admit` before the model runs (quotas,
rate limit, a block after an alarm), :meth:`Gate.answer_mode` for the shape
of the answer, and :meth:`Gate.after_answer` with the served probabilities (the extraction monitor, alarm
actions, the alarm log). Counters and gauges go to a private Prometheus registry that ``GET /metrics``
renders. Only client *names* ever reach metrics, logs and the state file, never their tokens.

Example:
    >>> from wmark.monitor.policy import parse_policy
    >>> gate = Gate(policy=parse_policy({"default": {"quota": {"total": 2}}}, clients=["a"]), clients=["a"])
    >>> gate.admit("a", 2) is None, gate.admit("a", 1).status
    (True, 403)
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.io import atomic_write
from wmark.monitor.monitor import Alarm, ExtractionMonitor
from wmark.monitor.policy import ClientPolicy, Policy, RateLimit, TokenBucket
from wmark.monitor.signals import SIGNALS

STATE_FORMAT = "wmark-monitor-state/1"
MAX_RETRY_AFTER = 86_400  # seconds
_SAVE_EVERY_S = 5.0


@dataclass(frozen=True)
class Refusal:
    """A refused request: HTTP status, a machine-readable reason, a sentence, and seconds to wait (or None)."""

    status: int
    reason: str
    message: str
    retry_after: float | None = None

    def headers(self) -> dict[str, str]:
        # a rate near zero makes the wait infinite, which no header can carry: a day is as good as never
        wait = None if self.retry_after is None else min(self.retry_after, MAX_RETRY_AFTER)
        return {} if wait is None else {"Retry-After": str(max(1, math.ceil(wait)))}


@dataclass
class _Client:
    rules: ClientPolicy
    bucket: TokenBucket | None
    day: int = -1
    today: int = 0
    total: int = 0
    requests: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    alarm: dict[str, Any] | None = None
    series: tuple[Any, ...] | None = None  # this client's metric children, looked up once


def _utc_day(now: float) -> int:
    return int(now // 86_400)


class Gate:
    """Per-client admission, answer shaping and monitoring for one server.

    Args:
        policy: The policy (``None``: every client gets full scores, no limits, alarms only logged).
        clients: Client names the server knows.
        monitor: The extraction monitor (``None``: no monitoring, policy only).
        alarm_log: File that gets one JSON line per alarm (appended).
        state_path: JSON file keeping quota counts and alarm states across restarts.
        labels_only: Cap every client at the top-1 label.
        metrics_token: Bearer token ``GET /metrics`` requires (``None``: open).
        clock: Seconds since the epoch (tests pass a fake one).

    Raises:
        UsageError: If ``prometheus-client`` is missing or the state file is unreadable.
    """

    def __init__(self, *, policy: Policy | None, clients: Iterable[str], monitor: ExtractionMonitor | None = None,
                 alarm_log: str | os.PathLike[str] | None = None, state_path: str | os.PathLike[str] | None = None,
                 labels_only: bool = False, metrics_token: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise UsageError("Serving with a policy or monitor needs prometheus-client; "
                             "`pip install 'wmark[monitor]'`.") from None
        self.policy = policy or Policy()
        self.monitor = monitor
        self.alarm_log = None if alarm_log is None else Path(alarm_log)
        self.created_alarm_log = False
        self.state_path = None if state_path is None else Path(state_path)
        self.labels_only = labels_only
        self.metrics_token = metrics_token
        self.clock = clock
        self.lock = threading.Lock()
        now = clock()
        self.clients: dict[str, _Client] = {}
        for name in clients:
            rules = self.policy.for_client(name)
            self.clients[name] = _Client(rules, None if rules.rate is None else TokenBucket(rules.rate, now=now))
        self.last_save = now
        self.exported: dict[str, int] = {}
        self.absent: dict[str, Any] = {}  # state records of clients this server has no token for, kept as they are
        self.registry = prom.CollectorRegistry(auto_describe=True)
        # Counted at admission, like the quotas: a request the model then fails on is counted too.
        self.m_queries = prom.Counter("wmark_queries", "Inputs admitted to the model, per client.", ["client"],
                                      registry=self.registry)
        self.m_requests = prom.Counter("wmark_requests", "Inference requests admitted to the model, per client.",
                                       ["client"], registry=self.registry)
        self.m_refusals = prom.Counter("wmark_refusals", "Inference requests refused, per client and reason.",
                                       ["client", "reason"], registry=self.registry)
        self.m_alarm = prom.Gauge("wmark_monitor_alarm", "1 once the extraction monitor raised an alarm.",
                                  ["client"], registry=self.registry)
        self.m_score = prom.Gauge("wmark_monitor_score", "Latest combined extraction score (alarm above "
                                  "wmark_monitor_threshold).", ["client"], registry=self.registry)
        self.m_signal = prom.Gauge("wmark_monitor_signal", "Latest value of each extraction signal.",
                                   ["client", "signal"], registry=self.registry)
        self.m_threshold = prom.Gauge("wmark_monitor_threshold", "Calibrated alarm threshold of the score.",
                                      registry=self.registry)
        self.m_today = prom.Gauge("wmark_quota_used_today", "Queries counted against today's quota.", ["client"],
                                  registry=self.registry)
        self.m_total = prom.Gauge("wmark_quota_used_total", "Queries counted against the total quota.", ["client"],
                                  registry=self.registry)
        # no client label: the head that would name the client is what did not arrive
        self.m_header_timeouts = prom.Counter(
            "wmark_header_timeouts", "Connections closed because their request line and headers did not arrive "
            "within the header deadline.", registry=self.registry)
        if monitor is not None:
            self.m_threshold.set(monitor.threshold)
        for name in self.clients:
            self.m_queries.labels(name)
            self.m_alarm.labels(name).set(0)
        if self.state_path is not None and self.state_path.exists():
            self._load_state(now)
        if self.alarm_log is not None:
            # created once nothing else can refuse, so that `wmark monitor report` on a quiet server reports none
            try:
                with self.alarm_log.open("x"):
                    self.created_alarm_log = True
            except FileExistsError:
                pass
            except OSError as e:
                raise UsageError(f"Cannot create the alarm log {self.alarm_log} ({e.strerror}); "
                                 "choose a writable path.") from None

    def _load_state(self, now: float) -> None:
        assert self.state_path is not None
        doc = None
        try:
            doc = json.loads(self.state_path.read_text())
            saved = doc["clients"] if doc.get("format") == STATE_FORMAT else None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            saved = None
        if not isinstance(saved, dict):
            found = doc.get("format") if isinstance(doc, dict) else None
            if isinstance(found, str) and found.startswith("wmark-monitor-state/"):
                raise UsageError(f"Monitor state file {self.state_path} is in format {found}, which this wmark does "
                                 f"not read ({STATE_FORMAT}); move it away or serve with the wmark that wrote it.")
            raise UsageError(f"Monitor state file {self.state_path} is not a wmark state file; move it away.")
        for name, rec in saved.items():
            c = self.clients.get(name)
            if c is None:
                self.absent[name] = rec
                continue
            if not isinstance(rec, dict):
                continue
            refusals = rec.get("refusals", {})
            counts = [rec.get("queries_total", 0), rec.get("day", -1), rec.get("queries_today", 0),
                      rec.get("requests", 0), *(refusals.values() if isinstance(refusals, dict) else [None])]
            alarm = rec.get("alarm")
            # Checked before any is applied: a hand-edited count ("x", null, 1e400) or alarm crashed int()/dict().
            if (not all(isinstance(v, int) and not isinstance(v, bool) and v >= -1 for v in counts)
                    or min(counts[0], *counts[2:]) < 0 or not (alarm is None or isinstance(alarm, dict))):
                raise UsageError(f"Monitor state file {self.state_path} has an invalid record for client {name!r} "
                                 "(counts must be integers of at least 0, an alarm an object); fix it or move the "
                                 "file away.")
            c.total, c.day, c.today, c.requests = counts[:4]
            c.refusals = dict(refusals)
            if alarm:
                self._apply_alarm(name, c, dict(alarm), now)

    def _apply_alarm(self, name: str, c: _Client, alarm: dict[str, Any], now: float) -> None:
        action = c.rules.on_alarm
        alarm["action"] = action.action
        c.alarm = alarm
        if action.action == "throttle" and action.rate is not None:
            if c.bucket is None:
                c.bucket = TokenBucket(action.rate, now=now)
            c.bucket.reset_rate(action.rate, now=now)
        self.m_alarm.labels(name).set(1)

    def _refuse(self, name: str, c: _Client, refusal: Refusal) -> Refusal:
        c.refusals[refusal.reason] = c.refusals.get(refusal.reason, 0) + 1
        self.m_refusals.labels(name, refusal.reason).inc()
        return refusal

    def admit(self, client: str, n: int) -> Refusal | None:
        """Count ``n`` queries for ``client`` and return ``None``, or count nothing and return a refusal.

        Call it once the request's input is known to be valid, right before the model runs: what it counts is an
        attempt, kept whether the model then answers or fails, so that failing requests are no free queries for an
        extractor and concurrent requests can never overrun a quota between admission and answer.
        """
        now = self.clock()
        with self.lock:
            c = self._client(client, now)
            refusal = self._refusal(c, n, now, take=True)
            if refusal is not None:
                return self._refuse(client, c, refusal)
            day = _utc_day(now)
            c.day, c.today, c.total = day, (c.today if c.day == day else 0) + n, c.total + n
            c.requests += 1
            if c.series is None:
                c.series = (self.m_queries.labels(client), self.m_requests.labels(client),
                            self.m_today.labels(client), self.m_total.labels(client))
            queries, requests, used_today, used_total = c.series
            queries.inc(n)
            requests.inc()
            used_today.set(c.today)
            used_total.set(c.total)
            return None

    def precheck(self, client: str, n: int) -> Refusal | None:
        """The refusal :meth:`admit` would give a request of ``n`` queries now (counted as one), else ``None``,
        counting no query and taking no rate-limit token.

        Call it before any work on the request's inputs that the admission does not need (a text endpoint's
        tokenizer): a blocked or exhausted client then costs none of it. ``None`` does not admit: :meth:`admit`
        decides, once the inputs are known to be valid.
        """
        now = self.clock()
        with self.lock:
            c = self._client(client, now)
            refusal = self._refusal(c, n, now, take=False)
            return None if refusal is None else self._refuse(client, c, refusal)

    def _client(self, client: str, now: float) -> _Client:
        c = self.clients.get(client)
        if c is None:
            rules = self.policy.default
            c = self.clients[client] = _Client(rules, None if rules.rate is None else TokenBucket(rules.rate, now=now))
        return c

    def _refusal(self, c: _Client, n: int, now: float, *, take: bool) -> Refusal | None:
        """Why ``c`` may not send ``n`` queries now, or ``None``; with ``take``, the rate limit's tokens are taken."""
        if c.alarm is not None and c.alarm["action"] == "block":
            return Refusal(403, "blocked", "this client is blocked after an extraction alarm; contact the API owner")
        quota = c.rules.quota
        if quota.per_day is not None and n > quota.per_day:
            return Refusal(413, "batch", f"send at most {quota.per_day} inputs per request (the daily quota)")
        if quota.total is not None and c.total + n > quota.total:
            return Refusal(403, "total-quota", f"this request of {n} queries would exceed the total quota of "
                           f"{quota.total} ({quota.total - c.total} left)")
        day = _utc_day(now)
        today = c.today if c.day == day else 0
        if quota.per_day is not None and today + n > quota.per_day:
            return Refusal(429, "daily-quota", f"this request of {n} queries would exceed the daily quota of "
                           f"{quota.per_day} ({quota.per_day - today} left today, UTC)", (day + 1) * 86_400 - now)
        if c.bucket is not None:
            rate: RateLimit = c.bucket.rate
            if n > rate.burst:
                return Refusal(413, "batch", f"send at most {rate.burst} inputs per request (the rate limit's burst)")
            wait = c.bucket.take(n, now=now) if take else c.bucket.wait(n, now=now)
            if wait > 0:
                return Refusal(429, "rate", f"rate limit of {rate.queries_per_second:g} queries/s exceeded; retry "
                               "later", wait)
        return None

    def answer_mode(self, client: str) -> tuple[str, int]:
        """``(mode, k)``: ``"scores"``, ``"top-k"`` or ``"label"`` for this client now."""
        with self.lock:
            c = self.clients.get(client)
            rules = c.rules if c is not None else self.policy.default
            alarmed = c is not None and c.alarm is not None and c.alarm["action"] == "label-only"
        if self.labels_only or alarmed:
            return "label", 1
        return rules.answer, rules.top_k

    def marked(self, client: str) -> bool:
        """Whether the served API-side mark answers ``client`` now: always, or after its alarm (policy ``mark``)."""
        with self.lock:
            c = self.clients.get(client)
            rules = c.rules if c is not None else self.policy.default
            return rules.mark == "always" or (c is not None and c.alarm is not None)

    def after_answer(self, client: str, x: np.ndarray, probs: np.ndarray,
                     keys: list[bytes] | None = None) -> Alarm | None:
        """Feed the monitor with an answered request; apply and log a newly raised alarm.

        ``keys`` are the inputs' exact keys (:func:`~wmark.monitor.text_features.text_keys` of a text request),
        which a text profile's monitor needs: its feature vectors do not tell the same text from a reordering.
        """
        alarm = None
        if self.monitor is not None:
            alarm = self.monitor.observe(client, x, probs, keys)
            latest = None
            if self.monitor.checked.get(client) != self.exported.get(client):
                latest = self.monitor.latest(client)
            if latest is not None:
                # Gauges change only at a check (every few dozen queries), so only then set them.
                self.exported[client] = latest[0]
                self.m_score.labels(client).set(latest[2])
                for s in SIGNALS:
                    self.m_signal.labels(client, s).set(latest[1][s])
        now = self.clock()
        with self.lock:
            if alarm is not None and self.clients[client].alarm is not None:
                alarm = None  # latched before a restart (the state file): the monitor's own latch is in memory only
            if alarm is not None:
                c = self.clients[client]
                record = alarm.to_dict()
                self._apply_alarm(client, c, record, now)
                if self.alarm_log is not None:
                    with self.alarm_log.open("a") as f:
                        f.write(json.dumps(record, sort_keys=True) + "\n")
            if self.state_path is not None and (alarm is not None or now - self.last_save >= _SAVE_EVERY_S):
                self._save_state(now)
        return alarm

    def _save_state(self, now: float) -> None:
        assert self.state_path is not None
        self.last_save = now
        status = self.monitor.status() if self.monitor is not None else {}
        records = {name: {"queries_total": c.total, "day": c.day, "queries_today": c.today,
                          "requests": c.requests, "refusals": dict(c.refusals), "alarm": c.alarm,
                          "score": status.get(name, {}).get("score"),
                          "signals": status.get(name, {}).get("signals", {})}
                   for name, c in self.clients.items()}
        doc = {"format": STATE_FORMAT, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
               "clients": {**self.absent, **records}}
        with atomic_write(self.state_path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def close(self, *, save: bool = True) -> None:
        """Write the state file one last time (``save=False``: a server that never served leaves none)."""
        if save and self.state_path is not None:
            with self.lock:
                self._save_state(self.clock())

    def header_timed_out(self) -> None:
        """Count a connection closed at the header deadline (the ``on_timeout`` hook of
        :func:`wmark.serve_protocol.http_protocol`)."""
        self.m_header_timeouts.inc()

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

