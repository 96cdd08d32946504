"""The tie-break tests: the committed-input test and the log test, and their evidence-test wrappers.

The statistic they share is in :mod:`wmark.schemes.tiebreak.statistic`; :mod:`wmark.schemes.tiebreak` says why its
null is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from wmark.distill import reference_scores
from wmark.errors import RuntimeFailure, UsageError
from wmark.evidence import TestResult, check_suspect_fits_key
from wmark.keys import Key
from wmark.schemes.querylog import QueryLog, TieBreakLog
from wmark.schemes.tiebreak.inputs import served_scores
from wmark.schemes.tiebreak.rule import (
    DEFAULT_PAIR_RATIO,
    DEFAULT_QUERIES,
    SCHEME,
    TieBreakRule,
    open_tiebreak_rule,
    pair_log_odds,
    reference_leans,
    select_verification_inputs,
    top_pairs,
)
from wmark.schemes.tiebreak.statistic import (
    LEAN_CLIP,
    _outside,
    _pair_sums,
    centres,
    expected_evidence,
    probability_leans,
    tiebreak_statistic,
    z_log10_p,
)
from wmark.suspects.base import Suspect
from wmark.testplan import content_sha256

DEFAULT_LOG_ROUNDS = 21
LOG_FIRST_ROUND = 0.05
LOG_TEST_WEIGHT = 8.0
FOLLOWED_REFERENCES = 4


def tiebreak_test(*, key: Key, rule: TieBreakRule, served: Suspect, suspect: Suspect,
                  inputs: np.ndarray | None = None, queries: int = DEFAULT_QUERIES,
                  min_ratio: float = DEFAULT_PAIR_RATIO, use_scores: bool | None = None,
                  centred: bool | None = None) -> TestResult:
    """Test whether a suspect breaks the served model's near-ties the way the keyed head does.

    Args:
        key: The owner's key (the rule must have been built under it).
        rule: The tie-break rule.
        served: The owner's *unmarked* served model (exposing scores): it picks the verification inputs and
            gives the pairs; it is never the suspect.
        suspect: The model under test (labels suffice).
        inputs: None: ask the verification inputs committed in the rule (the first ``queries`` of their
            ranking). Otherwise the owner's own held inputs, never inputs a client chose; the ``queries``
            nearest to a tie of ``served`` are asked.
        queries: How many to ask, fixed before querying.
        min_ratio: With ``inputs``, only those with ``p_b / p_a`` at least this are eligible.
        use_scores: True: when the suspect answers with probabilities, read its lean ``log(p_lo / p_hi)``
            (clipped) instead of its labels' signs; False: read labels. None (the default): probabilities for an
            image rule, labels for a text rule (:func:`reads_scores`). The null is exact either way.
        centred: Centre the evidence read on the served model's own (:func:`expected_evidence`); None (the
            default): for a text rule's label reading (:func:`centres`). The null is exact either way.

    Returns:
        A ``TestResult`` with ``evidence_of="extracted"``; ``matches`` counts answers that lean the keyed way.

    Raises:
        UsageError: On a key/rule/suspect mismatch or when no input is near a tie.
    """
    _check_rule_key(rule, key)
    check_suspect_fits_key(key, suspect)
    if queries < 1:
        raise UsageError(f"queries must be at least 1, got {queries}.")
    if inputs is None:
        if rule.verification_inputs is None:
            raise UsageError("This tie-break rule carries no committed verification inputs; pass the owner's held "
                             "inputs (holdout), or rebuild the rule with `wmark tiebreak build`.")
        xs = _owner_inputs(key, rule, rule.verification_inputs)[:queries]
        selection = f"committed in the rule: {rule.verification}"
        pair_scores = served_scores(served, xs)
    else:
        x = _owner_inputs(key, rule, inputs)
        all_scores = served_scores(served, x)
        chosen = select_verification_inputs(scores=all_scores, count=queries, min_ratio=min_ratio)
        if len(chosen) == 0:
            raise UsageError(f"None of the {len(x)} verification inputs is near a tie (p_b/p_a >= {min_ratio}); "
                             "give more held inputs from the owner's distribution.")
        xs = x[chosen]
        selection = f"nearest ties of the served model among the {len(x)} held inputs (p_b/p_a >= {min_ratio})"
        pair_scores = all_scores[chosen]
    z, info, answers, read = _ask_and_score(rule=rule, suspect=suspect, xs=xs, pair_scores=pair_scores,
                                            use_scores=reads_scores(rule, use_scores), centred=centred)
    return _result(name=SCHEME, z=z, info=info, answers=answers, read=read, rule=rule, selection=selection,
                   budget=queries, method="exact Gaussian (fixed n, owner-chosen inputs)",
                   null={"distribution": "N(0, 1)", "why": NULL_WHY})


FEW_PAIRS = ("The suspect's answers carry no evidence for the tie-break test (each class pair it answered was asked "
             "once, or its answers lean neither way), so the tie-break test has no data; ask more inputs.")
NULL_WHY = ("the keyed directions are independent standard normal vectors, independent of a suspect made without "
            "the marked answers and of the owner-chosen inputs, so the normalised projection of the suspect's "
            "pair-signed feature sums on them is exactly N(0, 1)")


def _check_rule_key(rule: TieBreakRule, key: Key) -> None:
    if rule.commitment != key.commitment():
        raise UsageError("The tie-break rule was built under another key; verify with the key that served the API.")
    if (rule.text is not None) != (key.kind == "text"):
        raise UsageError(f"The tie-break rule is for {'text' if rule.text is not None else 'image'} inputs, the key "
                         f"for {key.kind} inputs; verify with the key that served the API.")


def _owner_inputs(key: Key, rule: TieBreakRule, inputs: Any) -> np.ndarray:
    """Verification inputs as the rule takes them (strings for a text key; float32 of the key's shape)."""
    if rule.text is not None:
        return rule.inputs(inputs)
    x = rule.inputs(inputs)
    if x.shape[1:] != tuple(key.input_shape):
        raise UsageError(f"Verification inputs are shaped {x.shape[1:]}, the key's input shape is "
                         f"{tuple(key.input_shape)}.")
    return x


def _ask_and_score(*, rule: TieBreakRule, suspect: Suspect, xs: np.ndarray, pair_scores: np.ndarray,
                   use_scores: bool, centred: bool | None) -> tuple[float, dict[str, Any], np.ndarray, str]:
    _, lo, hi = top_pairs(pair_scores)
    answers, evidence, read = _ask(suspect=suspect, xs=xs, lo=lo, hi=hi, use_scores=use_scores)
    z, info = _read(rule=rule, psi=rule.features(xs), scores=pair_scores, answers=answers, evidence=evidence, read=read,
                    centred=centred)
    return z, info, answers, read


def _read(*, rule: TieBreakRule, psi: np.ndarray, scores: np.ndarray, answers: np.ndarray, evidence: np.ndarray,
          read: str, centred: bool | None) -> tuple[float, dict[str, Any]]:
    """``Z`` of the answers as read (labels or leans), centred where :func:`centres` says, with the details saying
    how; ``scores`` are the unmarked served model's on the inputs asked."""
    _, lo, hi = top_pairs(scores)
    centre = expected_evidence(scores, lo, hi, read) if centres(rule, centred, read) else None
    z, info = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers,
                                 leans=None if read == "labels" else evidence, centre=centre)
    if centre is not None:
        info["centred"] = ("each in-pair sign less the served model's expected sign in its pair" if read == "labels"
                           else "each lean less the served model's own clipped lean")
    return z, info


