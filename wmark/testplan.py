"""The test plan a transcript is bound to, so the answers of a fixed-n test are never reused to extend it.

A fixed-n test keeps its alpha only at the ``n`` (and alpha) fixed before any answer was seen. Running one at
``n``, reading its p-value, then running it again at ``2n`` on the same transcript (whose answers are reused)
is a repeated fixed-n test: optional stopping, whose false-accusation rate exceeds alpha. An e-process (a
sequential test) keeps alpha under optional continuation, so its budget may grow from run to run.

The plan lists each test with its mode (``fixed`` or ``sequential``) and, for a fixed-n test, what fixes its
outcome besides the answers: its budget (and the log test's rounds). Alpha is recorded when some test is
fixed-n, and the client whose logged queries are asked when there is one. A transcript that holds answers
takes only runs of exactly its plan (:func:`plan_refusal`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wmark.evidence import EvidenceTest


def verification_plan(tests: Sequence[EvidenceTest], *, alpha: float, client: str | None = None) -> dict[str, Any]:
    """The plan of a verification: its tests in order (name, mode and each fixed-n test's budget), the alpha
    when some test is fixed-n, and the client asked about."""
    entries = [{"test": test.name, **test.plan()} for test in tests]
    plan: dict[str, Any] = {"tests": entries}
    if is_fixed(plan):
        plan["alpha"] = float(alpha)
    if client is not None:
        plan["client"] = client
    return plan


def is_fixed(plan: dict[str, Any]) -> bool:
    """Whether some test of the plan is fixed-n."""
    return any(entry["mode"] == "fixed" for entry in plan["tests"])


def describe(plan: dict[str, Any]) -> str:
    """The plan in words, e.g. ``fixed-n trigger-set of 50 queries at alpha 1e-06``."""
    parts = []
    for entry in plan["tests"]:
        if entry["mode"] == "sequential":
            parts.append(f"sequential {entry['test']}")
            continue
        rounds = f" in {entry['rounds']} rounds" if "rounds" in entry else ""
        parts.append(f"fixed-n {entry['test']} of {entry['budget']} queries{rounds}")
    words = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if "alpha" in plan:
        words += f" at alpha {plan['alpha']:g}"
    if "client" in plan:
        words += f" for client {plan['client']!r}"
    return words


def plan_refusal(path: object, recorded: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why a run of plan ``wanted`` may not reuse the answers of transcript ``path``, recorded under plan
    ``recorded`` (one sentence), or ``None`` if it may: the same plan, up to the budgets of sequential tests."""
    if recorded == wanted:
        return None
    head = f"The transcript {path} holds answers for the test plan '{describe(recorded)}', not '{describe(wanted)}'"
    if _shape(recorded) != _shape(wanted):
        return (f"{head}; start a new transcript: reading the same answers under another plan (fixed-n instead of "
                "sequential or back, other tests or another client) repeats the test, which breaks its alpha.")
    return (f"{head}; rerun with the recorded plan or start a new transcript: a fixed-n test extended or changed on "
            "answers already seen is a repeated test, which breaks its alpha.")


def _shape(plan: dict[str, Any]) -> tuple[Any, ...]:
    """What no run may change, sequential or not: which tests run, in which mode, about which client."""
    return tuple((entry["test"], entry["mode"]) for entry in plan["tests"]), plan.get("client")
