"""Re-checking a verdict from the revealed key and the recorded answers alone, without the suspect.

In a dispute the other side's expert distrusts the owner's machine. The evidence report therefore
records everything a verdict depends on except the key's secret: the key's public parameters and
commitment, the suspect's digest (a file's SHA-256, or an API's URL with the transcript's digests), the
digest of every input asked with the answer it got (in the report for a model file, in the transcript
for an API), alpha, the test parameters and p-values, and the software versions. Once the owner reveals
the key, :func:`recheck` regenerates the triggers from it, feeds the recorded answers, looked up by the
digest of each input, to the very same test code the verifier ran (:func:`wmark.verify.trigger_set_test`,
:func:`wmark.schemes.tiebreak.tiebreak_tests_from_files` with the owner's rule and served model, and
:func:`wmark.verify.decide`: not a second implementation), and compares the decision and log10 p. A
white-box verdict is recomputed from the bits read that its report records (:mod:`wmark.whitebox.recheck`);
the suspect's file, with the reference and anchor, is needed only to re-read them.

Outcomes: ``same`` (exit 0), ``different`` or ``partial`` (exit 1: a test that cannot be recomputed here is
named, and the verdict is then not confirmed), and tampered (an :class:`~wmark.signing.EvidenceError`,
exit 2: a digest or signature fails, or the key's commitment is not the report's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.evidence import TestResult, Verdict, alpha_share, decide
from wmark.keys import Key, load_key
from wmark.signing import EvidenceError, file_sha256, signature_path, verify_file
from wmark.suspects.base import Answers, Suspect
from wmark.testplan import describe, plan_weight, recorded_eprocess
from wmark.text import is_text_array
from wmark.transcript import input_sha256, readonly_uri, transcript_digest
from wmark.verify import TriggerSetTest
from wmark.whitebox.recheck import (
    WHITEBOX,
    check_model_files,
    recheck_weights,
    recorded_inputs,
    weights_differences,
)

PathLike = str | os.PathLike[str]
TOLERANCE = 1e-9
TIEBREAK = "api-tiebreak"
RECHECKABLE = ("trigger-set", TIEBREAK)


def canonical_sha256(doc: Any) -> str:
    """SHA-256 of a JSON document in canonical form (sorted keys, no spaces): the report's content digest."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RecordingSuspect:
    """Passes queries through to a suspect and records the answer to every input asked, in order.

    The record goes into the evidence report of a model-file suspect (an API's answers are in its
    transcript), so the verdict can be recomputed without the suspect. Where the suspect gives scores they are
    recorded too (exactly, as JSON numbers): a tie-break test that read them can then be recomputed as well.
    """

    def __init__(self, inner: Suspect) -> None:
        self.inner = inner
        self.digests: list[str] = []
        self.labels: list[int] = []
        self.scores: list[list[float] | None] = []

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def num_classes(self) -> int | None:
        return self.inner.num_classes

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.inner.input_shape

    def query(self, inputs: np.ndarray) -> Answers:
        answers = self.inner.query(inputs)
        labels = np.asarray(answers.labels).reshape(-1)
        rows = [None] * len(labels) if answers.scores is None else np.asarray(answers.scores, dtype=np.float64).tolist()
        for digest, label, row in zip(batch_sha256(inputs), labels, rows):
            self.digests.append(digest)
            self.labels.append(int(label))
            self.scores.append(row)
        return answers

    def attach(self, verdict: Verdict, *, suspect_file: PathLike | None = None,
               tiebreak: dict[str, Any] | None = None) -> Verdict:
        """Put the record (and the suspect file's SHA-256) into the trigger-set test's details and, given the
        tie-break test's files (``rule``, ``served``, ``arch``, ``holdout``, ``queries``), their paths and SHA-256
        into its details; return the verdict."""
        for test in verdict.tests:
            if test.name == "trigger-set":
                test.details["answers"] = {"input_sha256": list(self.digests), "labels": list(self.labels)}
                if any(row is not None for row in self.scores):
                    test.details["answers"]["scores"] = list(self.scores)
                if suspect_file is not None:
                    test.details["suspect_file"] = {"path": str(suspect_file), "sha256": file_sha256(suspect_file)}
        if tiebreak is not None:
            record_tiebreak_files(verdict, **tiebreak)
        return verdict


