"""Re-checking a white-box verdict from its report and the revealed key, without the suspect's weights.

A white-box verdict is the exact Binomial(T, 1/2) tail of how many of the key's T payload bits the suspect's
aligned weights read (:func:`wmark.whitebox.verify.weights_test_result`). Reading the bits needs the
suspect's weights, so the report records what the verdict is computed from that a third party cannot
recompute without them: the bits read (``bits_read``, in projection-row order), the number of candidate
tensors tried (the Bonferroni factor), whether the alignment went to an anchor, and the SHA-256 of the
reference, suspect and anchor files. :func:`recheck_weights` recomputes the rest from the revealed key with
the verifier's own code: the payload bits and the projection row that carries each
(:func:`wmark.schemes.weights.payload_bits`), the matches, the exact tail, the null; and
:func:`wmark.recheck.recheck` the decision at alpha. Given the reference and suspect files (and the anchor
where the verdict used one) it also re-runs the alignment and the reading: a file whose SHA-256 is not the
report's, or a bit read otherwise than the report records, is tampering.

Why the report may hold the bits read: they are the signs of the suspect's weights under the key's secret
projection, so they say nothing the suspect's weights do not already hold, and nothing of the secret. The
payload they match on a copy is a key-derived pad (its own HMAC purpose) XOR the key's public message, a
one-way function of the secret: knowing it gives neither the secret nor the projection (needed to read,
remove or forge the mark) nor the triggers. Which bits match the payload is visible only once the key is
revealed, and the owner reveals the key for a re-check anyway; the decoded message, which white-box reports
always held, tells as much about a copy's payload.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.evidence import TestResult
from wmark.keys import Key
from wmark.schemes.weights import payload_bits, scheme_params
from wmark.signing import EvidenceError, file_sha256

PathLike = str | os.PathLike[str]
WHITEBOX = "weights"
MODEL_ROLES = ("suspect", "reference", "anchor")
TOLERANCE = 1e-9
# The details weights_test_result computes from its inputs; the rest (layers found, alignment quality) are
# carried over from the report, since only the suspect's weights could recompute them.
_RECOMPUTED = ("mode", "bits", "bit_error_rate", "log10_p_uncorrected", "candidates", "aligned_to",
               "decoded_message", "bits_read")
# Recomputed details a report states, compared with their recomputed values (besides the counts and the p-value).
_COMPARED = ("bits", "bit_error_rate", "decoded_message")
# What a re-read of the files must reproduce exactly: the bits, the Bonferroni factor and the tensor read.
_REREAD = (("bits_read", "reads {n} of its bits otherwise than the report records"),
           ("candidates", "has {again} candidate tensors where the report records {recorded}"),
           ("layer_found", "reads its bits from tensor {again!r} where the report names {recorded!r}"))


def recorded_inputs(details: Mapping[str, Any]) -> bool:
    """Whether a white-box test's details record what a re-check needs (an older wmark recorded no bits)."""
    return "bits_read" in details


def check_model_files(details: Mapping[str, Any], files: Mapping[str, PathLike], report: Path) -> None:
    """Refuse model files that cannot re-read the report's white-box test: the suspect without the reference (or
    the reverse), an anchor the verdict did not align to, or none where it did."""
    if not files:
        return
    if not recorded_inputs(details):
        raise UsageError(f"The report {report} records no bits read from the suspect (an older wmark), so there is "
                         "nothing to compare its files with; rerun `wmark verify file --whitebox` on them instead.")
    if not {"suspect", "reference"} <= set(files):
        raise UsageError("Re-reading a white-box verdict needs both the suspect and the reference file; pass "
                         "--suspect and --reference (and --anchor where the report aligned to one).")
    anchored = details.get("aligned_to") == "anchor"
    if anchored and "anchor" not in files:
        raise UsageError(f"The report {report} was aligned to an anchor (the unmarked base model); pass it with "
                         "--anchor to re-read the files.")
    if not anchored and "anchor" in files:
        raise UsageError(f"The report {report} was aligned to the reference, not to an anchor, so an anchor does not "
                         "apply; drop --anchor.")


