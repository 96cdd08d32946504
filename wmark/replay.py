"""Replaying the recorded answers of a verdict: the stand-in for the suspect that a re-check queries.

A re-check never asks the suspect. :class:`ReplaySuspect` answers each input the verifier's test code asks with
the answer recorded for its digest, and refuses an input nobody recorded. :func:`answers_for` reads that record
from the report (a model file's answers) or from the transcript it names (an API's), whose digests must be the
report's; a transcript's answers are bound to a test plan (:mod:`wmark.testplan`), and a test replayed from one
must be the test that plan bound (:func:`check_planned_tests`, and the check :func:`replay_test` makes).
:func:`replay_test` then runs the very same test the verifier ran (the trigger-set test, or the tie-break test
with the owner's rule and served model, whose SHA-256 must be the report's) on the replayed answers.

This is the black-box half of :func:`wmark.recheck.recheck`, apart from its checks of the report itself and
its comparison of the outcome; the white-box half is :mod:`wmark.whitebox.recheck`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.evidence import TestResult, alpha_share
from wmark.keys import Key
from wmark.recording import TIEBREAK, PathLike, batch_sha256
from wmark.signing import EvidenceError, file_sha256
from wmark.suspects.base import Answers
from wmark.testplan import describe, plan_weight, recorded_eprocess
from wmark.transcript import readonly_uri, transcript_digest
from wmark.verify import TriggerSetTest


class ReplaySuspect:
    """Answers each input with the label (and the scores, where recorded) recorded for its digest; refuses an
    input nobody recorded."""

    def __init__(self, answers: dict[str, int], *, num_classes: int, input_shape: tuple[int, ...],
                 description: str, source: str, scores: Mapping[str, list[float] | None] | None = None) -> None:
        self.answers = answers
        self.scores = scores or {}
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.description = description
        self.source = source

    def query(self, inputs: np.ndarray) -> Answers:
        digests = batch_sha256(inputs)
        for digest in digests:
            if digest not in self.answers:
                raise EvidenceError(f"{self.source} holds no answer to input {digest[:16]}..., which this key makes "
                                    "the verifier ask: the record is not of this key's verification, or was altered.")
        labels = [self.answers[digest] for digest in digests]
        rows = [self.scores.get(digest) for digest in digests]
        if not rows or any(row is None for row in rows):
            return Answers(labels=np.asarray(labels, dtype=np.int64))
        return Answers(labels=np.asarray(labels, dtype=np.int64), scores=np.asarray(rows, dtype=np.float64))


def transcript_answers(path: PathLike) -> dict[str, int]:
    """The answers a transcript holds (every role but cover traffic), by input digest, as the probe reused them:
    the latest ``ok``
    answer, else an abstention (``-1``) for an input answered only with garbage or never answered."""
    try:
        db = sqlite3.connect(readonly_uri(path), uri=True)
        try:
            rows = db.execute("SELECT input_sha256, status, label FROM queries WHERE role = 'trigger' "
                              "ORDER BY seq").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise EvidenceError(f"{path} is not a readable wmark transcript ({exc}): it was altered or truncated.") from None
    out: dict[str, int] = {}
    for digest, status, label in rows:
        if status == "ok":
            out[digest] = int(label)
        else:
            out.setdefault(digest, -1)
    return out


def transcript_plan(path: PathLike) -> dict[str, Any] | None:
    """The test plan a transcript's answers are bound to (:mod:`wmark.testplan`), or ``None`` for one an older wmark
    wrote without a plan."""
    try:
        db = sqlite3.connect(readonly_uri(path), uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE name = 'plan'").fetchone()
        finally:
            db.close()
        return None if row is None else json.loads(row[0])
    except (sqlite3.DatabaseError, json.JSONDecodeError) as exc:
        raise EvidenceError(f"{path} is not a readable wmark transcript ({exc}): it was altered or truncated.") from None


@dataclass(frozen=True)
class Record:
    """The recorded answers by input digest (labels, and scores where the report holds them) and their source."""

    labels: dict[str, int]
    source: str
    scores: dict[str, list[float] | None] = field(default_factory=dict)
    plan: dict[str, Any] | None = None

    @property
    def has_scores(self) -> bool:
        return any(row is not None for row in self.scores.values())


def answers_for(doc: dict[str, Any], report: Path, transcript: PathLike | None,
                 checks: list[str]) -> Record | None:
    """Every recorded answer by input digest: from the report (a model file) or the transcript (an API)."""
    details: dict[str, Any] = next((t.get("details", {}) for t in doc["verdict"]["tests"]
                                    if t["name"] == "trigger-set"), {})
    recorded = details.get("answers")
    summary = doc.get("transcript") or details.get("transcript")
    if transcript is not None and (recorded is not None or not summary):
        raise UsageError(f"The report {report} names no transcript (it records "
                         f"{'the answers itself' if recorded is not None else 'no answers'}), so a transcript does not "
                         "apply; drop --transcript.")
    if recorded is not None:
        digests, labels = recorded.get("input_sha256", []), recorded.get("labels", [])
        scores = recorded.get("scores", [None] * len(digests))
        if not len(digests) == len(labels) == len(scores):
            raise EvidenceError(f"The report {report} records {len(digests)} trigger digests but {len(labels)} answers "
                                f"and {len(scores)} score rows.")
        return Record(labels={d: int(v) for d, v in zip(digests, labels)}, source=f"the report {report.name}",
                       scores=dict(zip(digests, scores)))
    if not summary:
        return None
    path = Path(transcript) if transcript is not None else Path(summary["path"])
    if transcript is None and not path.is_absolute() and not path.is_file():
        path = report.parent / path.name
    if not path.is_file():
        raise UsageError(f"The transcript {path} does not exist; pass the transcript file the report names.")
    want_file = summary.get("file_sha256")
    if want_file is not None and file_sha256(path) != want_file:
        raise EvidenceError(f"The transcript {path} is not byte for byte the one the report names (its SHA-256 "
                            "differs): it was altered.")
    if transcript_digest(path) != summary.get("sha256_chain"):
        raise EvidenceError(f"The transcript {path} does not match the digest in the report: rows were altered, added "
                            "or removed.")
    checks.append("transcript digest" + (" and file SHA-256" if want_file else ""))
    return Record(labels=transcript_answers(path), source=f"the transcript {path.name}", plan=transcript_plan(path))


def _check_plan(record: Record, name: str, entry: dict[str, Any], alpha: float, report: Path, weight: float) -> None:
    """Refuse a test replayed from a transcript that the transcript's plan did not bind: its answers would be read
    under another test than the one they were gathered for (a fixed-n test cut or extended after they were seen,
    another mode, alpha, e-process, rule, log or prior weight), which no run of wmark writes."""
    plan = record.plan
    if plan is None:
        return
    plan = recorded_eprocess(plan)
    bound = next((e for e in plan["tests"] if e.get("test") == name), None)
    wanted = {"test": name, **entry, **plan_weight(weight)}
    if bound is not None and "inputs" not in bound:  # an older plan bound no inputs: compare what it bound
        wanted = {k: v for k, v in wanted.items() if k not in ("inputs", "reads")}
    elif bound is not None and str(bound.get("reads")).startswith("scores") and str(wanted.get("reads")).startswith("labels"):
        # a test bound to read scores reads labels where the suspect gave none; the report says which it read
        wanted["reads"] = bound["reads"]
    if bound is not None:  # nor a sequential test's budget or e-process, where an older plan bound none
        wanted = {k: v for k, v in wanted.items() if k not in ("max_queries", "eprocess") or k in bound}
    # an older plan of sequential tests bound no alpha
    if bound == wanted and plan.get("alpha", alpha) == alpha:
        return
    shown = describe({"tests": [wanted], "alpha": alpha})
    raise EvidenceError(f"The report {report} gives the test '{shown}', but {record.source} holds answers for the test "
                        f"plan '{describe(plan)}': its answers would be read under another test than the one they were "
                        "gathered for.")


def check_planned_tests(record: Record | None, verdict: dict[str, Any], report: Path) -> None:
    """Refuse a report whose tests are not those its transcript's plan bound: weighted Holm corrects over every test
    run, so a test left out of the report (or one added) makes the others' p-values smaller than the run's."""
    if record is None or record.plan is None:
        return
    names = [t["name"] for t in verdict["tests"]]
    if names != [entry["test"] for entry in record.plan["tests"]]:
        raise EvidenceError(f"The report {report} gives the tests '{', '.join(names)}', but {record.source} holds "
                            f"answers for the test plan '{describe(record.plan)}': a test left out of the report (or "
                            "added to it) changes the correction over the tests run, which breaks its alpha.")


def _replay_tiebreak(*, key: Key, replay: ReplaySuspect, files: dict[str, Any], overrides: Mapping[str, PathLike],
                     checks: list[str], alpha: float, share: float, read: str,
                     centred: bool) -> tuple[TestResult, dict[str, Any]]:
    """The tie-break test on the committed inputs, replayed from the record with the owner's rule and served model,
    reading the suspect as the report says it was read (``read``: ``labels`` or its probabilities; ``centred``:
    whether the test centred what it read, as its details say); and the test's plan entry
    (:meth:`~wmark.schemes.tiebreak.TieBreakTest.plan`)."""
    from wmark.schemes.tiebreak import tiebreak_tests_from_files

    paths = {}
    for name in ("rule", "served"):
        p = Path(overrides.get(name) or files[name]["path"])
        if not p.is_file():
            raise UsageError(f"The tie-break {name} file {p} does not exist; pass the one the report names.")
        if file_sha256(p) != files[name]["sha256"]:
            raise EvidenceError(f"The tie-break {name} file {p} is not the one the report names (its SHA-256 differs).")
        paths[name] = p
    checks.append("tie-break rule and served model SHA-256")
    (test,) = tiebreak_tests_from_files(key=key, rule=paths["rule"], served=paths["served"], arch=files["arch"] or None,
                                        holdout=files.get("holdout"), queries=int(files["queries"]),
                                        use_scores=read != "labels", centred=centred)
    return test.run(replay, alpha=alpha, share=share), test.plan()


def replay_test(test: dict[str, Any], *, record: Record, key: Key, verdict: dict[str, Any],
            owner_files: Mapping[str, PathLike], checks: list[str], report: Path) -> TestResult:
    """A black-box test (the trigger set, or the tie-break test) replayed from the recorded answers."""
    alpha = float(verdict["alpha"])
    replay = ReplaySuspect(record.labels, num_classes=key.num_classes, input_shape=tuple(key.input_shape),
                           description=verdict["suspect"], source=record.source, scores=record.scores)
    details = test.get("details", {})
    if test["name"] == TIEBREAK:
        redone, entry = _replay_tiebreak(key=key, replay=replay, files=details["files"], overrides=owner_files,
                                         checks=checks, alpha=alpha, share=float(details.get("alpha_share", 1.0)),
                                         read=str(details.get("read", "labels")), centred="centred" in details)
    else:
        trigger = TriggerSetTest(key=key, mode=details.get("mode", "sequential"),
                                 max_queries=int(details.get("budget", len(record.labels))))
        share = float(details.get("alpha_share", 1.0))
        weights = [float(t.get("weight", 1.0)) for t in verdict["tests"]]
        given = alpha_share(float(test.get("weight", 1.0)), weights)
        if trigger.mode == "sequential" and not math.isclose(share, given, rel_tol=1e-12):
            # where a sequential test stops is fixed by alpha and the weights, never by a report's own figure
            raise EvidenceError(f"The report {report} gives the sequential {test['name']} test a share of alpha of "
                                f"{share:g}, but its tests' weights give it {given:g}: it was edited.")
        redone = trigger.run(replay, alpha=alpha, share=share)
        entry = trigger.plan()
    _check_plan(record, test["name"], entry, alpha, report, float(test.get("weight", 1.0)))
    return redone
