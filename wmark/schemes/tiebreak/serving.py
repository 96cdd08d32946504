"""The marked API: the served model behind the keyed tie-breaking head (a :class:`~wmark.suspects.Suspect`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm

from wmark.errors import UsageError
from wmark.keys import Key
from wmark.models import PenultimateFeaturizer
from wmark.schemes.querylog import QueryLog
from wmark.schemes.tiebreak.inputs import served_scores
from wmark.schemes.tiebreak.rule import MAX_BETA, TieBreakRule, check_beta, top_pairs
from wmark.schemes.trigger_set import SCHEME as TRIGGER_SCHEME
from wmark.schemes.trigger_set import generate_triggers
from wmark.suspects.base import Answers, Suspect
from wmark.suspects.local import LocalSuspect
from wmark.text import TextInputs, check_tokenizer

BETA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))
COST_CONFIDENCE = 0.9


class KeyTriggers:
    """Recognises the key's own trigger inputs, exactly as a verifier sends them.

    The keyed shift grows with an input's distance from the owner's data, and trigger images lie far from it,
    so without this the marked API would change most of its own trigger answers and an owner checking the
    trigger set through their API would find nothing. Answering them unshifted changes no answer to any
    other input: a client needs the key to send one, so the mark a thief can learn and the null are the same.

    Args:
        key: The owner's key (one without a trigger set recognises nothing).
        text: The rule's tokenization, for a text key.
    """

    def __init__(self, key: Key, text: TextInputs | None = None) -> None:
        self.texts: frozenset[str] = frozenset()
        self.rows: frozenset[bytes] = frozenset()
        self.sums: frozenset[float] = frozenset()
        if not key.schemes.get(TRIGGER_SCHEME):
            return
        triggers = generate_triggers(key, tokenizer=None if text is None else text.tokenizer)
        if triggers.texts is not None:
            self.texts = frozenset(triggers.texts)
            return
        flat = np.ascontiguousarray(triggers.inputs.numpy().reshape(len(triggers), -1), dtype=np.float32)
        self.rows = frozenset(row.tobytes() for row in flat)
        self.sums = frozenset(flat.sum(axis=1, dtype=np.float64).tolist())

    def mask(self, x: np.ndarray) -> np.ndarray:
        """True where a row of ``x`` (the rule's inputs: float32 rows or strings) is one of the key's triggers."""
        if self.texts:
            return np.fromiter((str(t) in self.texts for t in x.reshape(-1)), dtype=bool, count=x.size)
        out = np.zeros(len(x), dtype=bool)
        if not self.rows or x.dtype != np.float32 or len(x) == 0:
            return out
        flat = np.ascontiguousarray(x.reshape(len(x), -1))
        # a row sum is a cheap exact filter; only the few rows it lets through are compared in full
        for i, total in enumerate(flat.sum(axis=1, dtype=np.float64).tolist()):
            if total in self.sums:
                out[i] = flat[i].tobytes() in self.rows
        return out


class TieBreakAPI:
    """A serving wrapper that shifts every answer by the keyed head (a :class:`Suspect` itself).

    The key's own trigger inputs are the exception: they are answered as the served model answers them
    (:class:`KeyTriggers`), so the owner's trigger-set check through this API finds what the model learnt.

    For a text key it takes arrays of strings, as the served text classifier does (a
    :class:`~wmark.suspects.LocalSuspect` with ``text=``); the shift is read from the served model's penultimate
    features of the tokenized strings, from the same forward pass as its answer (or, for a rule of the public
    encoder's features, from that encoder's own forward pass), and the log keeps the near-tie strings themselves.

    Args:
        key: The owner's key.
        backend: The served model; it must expose scores.
        rule: The tie-break rule built under ``key`` from this served model.
        beta: Scale of the keyed log-probability shift (the accuracy cost grows with it); default the rule's
            (``DEFAULT_BETA`` unless the owner chose another when building it).
        expose_scores: Return the shifted scores, or labels only.
        log: Where to record each client's near-tie inputs (:class:`~wmark.schemes.querylog.TieBreakLog`), for
            :func:`tiebreak_log_test`; None keeps no state.
        client: Whose queries these are (see :meth:`for_client`).
        triggers: The key's trigger inputs, answered unshifted (:class:`KeyTriggers`; built from the key when
            None).
    """

    answers_carry_a_mark = True  # refused where the unmarked served model belongs (suspects.base.refuse_marked)

    def __init__(self, *, key: Key, backend: Suspect, rule: TieBreakRule, beta: float | None = None,
                 expose_scores: bool = True, log: QueryLog | None = None, client: str = "anonymous",
                 triggers: KeyTriggers | None = None) -> None:
        if rule.commitment != key.commitment():
            raise UsageError("The tie-break rule was built under another key; build it with the serving key.")
        if backend.num_classes is not None and backend.num_classes != key.num_classes:
            raise UsageError(f"The served model has {backend.num_classes} classes but the key {key.num_classes}; "
                             "serve the model the key was made for.")
        beta = rule.beta if beta is None else beta
        if not check_beta(beta):
            raise UsageError(f"beta must be above 0 and at most {MAX_BETA:g}, got {beta}.")
        if log is not None and log.commitment != key.commitment():
            raise UsageError(f"The query log {log.path} belongs to another key; open a log under the serving key.")
        if log is not None and log.mark != "tiebreak":
            raise UsageError(f"The query log {log.path} belongs to the {log.mark} mark; give the tie-break mark its "
                             "own log.")
        if log is not None:
            log.bind_rule(rule.served_digest)
        if (rule.text is not None) != (key.kind == "text"):
            raise UsageError(f"The tie-break rule is for {'text' if rule.text is not None else 'image'} inputs, the "
                             f"key for {key.kind} inputs; build the rule under the serving key.")
        served_text = getattr(backend, "text", None)
        if key.kind == "text" and served_text is not None:
            assert key.modality is not None
            check_tokenizer(key.modality, served_text.tokenizer)
            if served_text.max_length != int(key.modality["max_length"]):
                raise UsageError(f"The served model takes {served_text.max_length} tokens, the key "
                                 f"{key.modality['max_length']}; serve it with the key's maximum length.")
        self.key, self.backend, self.rule = key, backend, rule
        self.beta, self.expose_scores = float(beta), expose_scores
        self.log, self.client = log, client
        self.triggers = KeyTriggers(key, rule.text) if triggers is None else triggers
        self.num_classes = key.num_classes
        self.input_shape = tuple(key.input_shape)
        self.description = f"tie-break-marked {backend.description}"

    def for_client(self, client: str) -> TieBreakAPI:
        """The same API answering (and logging) as ``client``."""
        return TieBreakAPI(key=self.key, backend=self.backend, rule=self.rule, beta=self.beta,
                           expose_scores=self.expose_scores, log=self.log, client=client, triggers=self.triggers)

    def query(self, inputs: np.ndarray) -> Answers:
        x, scores, shifts = self._scores_and_shifts(inputs)
        if self.log is not None and len(x):
            self.log.record_near_ties(self.client, x, top_pairs(scores)[0])
        shifts[self.triggers.mask(x)] = 0.0
        probs = _shifted(scores, shifts, self.beta)
        return Answers(labels=np.argmax(probs, axis=1), scores=probs if self.expose_scores else None)

    def _scores_and_shifts(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inputs (float32, or strings for a text key), the served scores and the keyed shifts: from one forward
        pass when the rule reads the backend model's own penultimate features (a local model), else from the
        backend and the featurizer."""
        feat, backend = self.rule.featurizer, self.backend
        x = self.rule.inputs(inputs)
        if x.ndim > 1 and x.shape[1:] != self.input_shape:
            raise UsageError(f"The API takes inputs shaped {self.input_shape}, got {x.shape[1:]}.")
        if len(x) == 0:  # no forward pass: a tokenizer fails on no text, the featurizer has no features to give
            return x, np.zeros((0, self.num_classes)), np.zeros((0, self.num_classes))
        if (isinstance(feat, PenultimateFeaturizer) and isinstance(backend, LocalSuspect) and backend.expose_scores
                and feat.model is backend.model):
            answers, raw = backend.query_with_features(x, feat)
            assert answers.scores is not None
            return x, np.array(answers.scores, dtype=np.float64), self.rule.shifts_of(self.rule.whiten(raw))
        return x, served_scores(backend, x), self.rule.shifts(x)


