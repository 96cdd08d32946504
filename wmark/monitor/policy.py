"""Per-client serving policy: quotas, a token-bucket rate limit, the answer mode and the action on an alarm.

A policy file is one JSON object::

    {
      "default": {"answer": "scores", "rate": {"queries_per_second": 50, "burst": 200},
                  "quota": {"per_day": 100000, "total": 1000000}, "on_alarm": {"action": "label-only"}},
      "clients": {"shop": {"answer": "top-k", "top_k": 3, "quota": {"per_day": 20000}},
                  "partner": {"on_alarm": {"action": "log"}}},
      "metrics_token_env": "WMARK_METRICS_TOKEN"
    }

Every field is optional. A client's entry replaces the default's fields one by one (a client that gives
``quota`` replaces the whole default quota). Counts are *queries* (inputs), so a batch of 64 inputs costs 64.

* ``answer``: ``"scores"`` (every class's probability), ``"top-k"`` (the ``top_k`` best labels and their
  probabilities) or ``"label"`` (the top-1 label only).
* ``rate``: a token bucket of ``burst`` queries refilled at ``queries_per_second``; a request it cannot
  cover is refused with HTTP 429 and ``Retry-After``.
* ``quota``: ``per_day`` (UTC day; over it: 429 with ``Retry-After`` until midnight UTC) and ``total``
  (over it: 403). A request that would cross a quota is refused whole, never answered in part.
* ``on_alarm``: what happens once the extraction monitor raises an alarm for the client: ``"log"`` (only
  the alarm line and metrics), ``"throttle"`` (the rate becomes ``queries_per_second``/``burst``),
  ``"label-only"`` (answers shrink to the top-1 label) or ``"block"`` (every request refused with 403).
* ``mark``: with an API-side mark served (``wmark serve --mark tiebreak``), whom it marks: ``"always"``
  (the default: every answer) or ``"on-alarm"`` (only answers after the monitor's alarm for the client;
  until then the client gets the bare model's answers and pays no accuracy for the mark, and only its
  marked queries are logged).
* ``metrics_token_env``: the environment variable holding a bearer token ``GET /metrics`` then requires.

Example:
    >>> policy = parse_policy({"clients": {"shop": {"answer": "label"}}}, clients=["shop", "lab"])
    >>> policy.for_client("shop").answer, policy.for_client("lab").answer
    ('label', 'scores')
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wmark.errors import UsageError

ANSWER_MODES = ("scores", "top-k", "label")
ALARM_ACTIONS = ("log", "throttle", "label-only", "block")
MARK_MODES = ("always", "on-alarm")
_CLIENT_FIELDS = {"answer", "top_k", "rate", "quota", "on_alarm", "mark"}
_TOP_FIELDS = {"default", "clients", "metrics_token_env"}
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``burst`` queries at once, refilled at ``queries_per_second``."""

    queries_per_second: float
    burst: int


@dataclass(frozen=True)
class Quota:
    """Queries allowed per UTC day and in total (``None``: unlimited)."""

    per_day: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class AlarmAction:
    """What an alarm does to a client: ``action`` in :data:`ALARM_ACTIONS`; ``rate`` for ``throttle``."""

    action: str = "log"
    rate: RateLimit | None = None


@dataclass(frozen=True)
class ClientPolicy:
    """One client's rules (see the module docstring)."""

    answer: str = "scores"
    top_k: int = 3
    rate: RateLimit | None = None
    quota: Quota = field(default_factory=Quota)
    on_alarm: AlarmAction = field(default_factory=AlarmAction)
    mark: str = "always"


@dataclass(frozen=True)
class Policy:
    """The whole policy: a default and per-client overrides."""

    default: ClientPolicy = field(default_factory=ClientPolicy)
    clients: dict[str, ClientPolicy] = field(default_factory=dict)
    metrics_token_env: str | None = None

    def for_client(self, client: str) -> ClientPolicy:
        """The rules that apply to ``client`` (the default for a client the file does not name)."""
        return self.clients.get(client, self.default)

    @property
    def marks_on_alarm(self) -> bool:
        """Whether some client is marked only after an alarm (the server then needs a mark and a monitor)."""
        return any(rules.mark == "on-alarm" for rules in (self.default, *self.clients.values()))


def _fail(where: str, problem: str) -> UsageError:
    return UsageError(f"Policy {where}: {problem}.")


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        # JSON integers are unbounded; one of hundreds of digits crashed math.isfinite and the token bucket's floats
        raise _fail(where, f"is too large; give at most {sys.float_info.max:g}")
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise _fail(where, f"must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}")
    if value < 0 or (positive and value == 0):
        raise _fail(where, f"must be {'positive' if positive else 'zero or more'}, not {value}")
    return value


