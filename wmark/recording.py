"""Recording, while verifying, what a re-check of the verdict needs besides the key: the suspect's answers and
the tie-break test's owner files.

A verdict on a model file can be recomputed without the suspect only if the report holds the answer to every
input asked (an API's answers are in its transcript instead). :class:`RecordingSuspect` passes the verifier's
queries through and records each input's digest (:func:`batch_sha256`, the transcript's digest, by which a
re-check looks the answers up) with the answer, and the scores where the suspect gives them.
:func:`tiebreak_files` and :func:`record_tiebreak_files` name the rule and served model a committed-input
tie-break test ran with, by path and SHA-256, so a re-check can replay it with the same files.

The verifier's side (:mod:`wmark.api`, :mod:`wmark.remote`, the CLI) writes with these; the re-checker's side
reads them back (:mod:`wmark.replay`, :mod:`wmark.recheck`). They live apart from the re-check so that
verifying imports none of it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from wmark.evidence import Verdict
from wmark.signing import file_sha256
from wmark.suspects.base import Answers, Suspect
from wmark.text import is_text_array
from wmark.transcript import input_sha256

PathLike = str | os.PathLike[str]
TIEBREAK = "api-tiebreak"


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