def tiebreak_files(*, rule: PathLike | None, served: PathLike | None, served_arch: str | None,
                   holdout: str | None, queries: int) -> dict[str, Any] | None:
    """The owner files a committed-input tie-break test runs with (``None`` when there is no such test): the
    rule and the served model it names (or ``served``, where it moved), for :func:`record_tiebreak_files`."""
    if rule is None or queries <= 0:
        return None
    from wmark.io import read_metadata, wmark_metadata

    meta = wmark_metadata(read_metadata(rule))
    return {"rule": rule, "served": served or str(meta.get("served_path") or ""),
            "arch": served_arch or str(meta.get("served_arch") or ""), "holdout": holdout, "queries": queries}


def record_tiebreak_files(verdict: Verdict, *, rule: PathLike, served: PathLike, arch: str, holdout: str | None,
                          queries: int) -> Verdict:
    """Name the owner files the tie-break test ran with (paths and SHA-256) in its details, so a re-check can
    replay it with the same rule and served model; return the verdict."""
    for test in verdict.tests:
        if test.name == TIEBREAK:
            test.details["files"] = {"arch": arch, "holdout": holdout, "queries": int(queries),
                                     **{name: {"path": str(p), "sha256": file_sha256(p)}
                                        for name, p in (("rule", rule), ("served", served))}}
    return verdict


def batch_sha256(inputs: Any) -> list[str]:
    """The transcript's digest of each input of a batch: float32 tensors, or strings for a text key."""
    if is_text_array(inputs):
        return [input_sha256(str(x)) for x in inputs]
    return [input_sha256(x) for x in np.asarray(inputs, dtype=np.float32)]


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


def _check_plan(record: _Record, name: str, entry: dict[str, Any], alpha: float, report: Path, weight: float) -> None:
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
    elif bound is not None and (bound.get("reads"), wanted.get("reads")) == ("scores", "labels"):
        # a test bound to read scores reads labels where the suspect gave none; the report says which it read
        wanted["reads"] = "scores"
    if bound is not None:  # nor a sequential test's budget or e-process, where an older plan bound none
        wanted = {k: v for k, v in wanted.items() if k not in ("max_queries", "eprocess") or k in bound}
    # an older plan of sequential tests bound no alpha
    if bound == wanted and plan.get("alpha", alpha) == alpha:
        return
    shown = describe({"tests": [wanted], "alpha": alpha})
    raise EvidenceError(f"The report {report} gives the test '{shown}', but {record.source} holds answers for the test "
                        f"plan '{describe(plan)}': its answers would be read under another test than the one they were "
                        "gathered for.")


def _check_planned_tests(record: _Record | None, verdict: dict[str, Any], report: Path) -> None:
    """Refuse a report whose tests are not those its transcript's plan bound: weighted Holm corrects over every test
    run, so a test left out of the report (or one added) makes the others' p-values smaller than the run's."""
    if record is None or record.plan is None:
        return
    names = [t["name"] for t in verdict["tests"]]
    if names != [entry["test"] for entry in record.plan["tests"]]:
        raise EvidenceError(f"The report {report} gives the tests '{', '.join(names)}', but {record.source} holds "
                            f"answers for the test plan '{describe(record.plan)}': a test left out of the report (or "
                            "added to it) changes the correction over the tests run, which breaks its alpha.")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1e300


@dataclass
class Recheck:
    """The outcome of re-checking a report.

    Attributes:
        status: ``same``, ``different`` or ``partial`` (some test could not be recomputed here).
        message: One sentence for people.
        original: The report's decision and log10 p.
        recomputed: The recomputed decision and log10 p.
        tests: Per test: whether it was recomputed, both log10 p values, and why not when it was not.
        checks: The integrity checks that passed (digests, signature, commitment).
    """

    status: str
    message: str
    original: dict[str, Any]
    recomputed: dict[str, Any]
    tests: list[dict[str, Any]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "same" else 1

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), exit_code=self.exit_code)


def _load_report(path: PathLike) -> tuple[Path, dict[str, Any]]:
    from wmark.report import json_twin

    p = Path(path)
    if p.suffix.lower() in (".html", ".htm"):
        p = json_twin(p)
    if not p.is_file():
        raise UsageError(f"Report {p} does not exist.")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvidenceError(f"The report {p} is not valid JSON: it was altered or truncated.") from None
    if not isinstance(doc, dict) or doc.get("format") != "wmark-evidence/1":
        raise EvidenceError(f"{p} is not a wmark evidence report (format wmark-evidence/1).")
    return p, doc


