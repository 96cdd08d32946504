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

This module checks the report itself (digest, text, structure, signature, key) and compares the outcome. The
answers are recorded while verifying by :mod:`wmark.recording` and replayed by :mod:`wmark.replay`.

Outcomes: ``same`` (exit 0), ``different`` or ``partial`` (exit 1: a test that cannot be recomputed here is
named, and the verdict is then not confirmed), and tampered (an :class:`~wmark.signing.EvidenceError`,
exit 2: a digest or signature fails, or the key's commitment is not the report's).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wmark.errors import UsageError
from wmark.evidence import TestResult, decide
from wmark.keys import Key, load_key
from wmark.recording import TIEBREAK, PathLike, RecordingSuspect
from wmark.replay import answers_for, check_planned_tests, replay_test
from wmark.signing import EvidenceError, signature_path, verify_file
from wmark.whitebox.recheck import (
    WHITEBOX,
    check_model_files,
    recheck_weights,
    recorded_inputs,
    weights_differences,
)

# RecordingSuspect lives in wmark.recording and is re-exported for the callers that import it from here.
__all__ = ["RECHECKABLE", "TOLERANCE", "Recheck", "RecordingSuspect", "canonical_sha256", "not_recheckable",
           "recheck"]

TOLERANCE = 1e-9
RECHECKABLE = ("trigger-set", TIEBREAK)


def canonical_sha256(doc: Any) -> str:
    """SHA-256 of a JSON document in canonical form (sorted keys, no spaces): the report's content digest."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    record = answers_for(doc, path, transcript, checks)
    check_planned_tests(record, verdict, path)
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
            redone = replay_test(test, record=record, key=k, verdict=verdict, owner_files=owner_files or {},
                                 checks=checks, report=path)
            source = record.source
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
