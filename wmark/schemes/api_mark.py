"""API-side watermarking: keyed, logged wrong answers that a surrogate trained on the API inherits.

A model served behind :class:`MarkedAPI` answers a small keyed fraction of queries with a keyed label
instead of its own top-1 (in the spirit of DAWN, Szyller et al. 2021), deterministically per input, and
records per client which queries it marked in its query log (:class:`~wmark.schemes.querylog.MarkLog`). A thief who trains a
surrogate on those answers learns some of the wrong labels; :func:`api_mark_test` asks a suspect the
logged inputs of one client and tests whether its answers follow the keyed labels.

How an answer is marked, for one input ``x`` (``h`` = SHA-256 of its float32 bytes and shape):

* **Whether.** ``u = PRF_key("api-mark/v1/mark", h)`` read as a uniform number in [0, 1); ``x`` is marked
  when ``u < rate`` (and, optionally, when the served model's top-1 probability is below
  ``max_confidence``).
* **Which label.** A candidate set ``S(x)`` computed from the served model's scores alone: the
  ``candidates`` classes ranked 2, 3, … by score (``"all"``: every class but the top-1). The answer is
  ``ℓ(x) = S(x)[j]`` with ``j`` uniform on ``range(|S(x)|)`` drawn, by rejection sampling, from a second,
  independent PRF output ``PRF_key("api-mark/v1/label", h)``.
* **Scores.** When the API exposes scores, the probabilities of the top-1 and of ``ℓ(x)`` are swapped:
  the answer stays a valid distribution with the served model's confidence profile, its argmax is
  ``ℓ(x)``, and a soft-label or top-1-with-confidence thief learns ``ℓ(x)`` as strongly as any answer.

The same input always gets the same answer, for every client, so asking twice or comparing clients
reveals nothing.

Null hypothesis and why it is exact. Let ``H0``: the suspect ``f`` was produced without access to the
marked answers (any training data, any architecture, but nothing that depends on ``ℓ``). The verifier
asks ``f`` the logged inputs ``x_1..x_n`` (a list fixed before the suspect is queried) and keeps the
*conditioned* queries, those whose answer ``f(x_i)`` lies in ``S(x_i)`` (so differs from the served
top-1). Under ``H0`` (modelling HMAC-SHA256 as a pseudo-random function), the ``ℓ(x_i)`` are independent
of each other, of the marking decisions (a separate PRF output), of ``S(x_i)`` (the served model's scores)
and of ``f``; so, conditionally on ``f`` and on which queries are conditioned, each match
``1[f(x_i) = ℓ(x_i)]`` is an independent Bernoulli(1/|S(x_i)|). The number of matches among the ``m``
conditioned queries is therefore exactly Poisson-binomial (Binomial(m, 1/k) when every ``|S| = k``), and
the p-value P(matches ≥ observed) is exact — no reference models, no calibration. A runner-up-only set
(``|S| = 1``) would carry no randomness and is refused.

Who chose the logged inputs matters: the client did, and it saw each keyed label right after asking. It
cannot change a label (each new input gets a fresh PRF output, revealed only once the input is logged,
and every marked query is logged, up to the log's per-client cap, which keeps the first ones), but it could decide *when to stop* after a run of answers that happen
to match some innocent model it wants to frame. Because each conditioned answer is a fresh
Bernoulli(≤ 1/|S|) given everything before it, the matches in log order feed a mixture e-process
(:class:`wmark.stats.MixtureEProcess`), whose p-value 1/max e-value is valid under any such stopping
(Ville's inequality). The verdict uses that anytime-valid p-value by default and reports the exact
Poisson-binomial one beside it.

Example:
    >>> import numpy as np
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME", num_classes=4, input_shape=(3,))
    >>> class Fixed:
    ...     description, num_classes, input_shape = "fixed", 4, (3,)
    ...     def query(self, x):
    ...         from wmark.suspects import Answers
    ...         s = np.tile([0.1, 0.6, 0.2, 0.1], (len(x), 1))
    ...         return Answers(labels=s.argmax(1), scores=s)
    >>> api = MarkedAPI(key=key, backend=Fixed(), rate=0.5, candidates=2)
    >>> x = np.random.default_rng(0).random((8, 3), dtype=np.float32)
    >>> bool((api.query(x).labels == api.query(x).labels).all())
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from wmark.errors import RuntimeFailure, UsageError
from wmark.evidence import TestResult, check_suspect_fits_key
from wmark.keys import Key
from wmark.schemes.querylog import MarkLog, QueryLog, input_digest
from wmark.stats import MixtureEProcess, mixture_plan
from wmark.suspects.base import Answers, Suspect
from wmark.testplan import content_sha256

SCHEME = "api-mark"
VERSION = 1
DEFAULT_RATE = 0.03
DEFAULT_CANDIDATES = "all"


def _prf_uniform(key: Key, purpose: str, digest: str) -> float:
    word = int.from_bytes(key.derive(f"{SCHEME}/v{VERSION}/{purpose}/{digest}", 8), "little")
    return word / 2.0**64


def _prf_index(key: Key, digest: str, k: int) -> int:
    """An index exactly uniform on range(k): rejection sampling over 32-bit PRF words."""
    limit = (2**32 // k) * k
    block = 0
    while True:
        raw = key.derive(f"{SCHEME}/v{VERSION}/label/{digest}#{block}", 64)
        for w in np.frombuffer(raw, dtype="<u4"):
            if int(w) < limit:
                return int(w) % k
        block += 1


def parse_candidates(spec: int | str, num_classes: int) -> int:
    """Size of the candidate set: an integer k (the k runner-up classes) or ``all`` (C − 1)."""
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return num_classes - 1
        try:
            spec = int(spec)
        except ValueError:
            raise UsageError(f"The candidate-set size must be an integer or 'all', got {spec!r}.") from None
    k = int(spec)
    if not 2 <= k <= num_classes - 1:
        raise UsageError(
            f"The candidate set needs between 2 and {num_classes - 1} classes (got {k}): one runner-up alone "
            "carries no randomness and gives no test."
        )
    return k


def candidate_set(scores: np.ndarray, k: int) -> list[int]:
    """The classes ranked 2..k+1 by score (ties broken by class index): a function of the scores only."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(c) for c in order[1:k + 1]]