def _object(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be a JSON object, not {json.dumps(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _fail(where, f"has unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return value


def _rate(value: Any, where: str) -> RateLimit:
    doc = _object(value, where, {"queries_per_second", "burst"})
    if "queries_per_second" not in doc:
        raise _fail(where, "needs \"queries_per_second\"")
    qps = float(_number(doc["queries_per_second"], f"{where}.queries_per_second", positive=True))
    burst = _number(doc.get("burst", max(1, math.ceil(qps))), f"{where}.burst", integer=True, positive=True)
    return RateLimit(qps, burst)


def _client(value: Any, where: str, base: ClientPolicy) -> ClientPolicy:
    doc = _object(value, where, _CLIENT_FIELDS)
    out = base
    if "answer" in doc:
        if doc["answer"] not in ANSWER_MODES:
            raise _fail(f"{where}.answer", f"is {json.dumps(doc['answer'])}; use one of {', '.join(ANSWER_MODES)}")
        out = replace(out, answer=doc["answer"])
    if "top_k" in doc:
        out = replace(out, top_k=_number(doc["top_k"], f"{where}.top_k", integer=True, positive=True))
    if "rate" in doc:
        out = replace(out, rate=None if doc["rate"] is None else _rate(doc["rate"], f"{where}.rate"))
    if "quota" in doc:
        q = _object(doc["quota"], f"{where}.quota", {"per_day", "total"})
        out = replace(out, quota=Quota(
            per_day=None if q.get("per_day") is None else _number(q["per_day"], f"{where}.quota.per_day", integer=True),
            total=None if q.get("total") is None else _number(q["total"], f"{where}.quota.total", integer=True)))
    if "on_alarm" in doc:
        a = _object(doc["on_alarm"], f"{where}.on_alarm", {"action", "queries_per_second", "burst"})
        action = a.get("action", "log")
        if action not in ALARM_ACTIONS:
            raise _fail(f"{where}.on_alarm.action", f"is {json.dumps(action)}; use one of {', '.join(ALARM_ACTIONS)}")
        rate = None
        if action == "throttle":
            rate = _rate({k: v for k, v in a.items() if k != "action"}, f"{where}.on_alarm")
        elif len(a) > 1:
            raise _fail(f"{where}.on_alarm", f"gives a rate, which only the \"throttle\" action takes, not {action!r}")
        out = replace(out, on_alarm=AlarmAction(action, rate))
    if "mark" in doc:
        if doc["mark"] not in MARK_MODES:
            raise _fail(f"{where}.mark", f"is {json.dumps(doc['mark'])}; use one of {', '.join(MARK_MODES)}")
        out = replace(out, mark=doc["mark"])
    slow, rate = out.on_alarm.rate, out.rate
    if slow is not None and rate is not None and (slow.queries_per_second > rate.queries_per_second
                                                  or slow.burst > rate.burst):
        raise _fail(f"{where}.on_alarm", f"throttles to {slow.queries_per_second:g} queries/s (burst {slow.burst}), "
                    f"which is not below the client's rate of {rate.queries_per_second:g} (burst {rate.burst}): an "
                    "alarm would loosen its limit")
    return out


def parse_policy(doc: Any, *, clients: Iterable[str]) -> Policy:
    """Check and build a policy from its JSON document.

    Args:
        doc: The parsed JSON (see the module docstring for the fields).
        clients: The names of the clients the server knows (from its token file).

    Raises:
        UsageError: On unknown fields, wrong types, negative quotas or rates, an unknown answer mode or
            alarm action, a throttle faster than the client's rate, or a client the server has no token for.
    """
    top = _object(doc, "file", _TOP_FIELDS)
    default = _client(top.get("default", {}), "default", ClientPolicy())
    known = set(clients)
    per_client = top.get("clients", {})
    if not isinstance(per_client, dict):
        raise _fail("clients", f"must be a JSON object of client name -> rules, not {json.dumps(per_client)}")
    out: dict[str, ClientPolicy] = {}
    for name, entry in per_client.items():
        if name not in known:
            raise _fail(f"clients.{name}", f"names an unknown client; the server's clients are {', '.join(sorted(known))}")
        out[name] = _client(entry, f"clients.{name}", default)
    env = top.get("metrics_token_env")
    if env is not None and (not isinstance(env, str) or not env):
        raise _fail("metrics_token_env", "must be the name of an environment variable")
    return Policy(default=default, clients=out, metrics_token_env=env)


def load_policy(path: str | os.PathLike[str], *, clients: Iterable[str]) -> Policy:
    """Read and check a policy file (see :func:`parse_policy`).

    Raises:
        UsageError: If the file is missing, not JSON, or not a valid policy.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Policy file {p} does not exist; write a JSON object with \"default\" and \"clients\".")
    try:
        doc = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"Policy file {p} is not valid JSON ({exc}); fix its syntax.") from None
    return parse_policy(doc, clients=clients)


class TokenBucket:
    """A token bucket over queries; :meth:`take` either takes ``n`` tokens or says how long to wait."""

    def __init__(self, rate: RateLimit, *, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.stamp = now

    def reset_rate(self, rate: RateLimit, *, now: float) -> None:
        """Switch to another rate (an alarm's throttle), keeping at most the new burst."""
        self._refill(now)
        self.rate = rate
        self.tokens = min(self.tokens, float(rate.burst))

    def _refill(self, now: float) -> None:
        self.tokens = min(float(self.rate.burst), self.tokens + (now - self.stamp) * self.rate.queries_per_second)
        self.stamp = now

    def take(self, n: int, *, now: float) -> float:
        """Take ``n`` tokens and return 0, or take none and return the seconds until ``n`` are there."""
        wait = self.wait(n, now=now)
        if wait == 0:
            self.tokens -= n
        return wait

    def wait(self, n: int, *, now: float) -> float:
        """The seconds until ``n`` tokens are there (0: they are), taking none."""
        self._refill(now)
        return 0.0 if n <= self.tokens else (n - self.tokens) / self.rate.queries_per_second