def recheck_weights(*, key: Key, test: Mapping[str, Any], alpha: float, report: Path,
                    files: Mapping[str, PathLike], checks: list[str]) -> tuple[TestResult, str]:
    """The white-box test recomputed from the revealed key and the bits the report records, re-reading ``files``
    (``suspect``, ``reference``, ``anchor``) first where they are given.

    Returns:
        The recomputed test, and where its bits came from (for the re-check's output).

    Raises:
        EvidenceError: If the recorded bits are malformed or not as many as the key's payload, a file's SHA-256 is
            not the one the report names, or the files read other bits than the report records (tampered).
        UsageError: If a given file does not exist.
    """
    from wmark.whitebox.verify import NOT_EXACT_WHY, bits_from_text, weights_test_result

    details = test["details"]
    text, candidates = details.get("bits_read"), details.get("candidates")
    # the form names the null's stated reason when not aligned to an anchor: another would fail to be looked up
    if (not isinstance(text, str) or not re.fullmatch(r"[01-]*", text) or isinstance(candidates, bool)
            or not isinstance(candidates, int) or candidates < 1 or details.get("form", "chain") not in NOT_EXACT_WHY
            or details.get("aligned_to") not in ("anchor", "reference") or not isinstance(details.get("files"), dict)):
        raise EvidenceError(f"The report {report} holds its white-box test's bits read, candidate count, form or files "
                            "with the wrong type: it was edited (and its digest recomputed) or written by another tool.")
    bits = int(scheme_params(key)["bits"])
    if len(text) != bits:
        raise EvidenceError(f"The report {report} records {len(text)} bits read, but the revealed key's payload has "
                            f"{bits}: the record is not of this key's verification, or was altered.")
    source = f"the bits read that the report {report.name} records"
    if files:
        _reread(key=key, details=details, alpha=alpha, files=files, checks=checks)
        source = "the suspect file, re-read: the bits the report records"
    got = bits_from_text(text)
    matches = int(np.sum(got == payload_bits(key)))
    kept = {k: v for k, v in details.items() if k not in _RECOMPUTED}
    return weights_test_result(key=key, matches=matches, bits=bits, candidates=candidates, got=got,
                               exact=details["aligned_to"] == "anchor", details=kept), source


def weights_differences(index: int, reported: Mapping[str, Any], redone: TestResult) -> list[str]:
    """The recomputed details of a white-box test (bit count, error rate, decoded message, uncorrected p-value,
    method) that differ from what the report states, by field name."""
    details = reported.get("details", {})
    out = [f"tests[{index}].details.{k}" for k in _COMPARED if details.get(k) != redone.details[k]]
    uncorrected = details.get("log10_p_uncorrected")
    if not isinstance(uncorrected, (int, float)) or not math.isclose(
            float(uncorrected), redone.details["log10_p_uncorrected"], rel_tol=0.0, abs_tol=TOLERANCE):
        out.append(f"tests[{index}].details.log10_p_uncorrected")
    if reported.get("method") != redone.method:
        out.append(f"tests[{index}].method")
    return out


def _reread(*, key: Key, details: Mapping[str, Any], alpha: float, files: Mapping[str, PathLike],
            checks: list[str]) -> None:
    """Re-run the alignment and reading on the files, after checking each is the one the report names."""
    from wmark.whitebox.verify import verify_whitebox

    recorded = details["files"]
    for role in MODEL_ROLES:
        if role not in files:
            continue
        p = Path(files[role])
        if not p.is_file():
            raise UsageError(f"The {role} file {p} does not exist; pass the one the report names.")
        want = recorded.get(role)
        if not isinstance(want, dict) or file_sha256(p) != want.get("sha256"):
            raise EvidenceError(f"The {role} file {p} is not the one the report names (its SHA-256 differs): it is "
                                "another file, or the report was altered.")
    again = verify_whitebox(key=key, reference=files["reference"], suspect=files["suspect"], alpha=alpha,
                            anchor=files.get("anchor"), chain=details.get("chain")).tests[0].details
    for name, why in _REREAD:
        if again.get(name) != details.get(name):
            n = sum(a != b for a, b in zip(str(again.get(name)), str(details.get(name))))
            raise EvidenceError("Re-read from the files the report names, the suspect "
                                + why.format(n=n, again=again.get(name), recorded=details.get(name))
                                + ": the record was altered.")
    checks.append("white-box files SHA-256 and the bits re-read from them")
