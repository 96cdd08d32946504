"""The test plan a transcript is bound to, so the answers of a test are never reused under another test.

A fixed-n test keeps its alpha only at the ``n`` (and alpha) fixed before any answer was seen. Running one at
``n``, reading its p-value, then running it again at ``2n`` on the same transcript (whose answers are reused)
is a repeated fixed-n test: optional stopping, whose false-accusation rate exceeds alpha. An e-process (a
sequential test) keeps alpha under optional continuation, so the trigger set's budget may grow from run to run
(one more run continues the same e-process over the same key-ordered triggers); but only at the alpha fixed
before its answers were seen (a verdict at an alpha chosen after them is no test at that alpha) and under the
same e-process: its mixture (``eprocess``) and its ``max_queries`` for a log test (the tie-break log test's budget
cuts its last round short, the flip mark's cuts the stream of logged records it reads).

The plan lists each test with its mode (``fixed`` or ``sequential``), for a fixed-n test its budget (and the
log test's rounds), and for a sequential one its e-process's parameters. Alpha is recorded, and the client
whose logged queries are asked when there is one. A test that reads more than the answers records what else
fixes its outcome, whether fixed-n or sequential: the digest of each such input under ``inputs`` (the
tie-break rule's content, which names the served model by its digest; the holdout inputs; the query log's
inputs of the client) and how it reads the answers (``reads``: ``scores`` or ``labels``). Sequential tests
bind them too: an e-process keeps alpha under optional stopping of *one* statistic over *one* stream of
answers; reading the same answers again under another rule, log or holdout is a second e-process, and the
better of two is no e-process. The key is bound by the transcript itself (its commitment), not by the plan.

A log test reads a prefix of the client's logged inputs: the first ones in log order (all it had logged, for
the tie-break log test, which ranks them; at most its budget, for the flip mark's). The API keeps serving, and
its log only grows by appending (rows are never moved, and are read in rowid order), so the plan binds the
digest of what the test read together with how many it read (``log_read``), and a run resuming the plan reads
that many again (:func:`recorded_log_read`): the same inputs, the same test, however far the log grew since. A
run at another budget is another test, refused naming the budget (not the other prefix of the log it reads). A
log whose inputs already read were edited, reordered or deleted gives another digest and is refused. A plan
recorded before ``log_read`` bound the digest of the whole log as it stood, and is compared as it was.

A transcript that holds answers takes only runs of exactly its plan (:func:`plan_refusal`). A plan an older
wmark recorded without ``inputs`` (:func:`unbound`) cannot show that a fixed-n test would read the same rule,
log or holdout as before, so a fixed-n run on it is refused; a sequential run resumes it (an e-process keeps
alpha on its own) and binds the full plan from then on, as for a transcript that recorded no plan at all. So
does any run on a plan recorded without a sequential test's alpha or ``max_queries``. A sequential entry
recorded without ``eprocess`` is read with the parameters every earlier wmark ran (:data:`RECORDED_EPROCESS`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from wmark.evidence import EvidenceTest

# what each digest under a plan entry's "inputs" names, in a refusal
INPUT_NAMES = {"rule": "tie-break rule or served model", "holdout": "holdout",
               "log": "query log (the client's logged inputs)"}
# The e-process each sequential test ran before plans bound it: these values never changed in wmark's history, so
# an entry recorded without ``eprocess`` is read with them (literals, not the current constants, which may change).
RECORDED_EPROCESS: dict[str, dict[str, Any]] = {
    "trigger-set": {"alternatives": 20, "from": 0.05, "to": 0.99},
    "api-mark": {"alternatives": 20, "from": 0.05, "to": 0.99},
    "api-tiebreak-log": {"rho": 0.13, "round_size": 50},
}


def verification_plan(tests: Sequence[EvidenceTest], *, alpha: float, client: str | None = None) -> dict[str, Any]:
    """The plan of a verification: its tests in order (name, mode, each fixed-n test's budget, each sequential
    test's e-process, the digests of the inputs besides the answers a test reads, and a prior weight other than
    1), the alpha, and the client asked about.

    The weights are bound because weighted Holm keeps alpha only with weights fixed before the answers: a report
    re-weighting its tests would otherwise be recomputed with its own weights. Alpha is bound for sequential tests
    too: a sequential verdict re-stated at another alpha would otherwise be recomputed at it."""
    entries = [{"test": test.name, **test.plan(), **plan_weight(test.weight)} for test in tests]
    plan: dict[str, Any] = {"tests": entries, "alpha": float(alpha)}
    if client is not None:
        plan["client"] = client
    return plan


def plan_weight(weight: float) -> dict[str, float]:
    """A test's prior weight as its plan entry holds it: only when it is not 1, so that plans of weight-1 tests
    (the trigger set, the tie-break test on committed inputs) stay as an older wmark wrote them."""
    return {} if weight == 1.0 else {"weight": float(weight)}


def is_fixed(plan: dict[str, Any]) -> bool:
    """Whether some test of the plan is fixed-n."""
    return any(entry["mode"] == "fixed" for entry in plan["tests"])


def describe(plan: dict[str, Any]) -> str:
    """The plan in words, e.g. ``fixed-n trigger-set of 50 queries at alpha 1e-06``."""
    parts = []
    for entry in plan["tests"]:
        weight = f" of weight {entry['weight']:g}" if "weight" in entry else ""
        if entry["mode"] == "sequential":
            most = f" of at most {entry['max_queries']} queries" if entry.get("max_queries") is not None else ""
            parts.append(f"sequential {entry['test']}{weight}{most}")
            continue
        rounds = f" in {entry['rounds']} rounds" if "rounds" in entry else ""
        parts.append(f"fixed-n {entry['test']}{weight} of {entry['budget']} queries{rounds}")
    words = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if "alpha" in plan:
        words += f" at alpha {plan['alpha']:g}"
    if "client" in plan:
        words += f" for client {plan['client']!r}"
    return words


def plan_refusal(path: object, recorded: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why a run of plan ``wanted`` may not reuse the answers of transcript ``path``, recorded under plan
    ``recorded`` (one sentence), or ``None`` if it may: the same plan (up to the trigger set's sequential budget,
    which it does not hold), or a plan an older wmark recorded without some of what ``wanted`` binds
    (:func:`unbound`), resumed sequentially (or, where only a sequential test's alpha or budget is missing, by
    any run)."""
    recorded, wanted = recorded_eprocess(recorded), _without_log_read(recorded, recorded_eprocess(wanted))
    if recorded == wanted:
        return None
    head = f"The transcript {path} holds answers for the test plan '{describe(recorded)}'"
    if _shape(recorded) != _shape(wanted):
        return (f"{head}, not '{describe(wanted)}'; start a new transcript: reading the same answers under another "
                "plan (fixed-n instead of sequential or back, other tests or another client) repeats the test, which "
                "breaks its alpha.")
    if unbound(recorded, wanted) and not _lacks_inputs(recorded, wanted):
        # only a sequential test's alpha, budget or e-process is missing: what the older plan bound must still hold
        wanted = _as_recorded(recorded, wanted)
        if recorded == wanted:
            return None
    elif unbound(recorded, wanted):
        if not is_fixed(wanted):
            return None
        return (f"{head}, recorded by an older wmark that did not bind the tie-break rule, holdout or query log it "
                "read, so a fixed-n test cannot be checked against them; start a new transcript (a sequential run may "
                "still resume it).")
    if [e.get("weight", 1.0) for e in recorded["tests"]] != [e.get("weight", 1.0) for e in wanted["tests"]]:
        return (f"{head}, weighted otherwise than this run's tests; rerun with the recorded weights or start a new "
                "transcript: weighted Holm keeps alpha only with weights fixed before any answer was seen.")
    sequential = _changed_sequential(recorded, wanted)
    # another budget of the flip mark's test also reads another prefix of its log: name the budget, not the log
    changed = [] if any(name.startswith("budget") for name in sequential) else _changed_inputs(recorded, wanted)
    if changed:
        return (f"{head}, read with another {' and another '.join(changed)} than this run's; rerun with the files it "
                "was read with or start a new transcript: the same answers read again under another test is a "
                "repeated test, which breaks its alpha.")
    if sequential and (not is_fixed(wanted) or sequential != ["alpha"]):
        return (f"{head}, not '{describe(wanted)}' (another {' and another '.join(sequential)}); rerun with the "
                "recorded plan or start a new transcript: an e-process keeps alpha only at the alpha and under the "
                "e-process fixed before any answer was seen, and the same answers read under another is a second "
                "test, which breaks its alpha.")
    return (f"{head}, not '{describe(wanted)}'; rerun with the recorded plan or start a new transcript: a fixed-n "
            "test extended or changed on answers already seen is a repeated test, which breaks its alpha.")