def _shifted(scores: np.ndarray, shifts: np.ndarray, beta: float) -> np.ndarray:
    logits = np.log(np.maximum(scores, 1e-300)) + beta * shifts
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def accuracy_cost(*, api: TieBreakAPI, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Honest users' cost of the marked API at its own scale: :func:`accuracy_costs` at ``api.beta``."""
    return accuracy_costs(api=api, x=x, y=y, betas=(api.beta,))[0]


def accuracy_costs(*, api: TieBreakAPI, x: np.ndarray, y: np.ndarray,
                   betas: Sequence[float] = BETA_GRID) -> list[dict[str, Any]]:
    """Honest users' cost of the marked API at each scale in ``betas``, from one forward pass (nothing is logged).

    Per scale: ``beta``, ``inputs`` (how many were scored), the served and marked labels' accuracy on ``y``
    (``served_accuracy``, ``api_accuracy``), ``accuracy_cost_pp`` (their difference in points), ``cost_se_pp`` (its
    standard error: the paired difference of served and marked correctness, so that a real difference between
    scales can be told from a small test set's noise) and ``changed_fraction`` (answers the mark changed).
    """
    x, scores, shifts = api._scores_and_shifts(x)
    shifts[api.triggers.mask(x)] = 0.0
    plain, y = np.argmax(scores, axis=1), np.asarray(y)
    out = []
    for beta in betas:
        if not check_beta(beta):
            raise UsageError(f"beta must be above 0 and at most {MAX_BETA:g}, got {beta}.")
        marked = np.argmax(_shifted(scores, shifts, float(beta)), axis=1)
        lost = (plain == y).astype(np.float64) - (marked == y)
        out.append({"beta": float(beta), "inputs": len(y), "served_accuracy": float((plain == y).mean()),
                    "api_accuracy": float((marked == y).mean()), "accuracy_cost_pp": 100.0 * float(lost.mean()),
                    "cost_se_pp": 100.0 * float(lost.std(ddof=1) / np.sqrt(len(lost))) if len(lost) > 1 else 0.0,
                    "changed_fraction": float((marked != plain).mean())})
    return out


def largest_beta_within(costs: Sequence[dict[str, Any]], max_cost_pp: float, *,
                        confidence: float = COST_CONFIDENCE) -> dict[str, Any] | None:
    """The entry of :func:`accuracy_costs` with the largest scale whose cost, and every smaller scale's, is at most
    ``max_cost_pp`` with one-sided ``confidence`` (None when even the smallest fails).

    A scale passes when its measured cost plus ``z`` standard errors (``z`` the normal quantile of
    ``confidence``) is at most the target: the largest scale whose measured cost merely falls under the target
    costs more than that on new inputs about half the time, and more often still because it is the largest of
    several. Every smaller scale must pass too, so a scale that dips under by noise above one that does not is
    never chosen. ``confidence=0.5`` compares the measured costs themselves. The standard error is taken as at
    least one answer's worth (100 / inputs points), since a sample in which no answer changed bounds nothing.

    Raises:
        UsageError: If ``confidence`` is not in [0.5, 1) or ``max_cost_pp`` not in (0, 100].
    """
    if not 0.5 <= confidence < 1:
        raise UsageError(f"confidence must be in [0.5, 1), got {confidence}.")
    if not 0 < max_cost_pp <= 100:
        raise UsageError(f"The cost allowed is in accuracy points, above 0 and at most 100; got {max_cost_pp}.")
    z = float(norm.ppf(confidence))
    best = None
    for entry in sorted(costs, key=lambda c: c["beta"]):
        # no answer changed is no proof of no cost: one lost answer in the inputs is the least error assumed
        se = max(entry["cost_se_pp"], 100.0 / entry["inputs"])
        if entry["accuracy_cost_pp"] + z * se > max_cost_pp:
            break
        best = entry
    return best