def _result(*, name: str, z: float, info: dict[str, Any], answers: np.ndarray, read: str, rule: TieBreakRule,
            selection: str, budget: int, method: str, null: dict[str, str],
            extra: dict[str, Any] | None = None, weight: float = 1.0) -> TestResult:
    log10_p = z_log10_p(z)
    details: dict[str, Any] = {"z": z, "components": rule.components, "skipped_leading": rule.skipped,
                               "selection": selection, "budget": int(budget), "read": read, **info, **(extra or {})}
    if info["in_pair"] == 0:
        details["inconclusive"] = "The suspect never answered either class of a near-tie; the tie-break test has no data."
    elif z == 0.0:
        # Z is 0 only when the pair sums are: the features are centred per pair, so a pair asked once adds nothing
        details["inconclusive"] = FEW_PAIRS
    return TestResult(name=name, evidence_of="extracted", null=null, log10_p=min(0.0, log10_p), queries=len(answers),
                      matches=info["agree"], abstentions=int((answers < 0).sum()), method=method, details=details,
                      weight=weight)


@dataclass(frozen=True)
class LogInputs:
    """A client's logged inputs ranked for the log test (:func:`select_log_inputs`): key-free, reusable
    across suspects.

    Attributes:
        client: Whose queries they are.
        x: The inputs, best first.
        scores: The unmarked served model's scores on them (their pairs).
        leans: The key-free lean towards each pair's smaller class that ranked them: the reference
            surrogates' mean ``log(p_lo / p_hi)``, or the served model's own without references.
        selection: How they were chosen (recorded in the test's details).
        logged: How many of the client's logged inputs were read, the first ones in log order: a test plan binds
            the count, so that a run resuming it reads the same ones however far the log has grown since.
        reference_leans: Each reference surrogate's own lean (R×n; None without references): the test's
            later rounds follow the references that call the suspect's answers best.
    """

    client: str
    x: np.ndarray
    scores: np.ndarray
    leans: np.ndarray
    selection: str
    logged: int
    reference_leans: np.ndarray | None = None