def _check_structure(path: Path, doc: dict[str, Any]) -> None:
    """Refuse a report whose fields are missing or of the wrong JSON type (edited, its digest recomputed, or
    written by another tool), in one sentence rather than a crash half-way through the recomputation."""
    number, text = (int, float), (str,)
    verdict = doc.get("verdict")
    fields: list[tuple[Any, tuple[type, ...]]] = [(doc.get("key"), (dict,)), (verdict, (dict,))]
    if isinstance(verdict, dict):
        fields += [(verdict.get(k), number) for k in ("alpha", "log10_p")]
        tests = verdict.get("tests")
        fields += [(verdict.get(k), text) for k in ("decision", "suspect")] + [(tests, (list,))]
        for test in tests if isinstance(tests, list) else []:
            fields.append((test, (dict,)))
            if isinstance(test, dict):
                fields += [(test.get(k), text) for k in ("name", "evidence_of")]
                fields += [(test.get(k), number) for k in ("log10_p", "queries", "matches")]
                fields += [(test.get(k, d), t) for k, d, t in (("details", {}, (dict,)), ("null", {}, (dict,)),
                                                               ("trajectory", [], (list,)), ("weight", 1.0, number),
                                                               ("abstentions", 0, number), ("method", "", text))]
                details = test.get("details", {})
                if isinstance(details, dict):
                    fields += [(details.get(k, 1), number) for k in ("alpha_share", "budget")]
                    answers = {} if details.get("answers") is None else details["answers"]
                    fields.append((answers, (dict,)))
                    for k, t in (("input_sha256", text), ("labels", (int,))):
                        rows = answers.get(k, []) if isinstance(answers, dict) else []
                        fields += [(rows, (list,))] + [(v, t) for v in (rows if isinstance(rows, list) else [])]
    if not all(isinstance(v, t) and not isinstance(v, bool) for v, t in fields):
        raise EvidenceError(f"The report {path} lacks fields wmark writes or holds them with the wrong type: it was "
                            "edited (and its digest recomputed) or written by another tool.")


def _test_from_dict(doc: dict[str, Any]) -> TestResult:
    return TestResult(name=doc["name"], evidence_of=doc["evidence_of"], null=doc.get("null", {}),
                      log10_p=float(doc["log10_p"]), queries=int(doc["queries"]), matches=int(doc["matches"]),
                      abstentions=int(doc.get("abstentions", 0)), method=doc.get("method", ""),
                      trajectory=list(doc.get("trajectory", [])), details=dict(doc.get("details", {})),
                      weight=float(doc.get("weight", 1.0)))


@dataclass(frozen=True)
class _Record:
    """The recorded answers by input digest (labels, and scores where the report holds them) and their source."""

    labels: dict[str, int]
    source: str
    scores: dict[str, list[float] | None] = field(default_factory=dict)
    plan: dict[str, Any] | None = None

    @property
    def has_scores(self) -> bool:
        return any(row is not None for row in self.scores.values())


def _answers_for(doc: dict[str, Any], report: Path, transcript: PathLike | None,
                 checks: list[str]) -> _Record | None:
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
        return _Record(labels={d: int(v) for d, v in zip(digests, labels)}, source=f"the report {report.name}",
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
    return _Record(labels=transcript_answers(path), source=f"the transcript {path.name}", plan=transcript_plan(path))


def not_recheckable(test: dict[str, Any], *, has_record: bool, has_scores: bool = False) -> str:
    """Why a test (as a report holds it) cannot be recomputed here; empty when it can. ``has_scores``: the
    record holds the suspect's scores (a model file read with them), so a test that read them can be replayed."""
    details = test.get("details", {})
    if test["name"] == WHITEBOX:
        return "" if recorded_inputs(details) else "not re-checkable here: the report does not record the bits read"
    if test["name"] not in RECHECKABLE:
        return "not re-checkable here"
    if not has_record:
        return "not re-checkable: the report records neither its answers nor a transcript"
    if test["name"] == TIEBREAK and "files" not in details:
        return "not re-checkable here: the report does not name the rule and served model files"
    if test["name"] == TIEBREAK and details.get("read") != "labels" and not has_scores:
        return "not re-checkable here: the test read scores the record does not hold"
    return ""


def _replay_tiebreak(*, key: Key, replay: ReplaySuspect, files: dict[str, Any], overrides: Mapping[str, PathLike],
                     checks: list[str], alpha: float, share: float, read: str) -> tuple[TestResult, dict[str, Any]]:
    """The tie-break test on the committed inputs, replayed from the record with the owner's rule and served model,
    reading the suspect as the report says it was read (``read``: ``labels`` or its probabilities); and the test's
    plan entry (:meth:`~wmark.schemes.tiebreak.TieBreakTest.plan`)."""
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
                                        use_scores=read != "labels")
    return test.run(replay, alpha=alpha, share=share), test.plan()


_VERDICT_FIELDS = ("kind", "status", "queries", "matches", "null", "correction")
_TEST_FIELDS = {"name": "", "evidence_of": "", "null": {}, "queries": 0, "matches": 0, "abstentions": 0}