@dataclass(frozen=True)
class MarkDecision:
    """What the API decided for one input."""

    digest: str
    marked: bool
    top1: int
    candidates: tuple[int, ...] = ()
    label: int = -1


def query_with_scores(backend: Suspect, inputs: np.ndarray,
                      input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ask the served model, as a marking wrapper must: return the float32 inputs, float64 scores and labels.

    Raises:
        UsageError: On inputs of another shape, or a backend that hides its scores (marks are chosen by them).
    """
    x = np.asarray(inputs, dtype=np.float32)
    if x.shape[1:] != tuple(input_shape):
        raise UsageError(f"The API takes inputs shaped {tuple(input_shape)}, got {x.shape[1:]}.")
    served = backend.query(x)
    if served.scores is None:
        raise UsageError("The served model must expose scores to the marking wrapper (marks are chosen by them); "
                         "wrap a LocalSuspect with expose_scores=True.")
    return x, np.array(served.scores, dtype=np.float64), np.array(served.labels, dtype=np.int64)


class MarkedAPI:
    """Wraps the owner's serving path (any :class:`Suspect`) and marks a keyed fraction of answers.

    It is itself a :class:`Suspect`, so anything that queries an API (an extraction attack, a client) can
    query it. Answers are logged under ``client`` (see :meth:`for_client` for several clients).

    Args:
        key: The owner's key.
        backend: The served model; must expose scores (the candidate set is ranked by them).
        rate: Fraction of inputs marked (e.g. 0.01–0.05): each one is a wrong answer for honest users.
        candidates: Candidate-set size ``k`` (the k runner-up classes) or ``"all"``.
        max_confidence: Mark only inputs whose served top-1 probability is below this (1.0: any input).
        expose_scores: Return (swapped) scores, or labels only.
        log: Where marked answers are recorded (``None``: not recorded, e.g. for offline measurements).
        client: Client id the answers are recorded under.
    """

    answers_carry_a_mark = True  # refused where the unmarked served model belongs (suspects.base.refuse_marked)

    def __init__(self, *, key: Key, backend: Suspect, rate: float = DEFAULT_RATE,
                 candidates: int | str = DEFAULT_CANDIDATES, max_confidence: float = 1.0,
                 expose_scores: bool = True, log: QueryLog | None = None, client: str = "default") -> None:
        if not 0.0 < rate < 1.0:
            raise UsageError(f"The marking rate must be in (0, 1), got {rate}.")
        if not 0.0 < max_confidence <= 1.0:
            raise UsageError(f"max_confidence must be in (0, 1], got {max_confidence}.")
        if backend.num_classes is not None and backend.num_classes != key.num_classes:
            raise UsageError(f"The key is for {key.num_classes} classes but the served model answers over "
                             f"{backend.num_classes}; use the key made for this model.")
        if log is not None and log.mark != "flip":
            raise UsageError(f"The query log {log.path} belongs to the {log.mark} mark; give the flip mark its own log.")
        self.key = key
        self.backend = backend
        self.rate = float(rate)
        self.k = parse_candidates(candidates, key.num_classes)
        self.max_confidence = float(max_confidence)
        self.expose_scores = expose_scores
        self.log = log
        self.client = client
        self.num_classes: int | None = key.num_classes
        self.input_shape: tuple[int, ...] | None = tuple(key.input_shape)
        self.description = f"marked API over {backend.description} (client {client})"

    def for_client(self, client: str) -> MarkedAPI:
        """The same API, logging under another client id."""
        other = MarkedAPI(key=self.key, backend=self.backend, rate=self.rate, candidates=self.k,
                          max_confidence=self.max_confidence, expose_scores=self.expose_scores, log=self.log,
                          client=client)
        return other

    def decide(self, inputs: np.ndarray, scores: np.ndarray) -> list[MarkDecision]:
        """The marking decision for each input, given the served model's scores."""
        out = []
        for x, s in zip(inputs, scores):
            digest = input_digest(x)
            top1 = int(np.argmax(s))
            marked = _prf_uniform(self.key, "mark", digest) < self.rate and float(np.max(s)) < self.max_confidence
            if not marked:
                out.append(MarkDecision(digest=digest, marked=False, top1=top1))
                continue
            cands = candidate_set(s, self.k)
            label = cands[_prf_index(self.key, digest, len(cands))]
            out.append(MarkDecision(digest=digest, marked=True, top1=top1, candidates=tuple(cands), label=label))
        return out

    def query(self, inputs: np.ndarray) -> Answers:
        x, scores, labels = query_with_scores(self.backend, inputs, tuple(self.key.input_shape))
        ok = labels >= 0
        decisions = self.decide(x[ok], scores[ok])
        idx = np.flatnonzero(ok)
        for i, d in zip(idx, decisions):
            if d.marked:
                labels[i] = d.label
                scores[i, [d.top1, d.label]] = scores[i, [d.label, d.top1]]
        if self.log is not None:
            self.log.record_marks(self.client, x[ok], decisions)
        return Answers(labels=labels, scores=scores.astype(np.float32) if self.expose_scores else None)


@dataclass(frozen=True)
class ApiMarkTest:
    """:func:`api_mark_test` on one client's logged marked inputs as an :class:`~wmark.evidence.EvidenceTest`
    of weight 1: the first ``max_queries`` in log order, or only the first ``read`` (the count a transcript's plan
    bound, for a run resuming it while the API kept logging). The log is read once, when the plan or the run first
    needs it, so that the run asks exactly the records the plan binds."""

    key: Key
    log: str | os.PathLike[str]
    client: str
    max_queries: int | None = 300
    read: int | None = None
    name: str = SCHEME
    weight: float = 1.0
    null: str = ("the suspect never learned from the marked answers: among its answers inside each candidate set, "
                 "matches with the keyed labels are independent Bernoulli(1/|S|)")

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """The client's marked records the test reads: a prefix of the log, which the API only appends to.

        Raises:
            UsageError: If the log holds no marked record of the client: refused before the plan binds an empty
                stream (which a run resuming it would read again however many the client's later queries logged).
        """
        limits = [n for n in (self.max_queries, self.read) if n is not None]
        with MarkLog(self.log, key=self.key, create=False) as opened:
            records = opened.records(self.client, limit=min(limits) if limits else None)
            if not records:
                raise _no_marks(opened, self.client)
        return records

    def plan(self) -> dict[str, Any]:
        """Sequential (its p-value is 1 / max e-value over the answers in log order, statistic ``anytime``), bound to
        its e-process's mixture, its budget (``max_queries``: it cuts the stream the e-process runs over) and the
        logged records it reads, that stream: their count (``log_read``, the first ones in log order) and digest. A
        run resuming the plan with the same budget reads as many (``read``), however far the log grew since: the same
        stream. One given another budget, or whose records read before changed, needs a new transcript. A plan an
        older wmark recorded without the budget resumes on the records it bound and binds the budget from then on
        (:func:`~wmark.testplan.unbound`)."""
        stream = [f"{r['digest']}|{r['top1']}|{r['label']}|{r['candidates']}" for r in self.records]
        return {"mode": "sequential", "max_queries": self.max_queries, "eprocess": mixture_plan(),
                "log_read": len(self.records), "inputs": {"log": content_sha256(np.asarray(stream, dtype=str))}}

    def run(self, suspect: Suspect, *, alpha: float, share: float) -> TestResult:
        with MarkLog(self.log, key=self.key, create=False) as opened:
            return api_mark_test(key=self.key, suspect=suspect, log=opened, client=self.client, records=self.records)


def poisson_binomial_log10_sf(k: int, probs: Sequence[float]) -> float:
    """log10 P(X ≥ k) for X a sum of independent Bernoulli(probs[i]), exact (log-space dynamic programme)."""
    p = np.asarray(probs, dtype=np.float64)
    n = len(p)
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    if np.all(p == p[0]):
        from wmark.stats import binomial_log10_sf

        return binomial_log10_sf(k, n, float(p[0]))
    log_dist = np.full(n + 1, -np.inf)
    log_dist[0] = 0.0
    with np.errstate(divide="ignore"):
        lp, lq = np.log(p), np.log1p(-p)
    for i in range(n):
        shifted = np.concatenate([[-np.inf], log_dist[:-1] + lp[i]])
        log_dist = np.logaddexp(log_dist + lq[i], shifted)
    from scipy.special import logsumexp

    return float(min(0.0, logsumexp(log_dist[k:]))) / math.log(10.0)


def _no_marks(log: QueryLog, client: str) -> UsageError:
    known = ", ".join(sorted(log.clients())) or "none"
    return UsageError(f"The query log has no marked queries for client {client!r} (clients: {known}).")


def api_mark_test(*, key: Key, suspect: Suspect, log: QueryLog, client: str, max_queries: int | None = None,
                  batch_size: int = 256, min_answered: float = 0.5, statistic: str = "anytime",
                  records: list[dict[str, Any]] | None = None) -> TestResult:
    """Ask the suspect the logged marked inputs of one client and test its answers against the keyed labels.

    Null hypothesis (exact, see the module docstring): the suspect never learned from the marked answers,
    so among the queries it answers inside the candidate set, matches are independent Bernoulli(1/|S(x)|).

    Args:
        key: The owner's key (must be the one the log was written under).
        suspect: The model under suspicion.
        log: The flip mark's query log.
        client: Whose queries to replay (the account suspected of extraction).
        max_queries: Ask at most this many logged inputs (the first ones logged).
        batch_size: Inputs per request.
        min_answered: Below this fraction of usable answers the result is flagged inconclusive.
        statistic: ``anytime`` (default): p = 1 / max e-value of a mixture e-process over the conditioned
            answers in log order (valid whatever rule the client used to choose and stop its queries);
            ``exact``: the Poisson-binomial tail (exact for a log whose content did not adapt to the
            answers). Both are always reported in ``details``.
        records: The client's records to ask, as :meth:`~wmark.schemes.querylog.QueryLog.records` read them
            (default: read from ``log``, the first ``max_queries``): those a test plan bound, read once.

    Returns:
        A :class:`wmark.evidence.TestResult` with ``evidence_of="extracted"``.

    Raises:
        UsageError: If the log has no marks for this client, was written for other inputs, or its labels do
            not follow from this key (another key, or an edited log).
    """
    check_suspect_fits_key(key, suspect)
    if statistic not in ("anytime", "exact"):
        raise UsageError(f"Unknown statistic {statistic!r}; use anytime or exact.")
    if log.mark != "flip":
        raise UsageError(f"The query log {log.path} was written by the {log.mark} mark's API; the flip-mark test reads "
                         "the flip mark's log.")
    if tuple(log.input_shape) != tuple(key.input_shape):
        raise UsageError(f"The query log holds inputs shaped {tuple(log.input_shape)} but the key's are "
                         f"{tuple(key.input_shape)}; use the log of this model's API.")
    if records is None:
        records = log.records(client, limit=max_queries)
    if not records:
        raise _no_marks(log, client)
    for r in records:
        if input_digest(r["x"]) != r["digest"] or r["label"] != r["candidates"][_prf_index(key, r["digest"],
                                                                                        len(r["candidates"]))]:
            raise UsageError(f"The query log {log.path} does not follow from this key (edited, or written "
                             "under another key); use the original log and key.")
    x = np.stack([r["x"] for r in records])
    labels = []
    for i in range(0, len(x), batch_size):
        ans = suspect.query(x[i:i + batch_size])
        got = np.asarray(ans.labels, dtype=np.int64).reshape(-1)
        if len(got) != len(x[i:i + batch_size]):
            raise RuntimeFailure(f"The suspect answered {len(got)} labels for {len(x[i:i + batch_size])} inputs.")
        labels.append(got)
    answers = np.concatenate(labels)
    abstentions = int(np.sum(answers < 0))
    probs, outcomes, agree_top1 = [], [], 0
    for r, a in zip(records, answers):
        if a < 0:
            continue
        if a == r["top1"]:
            agree_top1 += 1
        if a in r["candidates"]:
            probs.append(1.0 / len(r["candidates"]))
            outcomes.append(int(a == r["label"]))
    matches = sum(outcomes)
    exact = poisson_binomial_log10_sf(matches, probs) if probs else 0.0
    # The client, not the verifier, decided which inputs were logged and when it stopped querying; an
    # anytime-valid e-process over the conditioned answers in log order stays valid even if that client
    # adapted its queries to the answers it saw (e.g. to frame someone else's model).
    anytime = 0.0
    if probs:
        eproc = MixtureEProcess(p0=max(probs))
        for o in outcomes:
            eproc.update(o)
        anytime = -eproc.compute()
    log10_p = anytime if statistic == "anytime" else exact
    answered = len(records) - abstentions
    inconclusive = ""
    if answered < min_answered * len(records):
        inconclusive = (f"The suspect answered only {answered} of {len(records)} marked queries; too few usable "
                        "answers to conclude about extraction.")
    sizes = sorted({len(r["candidates"]) for r in records})
    return TestResult(
        name="api-mark",
        evidence_of="extracted",
        null={
            "p0": probs[0] if probs and len(sizes) == 1 else (float(np.mean(probs)) if probs else None),
            "distribution": (f"Binomial(conditioned, 1/{sizes[0]})" if len(sizes) == 1
                             else "Poisson-binomial(1/|S(x)|) over conditioned queries"),
            "why": "the keyed label of each marked input is drawn uniformly from candidates fixed by the served "
                   "model's scores, by a PRF output independent of the marking decision and of any model that "
                   "never saw the marked answers; conditioning on the suspect answering inside the candidate "
                   "set leaves each match an independent Bernoulli(1/|S|)",
        },
        log10_p=log10_p,
        queries=len(records),
        matches=matches,
        abstentions=abstentions,
        method=("anytime-valid p = 1/max e-value of a mixture likelihood-ratio e-process over the conditioned "
                "answers in log order (Ville's inequality)" if statistic == "anytime" else
                "exact Poisson-binomial (binomial when |S| is constant) upper tail over the conditioned queries, "
                "summed in log space"),
        details={"client": client, "conditioned": len(probs), "agree_with_served_top1": agree_top1,
                 "exact_log10_p": exact, "anytime_log10_p": anytime, "statistic": statistic,
                 "candidate_sizes": sizes, "log_rate": log.rate, "inconclusive": inconclusive},
    )