def select_log_inputs(*, key: Key, rule: TieBreakRule, served: Suspect, log: QueryLog, client: str,
                      count: int | None = None, read: int | None = None) -> LogInputs:
    """Rank ``client``'s logged inputs for :func:`tiebreak_log_test`: first those the rule's reference
    surrogates leave most open (without references, the served model's nearest ties). Key-free: it reads the
    log, the unmarked served model and the references, never the key's directions.

    Args:
        count: Keep only the best ``count`` (default all: the test's later rounds choose among the rest).
        read: Rank only the client's first ``read`` logged inputs (default all): those a transcript's test plan
            read (:attr:`LogInputs.logged`), for a run resuming it while the API kept logging.

    Raises:
        UsageError: On a key/rule mismatch, a bad count or a client with no logged inputs.
    """
    _check_rule_key(rule, key)
    if log.mark != "tiebreak":
        raise UsageError(f"The query log {log.path} was written by the {log.mark} mark's API; the tie-break log test "
                         "reads the tie-break mark's log.")
    log.check_rule(rule.served_digest)
    if count is not None and count < 1:
        raise UsageError(f"queries must be at least 1, got {count}.")
    x = _owner_inputs(key, rule, log.inputs(client, limit=read))
    scores = served_scores(served, x)
    refs = reference_scores(rule.references, x, rule.text)
    per_reference = reference_leans(scores, refs) if refs else None
    leans = per_reference.mean(axis=0) if per_reference is not None else pair_log_odds(scores, *top_pairs(scores)[1:])
    chosen = np.argsort(np.abs(leans), kind="stable")[:count]
    how = (f"most open for the rule's {len(rule.references)} reference surrogates" if rule.references
           else "nearest ties of the served model")
    queries = log.clients().get(client, {}).get("queries", 0)
    first = "" if read is None else "first "
    return LogInputs(client=client, x=x[chosen], scores=scores[chosen], leans=leans[chosen], logged=len(x),
                     selection=f"{how} among the {first}{len(x)} near-tie inputs client {client!r} asked ({queries} "
                               "queries logged)",
                     reference_leans=None if per_reference is None else per_reference[:, chosen])


def _round_sizes(queries: int, rounds: int, first_share: float) -> list[int]:
    first = max(1, int(np.ceil(first_share * queries))) if rounds > 1 else queries
    rest = np.array_split(np.arange(queries - first), rounds - 1) if rounds > 1 else []
    return [first] + [len(r) for r in rest if len(r)]