def _differences(reported: dict[str, Any], recomputed: dict[str, Any]) -> list[str]:
    """The conclusions a report states beside its decision and log10 p (the verdict's kind, status, counts and
    null, the p-value, each test's counts, null and evidence curve) whose recomputed value differs, by field name."""
    recomputed = json.loads(json.dumps(recomputed))  # as the report holds it: lists, not tuples
    out = [name for name in _VERDICT_FIELDS if reported.get(name) != recomputed[name]]
    if not math.isclose(float(reported.get("p_value", -1.0)), recomputed["p_value"], rel_tol=1e-6):
        out.append("p_value")
    for i, (test, again) in enumerate(zip(reported["tests"], recomputed["tests"])):
        out += [f"tests[{i}].{name}" for name, default in _TEST_FIELDS.items() if test.get(name, default) != again[name]]
        if abs(float(test.get("adjusted_log10_p", test["log10_p"]))
               - again.get("adjusted_log10_p", again["log10_p"])) > TOLERANCE:
            out.append(f"tests[{i}].adjusted_log10_p")
        trajectory = test.get("trajectory", [])
        if len(trajectory) != len(again["trajectory"]) or any(
                abs(a - b) > TOLERANCE for a, b in zip(trajectory, again["trajectory"])):
            out.append(f"tests[{i}].trajectory")
    return out


def _replay(test: dict[str, Any], *, record: _Record, key: Key, verdict: dict[str, Any],
            owner_files: Mapping[str, PathLike], checks: list[str], report: Path) -> TestResult:
    """A black-box test (the trigger set, or the tie-break test) replayed from the recorded answers."""
    alpha = float(verdict["alpha"])
    replay = ReplaySuspect(record.labels, num_classes=key.num_classes, input_shape=tuple(key.input_shape),
                           description=verdict["suspect"], source=record.source, scores=record.scores)
    details = test.get("details", {})
    if test["name"] == TIEBREAK:
        redone, entry = _replay_tiebreak(key=key, replay=replay, files=details["files"], overrides=owner_files,
                                         checks=checks, alpha=alpha, share=float(details.get("alpha_share", 1.0)),
                                         read=str(details.get("read", "labels")))
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