def recorded_log_read(plan: dict[str, Any] | None, client: str | None) -> int | None:
    """How many of ``client``'s logged inputs the log test of a recorded ``plan`` read (its ``log_read``), for a run
    resuming it to read the same first ones; ``None`` for no plan, another client's, or one without ``log_read``."""
    if plan is None or client is None or plan.get("client") != client:
        return None
    return next((int(entry["log_read"]) for entry in plan["tests"] if "log_read" in entry), None)


def _without_log_read(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """``wanted`` without the ``log_read`` of a test whose entry in ``recorded`` holds none (an older wmark's, whose
    log digest covers the whole log as it stood: it is compared as before)."""
    entries = [{k: v for k, v in want.items() if k != "log_read" or "log_read" in have}
               for have, want in zip(recorded["tests"], wanted["tests"])]
    return dict(wanted, tests=entries + wanted["tests"][len(entries):])


def recorded_eprocess(plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with each sequential entry that holds no ``eprocess`` (an older wmark's) given the one it ran
    (:data:`RECORDED_EPROCESS`)."""
    entries = [dict(entry, eprocess=RECORDED_EPROCESS[entry["test"]])
               if entry["mode"] == "sequential" and "eprocess" not in entry and entry["test"] in RECORDED_EPROCESS
               else entry for entry in plan["tests"]]
    return dict(plan, tests=entries)


def unbound(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether ``recorded`` is a plan an older wmark wrote without something ``wanted`` binds (the same tests):
    the ``inputs`` a test reads (a rule, holdout or log), the alpha of a sequential plan, or a sequential test's
    ``max_queries`` or ``eprocess`` (one no earlier wmark ran for that test)."""
    recorded, wanted = recorded_eprocess(recorded), recorded_eprocess(wanted)
    if _shape(recorded) != _shape(wanted):
        return False
    later = ("max_queries", "eprocess")
    return (_lacks_inputs(recorded, wanted) or ("alpha" in wanted and "alpha" not in recorded)
            or any(name in want and name not in have
                   for have, want in zip(recorded["tests"], wanted["tests"]) for name in later))


def _as_recorded(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """``wanted`` without the sequential bindings (alpha, a test's ``max_queries`` or ``eprocess``) that an older
    ``recorded`` plan of the same tests lacks."""
    later = ("max_queries", "eprocess")
    entries = [{k: v for k, v in want.items() if k not in later or k in have}
               for have, want in zip(recorded["tests"], wanted["tests"])]
    return {k: v for k, v in dict(wanted, tests=entries).items() if k != "alpha" or "alpha" in recorded}


def _lacks_inputs(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a test of ``recorded`` lacks the ``inputs`` its counterpart in ``wanted`` binds."""
    return any("inputs" in want and "inputs" not in have for have, want in zip(recorded["tests"], wanted["tests"]))


def _changed_sequential(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What a sequential run of the same shape would change, in words: the alpha, a test's budget or e-process."""
    names = ["alpha"] if recorded.get("alpha") != wanted.get("alpha") else []
    for have, want in zip(recorded["tests"], wanted["tests"]):
        names += [f"{words} of the {want['test']} test" for name, words in
                  (("max_queries", "budget"), ("eprocess", "e-process"))
                  if have.get(name) != want.get(name)]
    return names


def _changed_inputs(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What the tests of two plans of the same shape read differently, in words (inputs, then the reading)."""
    names: list[str] = []
    for have, want in zip(recorded["tests"], wanted["tests"]):
        ours, theirs = have.get("inputs", {}), want.get("inputs", {})
        names += [INPUT_NAMES.get(name, name) for name in [*INPUT_NAMES, *sorted(set(ours) | set(theirs))]
                  if ours.get(name) != theirs.get(name)]
        if have.get("reads") != want.get("reads"):
            names.append(f"reading of the answers ({want.get('reads')}, not {have.get('reads')})")
    return list(dict.fromkeys(names))


def content_sha256(*arrays: Any) -> str:
    """SHA-256 of arrays as a plan binds them: each one's dtype, shape and bytes (a text array's strings as
    length-prefixed UTF-8); ``None`` hashes as absent."""
    h = hashlib.sha256()
    for x in arrays:
        if x is None:
            h.update(b"none|")
            continue
        arr = np.asarray(x)
        if arr.dtype.kind in "OUS":
            h.update(f"text|{arr.size}|".encode())
            for item in arr.reshape(-1):
                raw = str(item).encode("utf-8")
                h.update(f"{len(raw)}|".encode() + raw)
            continue
        # in its own dtype (named in the digest): a float64 copy of a large holdout would double its memory
        num = np.ascontiguousarray(arr)
        h.update(f"num|{num.dtype.str}|{num.shape}|".encode())
        h.update(num.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _shape(plan: dict[str, Any]) -> tuple[Any, ...]:
    """What no run may change, sequential or not: which tests run, in which mode, about which client."""
    return tuple((entry["test"], entry["mode"]) for entry in plan["tests"]), plan.get("client")