def tiebreak_log_test(*, key: Key, rule: TieBreakRule, served: Suspect, suspect: Suspect,
                      log: QueryLog | None = None, client: str | None = None, chosen: LogInputs | None = None,
                      queries: int = DEFAULT_QUERIES, rounds: int = DEFAULT_LOG_ROUNDS,
                      first_share: float = LOG_FIRST_ROUND, use_scores: bool | None = None,
                      centred: bool | None = None) -> TestResult:
    """The tie-break test on the inputs one client asked the marked API (its log), not the owner's.

    A surrogate is trained on exactly its maker's queries, so it repeats the marked answers there more
    faithfully than anywhere else. ``queries`` of
    the client's logged inputs are asked in ``rounds`` (default 21): first the ``LOG_FIRST_ROUND`` share (5 %)
    the reference surrogates leave most open (:func:`select_log_inputs`), then, in rounds of equal size,
    those where *this suspect* is predicted closest to a tie: the mean lean of the ``FOLLOWED_REFERENCES``
    (4) references whose calls agree most often with its answers so far, plus the keyed-looking lean it has
    shown (its pair sums ``v`` of the module docstring, projected on each candidate's features, scaled to
    that lean). ``Z`` is the statistic of the module docstring over every answer. ``rounds=1`` asks the first
    ``queries`` of the ranking. (Measurements of these choices: ``docs/research/tiebreak.md``.)

    Why the rounds keep the null exact: each round, and which references it follows, is chosen from the
    suspect's own earlier answers and key-free quantities (the log, the served model, the references, the
    rule's features), never from the key's directions. A suspect made without the marked answers answers
    independently of the directions, so the inputs asked and the answers are too, and given them
    ``Z ~ N(0, 1)`` exactly as for a fixed set.

    In a verdict (:func:`wmark.evidence.decide`) this test weighs ``LOG_TEST_WEIGHT`` (8) against 1 for each
    other test: it is the extraction test the logging API is built for, so weighted Holm gives it 0.8 of
    alpha next to the trigger set and the committed inputs (``p <= 0.8 alpha`` instead of ``alpha / 3``).
    The weight is fixed by the kind of test, before any answer, so the verdict's bound holds.

    The null needs one assumption the committed-input test does not: the client chose its queries without
    regard to the marked answers (a fixed dataset, as extraction attacks use). Then the logged inputs are
    independent of the key and ``Z ~ N(0, 1)`` exactly for any suspect made without the marked answers. A
    client who adapted its queries to earlier marked answers *and* knew an innocent model's answers could
    steer its log towards inputs where that model agrees with the keyed lean it had seen; the verdict
    states the assumption, and the committed-input test stands without it.

    Args:
        key: The owner's key (the rule and the log must be under it).
        rule: The tie-break rule the API served with.
        served: The owner's *unmarked* served model (exposing scores): it ranks the inputs and gives the pairs.
        suspect: The model under test (labels suffice).
        log: The API's log (with ``client``), or
        client: The API client suspected of training the suspect.
        chosen: Instead of ``log`` and ``client``: their inputs already ranked by :func:`select_log_inputs`
            (to test many suspects against one client without ranking again; keep its default, all the
            client's inputs, so that the later rounds have inputs to choose from).
        queries: How many logged inputs to ask in all, fixed before querying.
        rounds: In how many rounds to ask them (1: the ranking's first ``queries``).
        first_share: The share of ``queries`` the first round asks by the ranking alone (with ``rounds`` > 1).
        use_scores: Read probabilities when the suspect gives them (see :func:`tiebreak_test`; by default for an
            image rule only).
        centred: Centre the evidence read (see :func:`tiebreak_test`; by default for a text rule's labels).

    Raises:
        UsageError: On a key/rule/log/suspect mismatch, or a client with no logged inputs.
    """
    _check_rule_key(rule, key)
    check_suspect_fits_key(key, suspect)
    if queries < 1:
        raise UsageError(f"queries must be at least 1, got {queries}.")
    if rounds < 1:
        raise UsageError(f"rounds must be at least 1, got {rounds}.")
    if not 0 < first_share <= 1:
        raise UsageError(f"first_share must be in (0, 1], got {first_share}.")
    if chosen is None:
        if log is None or client is None:
            raise UsageError("The log test needs the API's log and the client, or their ranked inputs (chosen=).")
        chosen = select_log_inputs(key=key, rule=rule, served=served, log=log, client=client)
    budget = min(queries, len(chosen.x))
    _, lo, hi = top_pairs(chosen.scores)
    psi = rule.features(chosen.x)
    asked = np.zeros(0, dtype=np.int64)
    answers, evidence = np.zeros(0, dtype=np.int64), np.zeros(0)
    reads: list[str] = []
    sizes = _round_sizes(budget, rounds, first_share)
    for size in sizes:
        if len(asked) == 0:
            batch = np.arange(size)
        else:
            outside = _outside(answers, lo[asked], hi[asked]) if set(reads) == {"labels"} else None
            batch = _next_round(psi=psi, lo=lo, hi=hi, leans=chosen.leans, reference_leans=chosen.reference_leans,
                                asked=asked, evidence=evidence, outside=outside,
                                num_classes=key.num_classes, size=size)
        said, signs, read = _ask(suspect=suspect, xs=chosen.x[batch], lo=lo[batch], hi=hi[batch],
                                 use_scores=reads_scores(rule, use_scores))
        asked, answers = np.concatenate([asked, batch]), np.concatenate([answers, said])
        evidence = np.concatenate([evidence, signs])
        reads.append(read)
    read = reads[0] if len(set(reads)) == 1 else "labels"
    z, info = _read(rule=rule, psi=psi[asked], scores=chosen.scores[asked], answers=answers, evidence=evidence,
                    read=read, centred=centred)
    rounds_note = "" if rounds == 1 else (f"; asked in {rounds} rounds, the first {sizes[0]} "
                                          "by that ranking, the rest where the suspect's answers so far put it "
                                          "closest to a tie")
    return _result(
        name=f"{SCHEME}-log", z=z, info=info, answers=answers, read=read, rule=rule, budget=budget,
        selection=chosen.selection + rounds_note, method="exact Gaussian (fixed n, the client's logged inputs)",
        null={"distribution": "N(0, 1)", "why": NULL_WHY.replace("owner-chosen inputs", "client's inputs"),
              "assumption": "the client chose its queries without regard to the marked answers (e.g. a fixed "
                            "dataset); the committed-input tie-break test needs no such assumption"},
        extra={"client": chosen.client, "rounds": rounds}, weight=LOG_TEST_WEIGHT,
    )