def recheck(*, report: PathLike, key: PathLike | Key, transcript: PathLike | None = None,
            signer_key: PathLike | None = None, owner_files: Mapping[str, PathLike] | None = None,
            model_files: Mapping[str, PathLike] | None = None) -> Recheck:
    """Recompute a report's verdict from the revealed key and the recorded answers, without the suspect.

    Args:
        report: The evidence report (its JSON twin, or the HTML next to it).
        key: The revealed key file (or a loaded key).
        transcript: The transcript the report names (default: the path it records, or that name next to it).
        signer_key: The owner's public key: the report's signature ``R.json.sig`` must then verify.
        owner_files: The tie-break test's ``rule`` and ``served`` model files, where they are not at the paths the
            report names (their SHA-256 must match the report's).
        model_files: For a white-box test, optionally: the ``suspect``, ``reference`` and (where the verdict was
            aligned to one) ``anchor`` files, whose SHA-256 must be the report's; the alignment and the reading are
            then re-run and must give the bits the report records (:mod:`wmark.whitebox.recheck`).

    Raises:
        EvidenceError: If the report's content digest or signature fails, the transcript's digests differ, the
            key's commitment is not the report's, the report shows another owner or public parameters than the key,
            a trigger's answer is missing, or a white-box record is not as many bits as the key's payload, or
            not what its files read (exit 2).
        UsageError: If a file the report names is missing, or ``transcript``, ``owner_files`` or ``model_files`` is
            given for a report with no transcript, no tie-break test or no white-box test (or ``model_files`` lacks
            the suspect, the reference, or the anchor the verdict was aligned to).
    """
    from wmark.report import report_text

    path, doc = _load_report(report)
    checks: list[str] = []
    integrity = doc.get("integrity")
    body = dict(doc, integrity={k: v for k, v in integrity.items() if k != "content_sha256"}) if isinstance(
        integrity, dict) else doc
    if not isinstance(integrity, dict) or integrity.get("content_sha256") != canonical_sha256(body):
        raise EvidenceError(f"The report {path} does not match its own content digest: it was edited after it was "
                            "written.")
    if path.read_text(encoding="utf-8") != report_text(doc):
        raise EvidenceError(f"The report {path} is not byte for byte the text wmark wrote for its content: it was "
                            "altered.")
    _check_structure(path, doc)
    checks.append("report content digest")
    if signer_key is not None:
        info = verify_file(path=path, public_key=signer_key)
        checks.append(f"report signature by {info.signer}")
    elif signature_path(path).is_file():
        checks.append("report signature present but not checked (no signer key given)")
    k = key if isinstance(key, Key) else load_key(key)
    committed = doc.get("key", {}).get("commitment")
    if k.commitment() != committed or doc["verdict"].get("key_commitment") != committed:
        raise EvidenceError(f"The revealed key's commitment {k.commitment()[:16]}... is not the one the report was made "
                            f"with ({str(committed)[:16]}...).")
    if (doc["key"].get("public") != k.public_params() or doc["key"].get("fingerprint") != k.fingerprint()
            or doc["verdict"].get("owner") != k.owner):
        raise EvidenceError(f"The report {path} shows another owner, fingerprint or public parameters than the revealed "
                            "key it names by commitment: it was edited.")
    checks.append("key commitment")
    verdict = doc["verdict"]
    if owner_files and not any(t["name"] == TIEBREAK for t in verdict["tests"]):
        raise UsageError(f"The report {path} has no tie-break test, so its rule and served model files do not apply; "
                         "drop --rule and --served.")
    whitebox = next((t for t in verdict["tests"] if t["name"] == WHITEBOX), None)
    if model_files and whitebox is None:
        raise UsageError(f"The report {path} has no white-box test, so model files do not apply; drop --suspect, "
                         "--reference and --anchor.")
    if whitebox is not None:
        check_model_files(whitebox.get("details", {}), model_files or {}, path)
    alpha = float(verdict["alpha"])
    tests: list[TestResult] = []
    rows: list[dict[str, Any]] = []
    record = _answers_for(doc, path, transcript, checks)
    _check_planned_tests(record, verdict, path)
    detail_differences: list[str] = []
    for i, test in enumerate(verdict["tests"]):
        original = _test_from_dict(test)
        why = not_recheckable(test, has_record=record is not None, has_scores=record is not None and record.has_scores)
        if why:
            tests.append(original)
            rows.append({"name": test["name"], "rechecked": False, "original_log10_p": original.log10_p,
                         "recomputed_log10_p": None, "note": f"{why}: its p-value is taken from the report, not recomputed"})
            continue
        if test["name"] == WHITEBOX:
            redone, source = recheck_weights(key=k, test=test, alpha=alpha, report=path, files=model_files or {},
                                             checks=checks)
            detail_differences += weights_differences(i, test, redone)
        else:
            assert record is not None
            redone, source = _replay(test, record=record, key=k, verdict=verdict, owner_files=owner_files or {},
                                     checks=checks, report=path), record.source
        redone.weight = original.weight
        tests.append(redone)
        rows.append({"name": test["name"], "rechecked": True, "original_log10_p": original.log10_p,
                     "recomputed_log10_p": _finite(redone.log10_p), "queries": redone.queries,
                     "matches": redone.matches, "answers_from": source,
                     "unit": "bits" if test["name"] == WHITEBOX else "answers"})
    again = decide(key=k, tests=tests, alpha=alpha, suspect=verdict["suspect"])
    original_doc = {"decision": verdict["decision"], "log10_p": float(verdict["log10_p"])}
    recomputed_doc = {"decision": again.decision, "log10_p": _finite(again.log10_p)}
    same_tests = all(abs(r["original_log10_p"] - r["recomputed_log10_p"]) <= TOLERANCE for r in rows if r["rechecked"])
    same = (same_tests and again.decision == verdict["decision"]
            and abs(_finite(again.log10_p) - float(verdict["log10_p"])) <= TOLERANCE)
    unchecked = [r["name"] for r in rows if not r["rechecked"]]
    differing = _differences(verdict, again.to_dict()) + detail_differences
    if not same:
        status = "different"
        message = (f"The recomputed verdict differs: {again.decision} at log10 p = {_finite(again.log10_p):.6f}, the "
                   f"report says {verdict['decision']} at {float(verdict['log10_p']):.6f}.")
    elif differing:
        status = "different"
        message = (f"The recomputed verdict differs from the report in {', '.join(differing)}, though its decision and "
                   "log10 p are the same.")
    elif unchecked:
        status = "partial"
        message = (f"The re-checkable tests match, but {', '.join(unchecked)} cannot be recomputed here, so the verdict "
                   "is not confirmed.")
    else:
        status = "same"
        message = (f"Same verdict: {again.decision} at log10 p = {_finite(again.log10_p):.6f}, recomputed from the "
                   "revealed key and the recorded answers.")
    return Recheck(status=status, message=message, original=original_doc, recomputed=recomputed_doc, tests=rows,
                   checks=checks)
