"""The owner's two API-side marks, opened from files: what ``wmark serve`` serves and a simulated thief queries.

* ``tiebreak`` (:mod:`wmark.schemes.tiebreak`): every answer goes through a keyed linear head, which a
  surrogate learns as part of the task; the rule file names the served model, so only the rule is needed.
* ``flip`` (:mod:`wmark.schemes.api_mark`): a keyed fraction of answers is a keyed wrong label.

Either logs each client's queries in one :class:`~wmark.schemes.querylog.QueryLog` format, which
``wmark verify extraction`` reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from wmark.errors import UsageError
from wmark.io import read_metadata, wmark_metadata
from wmark.keys import Key
from wmark.models import load_model
from wmark.schemes.querylog import MARKS, QueryLog
from wmark.suspects.base import Suspect
from wmark.suspects.local import LocalSuspect

PathLike = str | os.PathLike[str]


@dataclass
class Served:
    """A served model and, when marked, the API that answers for it.

    Attributes:
        model: The served model.
        arch: Its architecture.
        weights: Its file.
        num_classes: Classes it answers over.
        input_shape: Shape of one input.
        answerer: The marked API (a :class:`~wmark.suspects.Suspect` with ``for_client``), or None unmarked.
        log: The query log the marked API records clients in, or None.
        mark: ``tiebreak``, ``flip`` or empty.
    """

    model: torch.nn.Module
    arch: str
    weights: str
    num_classes: int
    input_shape: tuple[int, ...]
    answerer: Any = None
    log: QueryLog | None = None
    mark: str = ""

    def to(self, device: torch.device | str) -> None:
        """Move the served model, and any other model its marked answers read (a tie-break rule's public
        encoder), to ``device``, so that the encoder does not stay behind on the CPU."""
        self.model.to(device)
        featurizer = getattr(getattr(self.answerer, "rule", None), "featurizer", None)
        other = getattr(featurizer, "model", None)
        if isinstance(other, torch.nn.Module) and other is not self.model:
            other.to(device)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def open_served(*, key: Key | None = None, mark: str | None = None, arch: str | None = None,
                weights: PathLike | None = None, rule: PathLike | None = None, beta: float | None = None,
                rate: float | None = None, candidates: str | int | None = None, log: PathLike | None = None,
                log_durability: str = "process", client: str = "anonymous") -> Served:
    """Load the served model and, with a ``mark``, wrap it in that marked API.

    Args:
        key: The owner's key (with a mark).
        mark: ``tiebreak``, ``flip`` or None (unmarked).
        arch: The served model's architecture (tie-break: only if the rule records none).
        weights: The served model file (tie-break: only if it moved since the rule was built).
        rule: Tie-break: the rule file from ``wmark tiebreak build``.
        beta: Tie-break: scale of the keyed log-probability shift (default: the rule's).
        rate: Flip: fraction of answers marked.
        candidates: Flip: candidate-set size or ``all``.
        log: Record each client's queries in this query log (created if missing).
        log_durability: ``process`` or ``fsync`` (see :class:`~wmark.schemes.querylog.QueryLog`).
        client: The client answers are logged under until ``for_client`` says otherwise.

    Raises:
        UsageError: On a parameter of the other mark, a missing key or rule, or mismatched files.
    """
    if mark is None:
        given = [name for name, value in (("key", key), ("rule", rule), ("beta", beta), ("rate", rate),
                                          ("candidates", candidates), ("log", log)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply only to a marked API; choose a mark (tiebreak or flip).")
        return _unmarked(arch=arch, weights=weights)
    if mark not in MARKS:
        raise UsageError(f"Unknown API mark {mark!r}; use tiebreak or flip.")
    if key is None:
        raise UsageError("A marked API needs the owner's key.")
    if mark == "tiebreak":
        if rate is not None or candidates is not None:
            raise UsageError("The marking rate and candidate-set size belong to the flip mark, not the tie-break mark.")
        if rule is None:
            raise UsageError("The tie-break mark serves with a rule; build one with `wmark tiebreak build`.")
        from wmark.schemes.querylog import TieBreakLog
        from wmark.schemes.tiebreak import TieBreakAPI, open_tiebreak_rule

        loaded, backend = open_tiebreak_rule(key=key, rule=rule, served=weights, arch=arch)
        opened: QueryLog | None = None if log is None else TieBreakLog(log, key=key, durability=log_durability)
        try:
            answerer: Any = TieBreakAPI(key=key, backend=backend, rule=loaded,
                                        beta=beta, log=opened, client=client)
        except BaseException:
            _discard(opened)
            raise
        return Served(model=backend.model, arch=arch or loaded.served_arch, weights=backend.description,
                      num_classes=key.num_classes, input_shape=tuple(key.input_shape), answerer=answerer, log=opened,
                      mark=mark)
    if rule is not None or beta is not None:
        raise UsageError("The rule and beta belong to the tie-break mark, not the flip mark.")
    from wmark.schemes.api_mark import DEFAULT_CANDIDATES, DEFAULT_RATE, MarkedAPI, parse_candidates
    from wmark.schemes.querylog import MarkLog

    served = _unmarked(arch=arch, weights=weights)
    if (served.num_classes, served.input_shape) != (key.num_classes, tuple(key.input_shape)):
        raise UsageError(f"The served model answers {served.num_classes} classes of inputs shaped {served.input_shape}; "
                         f"the key is for {key.num_classes} classes of {tuple(key.input_shape)}.")
    params = key.schemes.get("api-mark", {})
    rate = float(rate if rate is not None else params.get("rate", DEFAULT_RATE))
    cand = candidates if candidates is not None else params.get("candidates", DEFAULT_CANDIDATES)
    opened = None if log is None else MarkLog(log, key=key, rate=rate, candidates=parse_candidates(cand, key.num_classes),
                                        durability=log_durability)
    backend = LocalSuspect(served.model, input_shape=served.input_shape, description=served.weights,
                           expose_scores=True)
    try:
        served.answerer = MarkedAPI(key=key, backend=backend, rate=rate, candidates=cand, log=opened, client=client)
    except BaseException:
        _discard(opened)
        raise
    served.log, served.mark = opened, mark
    return served


def _discard(log: QueryLog | None) -> None:
    # a refused mark parameter (a rate out of range) must not leave the log it was checked after
    if log is not None:
        log.discard()


def _unmarked(*, arch: str | None, weights: PathLike | None) -> Served:
    if arch is None or weights is None:
        raise UsageError("Give the served model file and its architecture.")
    model, metadata = load_model(arch, weights)
    meta = wmark_metadata(metadata)
    return Served(model=model, arch=arch, weights=str(weights), num_classes=int(meta["num_classes"]),
                  input_shape=tuple(int(s) for s in meta["input_shape"]))


def answerer_for(served: Served) -> Suspect:
    """What answers queries: the marked API, or the bare model (exposing scores)."""
    if served.answerer is not None:
        return served.answerer
    from wmark.text_serving import text_inputs_of

    # an unmarked text model is asked strings, tokenized as its file records
    text = text_inputs_of(wmark_metadata(read_metadata(served.weights)))
    return LocalSuspect(served.model, input_shape=served.input_shape, description=served.weights, expose_scores=True,
                        text=text)