def reads_scores(rule: TieBreakRule, use_scores: bool | None) -> bool:
    """Whether the tie-break tests read a suspect's probabilities (where it gives them) rather than its labels.

    ``use_scores`` when given; by default probabilities for an image rule and labels for a text rule. A
    fine-tuned text classifier is confident: its clipped lean sits at the clip wherever the task decides the
    answer and is small at the close calls where the keyed lean shows, so its labels are the stronger evidence
    (measured on MiniLM thieves: ``docs/extraction.md``); for images the two readings measured the same.
    """
    return rule.text is None if use_scores is None else use_scores


def _reading(rule: TieBreakRule, use_scores: bool | None, centred: bool | None) -> str:
    """How a tie-break test reads its answers, as its plan records it: ``scores`` or ``labels``, with ``-centred``
    where it centres them (:func:`centres`)."""
    read = "scores" if reads_scores(rule, use_scores) else "labels"
    return f"{read}-centred" if centres(rule, centred, read) else read


def _ask(*, suspect: Suspect, xs: np.ndarray, lo: np.ndarray, hi: np.ndarray,
         use_scores: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """The suspect's labels on ``xs``, its evidence per input (lean or ±1 / 0) and how it was read."""
    said = suspect.query(xs)
    answers = np.asarray(said.labels, dtype=np.int64).reshape(-1)
    if len(answers) != len(xs):
        raise RuntimeFailure(f"The suspect answered {len(answers)} labels for {len(xs)} queries.")
    leans = probability_leans(said.scores, lo, hi) if use_scores else None
    if leans is None:
        return answers, np.where(answers == lo, 1.0, np.where(answers == hi, -1.0, 0.0)), "labels"
    return answers, leans, f"probabilities: log(p_lo / p_hi) clipped at ±{LEAN_CLIP:g}"


def _next_round(*, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, leans: np.ndarray,
                reference_leans: np.ndarray | None, asked: np.ndarray, evidence: np.ndarray,
                outside: np.ndarray | None, num_classes: int, size: int) -> np.ndarray:
    """The ``size`` unasked inputs where the suspect looks closest to a tie: the key-free lean of the
    references that call its answers so far best, plus the lean those answers point to (its pair sums
    projected on each input's features)."""
    base = _closest_references(leans, reference_leans, asked=asked, evidence=evidence)
    v = _pair_sums(psi[asked], lo[asked], hi[asked], evidence, num_classes=num_classes, outside=outside)
    tilt = np.einsum("nk,nk->n", psi, v[lo] - v[hi])
    spread = float(tilt[asked].std())
    scale = float(np.abs(base[asked]).mean()) / spread if spread > 0 else 0.0
    closeness = np.abs(base + scale * tilt)
    closeness[asked] = np.inf
    return np.argsort(closeness, kind="stable")[:size]


def _closest_references(leans: np.ndarray, reference_leans: np.ndarray | None, *, asked: np.ndarray,
                        evidence: np.ndarray) -> np.ndarray:
    """The mean lean of the ``FOLLOWED_REFERENCES`` reference surrogates (at most half of them) whose calls
    agree most often with the suspect's answers so far (all of them, ``leans``, without references or answers
    in a pair)."""
    if reference_leans is None or len(reference_leans) < 2:
        return leans
    answered = asked[evidence != 0]
    if len(answered) == 0:
        return leans
    calls = np.sign(reference_leans[:, answered]) == np.sign(evidence[evidence != 0])
    keep = min(FOLLOWED_REFERENCES, len(reference_leans) // 2)
    best = np.argsort(-calls.mean(axis=1), kind="stable")[:keep]
    return reference_leans[best].mean(axis=0)


@dataclass(frozen=True)
class TieBreakTest:
    """:func:`tiebreak_test` on the rule's committed inputs (or the owner's ``inputs``) as an
    :class:`~wmark.evidence.EvidenceTest` of weight 1."""

    key: Key
    rule: TieBreakRule
    served: Suspect
    inputs: np.ndarray | None = None
    queries: int = DEFAULT_QUERIES
    use_scores: bool | None = None
    centred: bool | None = None
    name: str = SCHEME
    weight: float = 1.0
    null: str = NULL_WHY

    def plan(self) -> dict[str, Any]:
        inputs = {"rule": self.rule.content_digest}
        if self.inputs is not None:
            inputs["holdout"] = content_sha256(self.inputs)
        return {"mode": "fixed", "budget": self.queries, "inputs": inputs,
                "reads": _reading(self.rule, self.use_scores, self.centred)}

    def run(self, suspect: Suspect, *, alpha: float, share: float) -> TestResult:
        return tiebreak_test(key=self.key, rule=self.rule, served=self.served, suspect=suspect, inputs=self.inputs,
                             queries=self.queries, use_scores=self.use_scores, centred=self.centred)


@dataclass(frozen=True)
class TieBreakLogTest:
    """The log test on one client's logged inputs as an :class:`~wmark.evidence.EvidenceTest` of weight
    ``LOG_TEST_WEIGHT``; the inputs are ranked once, when the test is made (key-free).

    ``mode`` ``fixed`` (the default) asks exactly ``queries`` (default 1000) in ``rounds``
    (:func:`tiebreak_log_test`); ``sequential`` asks until the evidence reaches its share of alpha, the log runs
    out or ``queries`` (default ``SEQUENTIAL_BUDGET``, 10,000) are asked
    (:func:`~wmark.schemes.tiebreak.sequential.tiebreak_log_sequential`)."""

    key: Key
    rule: TieBreakRule
    served: Suspect
    chosen: LogInputs
    queries: int | None = None
    rounds: int = DEFAULT_LOG_ROUNDS
    mode: str = "fixed"
    use_scores: bool | None = None
    centred: bool | None = None
    name: str = f"{SCHEME}-log"
    weight: float = LOG_TEST_WEIGHT
    null: str = NULL_WHY.replace("owner-chosen inputs", "client's inputs")

    def plan(self) -> dict[str, Any]:
        # the ranked inputs, their served scores and the references' leans: the log, the served model and the
        # references fix which inputs each round asks, sequential or not; and how many of the client's logged inputs
        # (the first ones) were ranked, so that a resumed run ranks the same ones however far the log grew since
        read = {"log_read": self.chosen.logged,
                "inputs": {"rule": self.rule.content_digest,
                           "log": content_sha256(self.chosen.x, self.chosen.scores, self.chosen.leans,
                                                 self.chosen.reference_leans)},
                "reads": _reading(self.rule, self.use_scores, self.centred)}
        if self.mode == "sequential":
            from wmark.schemes.tiebreak.sequential import SEQUENTIAL_BUDGET, SEQUENTIAL_RHO, SEQUENTIAL_ROUND

            # the mixing scale and the rounds fix its e-process, and the budget the size of its last round
            return {"mode": "sequential", "max_queries": SEQUENTIAL_BUDGET if self.queries is None else self.queries,
                    "eprocess": {"rho": SEQUENTIAL_RHO, "round_size": SEQUENTIAL_ROUND}, **read}
        return {"mode": "fixed", "budget": DEFAULT_QUERIES if self.queries is None else self.queries,
                "rounds": self.rounds, **read}

    def run(self, suspect: Suspect, *, alpha: float, share: float) -> TestResult:
        if self.mode == "sequential":
            from wmark.schemes.tiebreak.sequential import SEQUENTIAL_BUDGET, tiebreak_log_sequential

            return tiebreak_log_sequential(key=self.key, rule=self.rule, served=self.served, suspect=suspect,
                                           chosen=self.chosen, alpha=alpha, share=share,
                                           max_queries=SEQUENTIAL_BUDGET if self.queries is None else self.queries,
                                           use_scores=self.use_scores, centred=self.centred)
        return tiebreak_log_test(key=self.key, rule=self.rule, served=self.served, suspect=suspect,
                                 chosen=self.chosen, queries=DEFAULT_QUERIES if self.queries is None else self.queries,
                                 rounds=self.rounds, use_scores=self.use_scores, centred=self.centred)


def tiebreak_tests_from_files(*, key: Key, rule: str | os.PathLike[str], served: str | os.PathLike[str] | None = None,
                              arch: str | None = None, holdout: str | None = None, queries: int = DEFAULT_QUERIES,
                              log: str | os.PathLike[str] | None = None, client: str | None = None,
                              log_queries: int | None = None, log_rounds: int = DEFAULT_LOG_ROUNDS,
                              log_mode: str = "fixed", use_scores: bool | None = None,
                              log_read: int | None = None, centred: bool | None = None) -> list[TieBreakTest | TieBreakLogTest]:
    """The tie-break tests a dispute's files allow: the committed-input test (``queries`` > 0; the owner's
    ``holdout`` inputs, a dataset spec, only for a rule that commits none) and, with the API's ``log`` and a
    ``client``, the log test on that client's queries (``log_mode``, ``log_queries`` and ``log_rounds`` as
    :class:`TieBreakLogTest`'s ``mode``, ``queries`` and ``rounds``, ``log_read`` as :func:`select_log_inputs`'s
    ``read``; ``use_scores`` and ``centred`` for both, as :func:`tiebreak_test`'s). The served model is the one the rule records
    (``served`` and ``arch`` only if it moved, see :func:`~wmark.schemes.tiebreak.rule.open_tiebreak_rule`).

    Raises:
        UsageError: On any mismatch between key, rule, served model, holdout data and log, a holdout given for
            a rule that commits its own inputs, or an unknown client.
    """
    from wmark.data import load_dataset

    if log_mode not in ("sequential", "fixed"):
        raise UsageError(f"Unknown log test mode {log_mode!r}; use sequential or fixed.")
    loaded, backend = open_tiebreak_rule(key=key, rule=rule, arch=arch, served=served)
    tests: list[TieBreakTest | TieBreakLogTest] = []
    if queries > 0:
        inputs = None
        if holdout is not None:
            if loaded.verification_inputs is not None:
                raise UsageError(f"The tie-break rule {rule} commits its own verification inputs (chosen when it was "
                                 "built); give no holdout data.")
            ds = load_dataset(holdout)
            if ds.num_classes != key.num_classes or tuple(ds.input_shape) != tuple(key.input_shape):
                raise UsageError(f"The holdout {holdout} has {ds.num_classes} classes of inputs shaped "
                                 f"{tuple(ds.input_shape)}; the key is for {key.num_classes} classes of "
                                 f"{tuple(key.input_shape)}. Use the owner's data.")
            inputs = ds.x_train.numpy() if loaded.text is None else np.asarray(ds.texts_train or (), dtype=object)
        elif loaded.verification_inputs is None:
            raise UsageError(f"The tie-break rule {rule} carries no committed verification inputs; give the owner's "
                             "held inputs (holdout), or rebuild the rule with `wmark tiebreak build`.")
        tests.append(TieBreakTest(key=key, rule=loaded, served=backend, inputs=inputs, queries=queries,
                                  use_scores=use_scores, centred=centred))
    if log is not None:
        if client is None:
            raise UsageError("A query log is read for one client; name the client suspected of extraction.")
        with TieBreakLog(log, key=key, create=False) as opened:
            chosen = select_log_inputs(key=key, rule=loaded, served=backend, log=opened, client=client, read=log_read)
        tests.append(TieBreakLogTest(key=key, rule=loaded, served=backend, chosen=chosen, queries=log_queries,
                                     rounds=log_rounds, mode=log_mode, use_scores=use_scores, centred=centred))
    return tests
