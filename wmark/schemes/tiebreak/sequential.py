"""The sequential log test: ask a client's logged inputs round by round until the evidence decides.

A client that sent 10k queries leaves thousands of logged near-ties; the fixed-n log test
(:func:`~wmark.schemes.tiebreak.tiebreak_log_test`) asks a number of them fixed in advance. This test keeps
asking, in rounds of ``round_size`` chosen exactly as the fixed test's later rounds are (the suspect's
own earlier answers and key-free quantities), and stops as soon as an e-process reaches
``1 / (share × alpha)``, when the client's log runs out, or at the stated budget ``max_queries``.

Why it keeps alpha under optional stopping. Write ``w`` for the key's directions (``C×k`` flattened, iid
N(0, 1)) and ``v_n`` for the pair-sum vector of the module :mod:`wmark.schemes.tiebreak` over every
answer of rounds ``1..n``. Picture the test run to its budget without stopping: which inputs each round
asks is a function of the suspect's earlier answers, the log, the served model, the references and the
rule's features, never of ``w``; the suspect's answers are, under ``H0`` (it was made without the marked
answers), independent of ``w`` too, and so is the served model's own expected evidence that a centred reading
subtracts (a text key's labels, by default). So the whole sequence ``V = (v_1, ..., v_N)`` is independent of ``w``.
Gram–Schmidt it: ``e_n = v_n − P_{n−1} v_n``, with ``P_{n−1}`` the projection on ``span(v_1..v_{n−1})``,
and ``T_n = <w, e_n> / |e_n|`` for each ``e_n ≠ 0``. Given ``V`` the unit vectors ``e_n / |e_n|`` are fixed
and orthonormal, so the ``T_n`` are iid N(0, 1) (projections of an iid Gaussian vector on orthonormal
directions). Each ``T_n`` gets the weight ``a_n = |e_n| / s`` (``s``: the per-query norm ``|v| / sqrt(n)``
where ``v`` is first non-zero), known from ``V`` before ``T_n`` is seen, and the half-normal mixture of the
likelihood ratios ``exp(θ Σ a_j T_j − θ² Σ a_j² / 2)`` (:class:`wmark.stats.GaussianMixtureEProcess`) is a
non-negative martingale with mean 1 given ``V``. Ville's inequality bounds ``P(sup_n E_n ≥ 1/α | V) ≤ α``
for every ``V``, hence unconditionally; stopping early (on the evidence itself, on the log's end, on the
budget) only looks at a prefix of the same path, so ``p = min(1, 1 / max_n E_n)`` is a valid p-value and the
false-accusation bound holds whatever the stopping rule. Under a thief, ``<w, e_n>`` carries the keyed
lean the answers inherited; since ``Σ_j a_j T_j = <w, Σ_j e_j> / s`` and the residuals ``e_j`` are the new
part of each round's answers, ``Σ a_j T_j / sqrt(Σ a_j²)`` tracks the fixed-n ``Z`` over the same answers
(it drops only the part of each round that lies along earlier rounds' sums: a few per cent while the rounds
are few against ``C·k``).

The mixing scale ``rho`` (``SEQUENTIAL_RHO`` = 0.13 per unit of ``a²``, which is about one answered query)
was chosen on the mixture's closed form, before any benchmark: the mixture is tightest where
``ρ² Σ a² ≈ Z² − 1``, and 0.13 puts that at ``Z`` 5.6–6 after 2,000–3,000 queries, where a thief whose
fixed-n ``Z`` at 1,000 queries is 4–4.7 (the outside thieves of issue 19) crosses; at share × alpha = 8e-7
it then needs ``Σ a T / sqrt(Σ a²)`` ≈ 5.6 anywhere from 1,000 to 5,000 queries (5.8 at 300, 5.7 at 10,000),
against 4.8 for the fixed-n test at exactly 1,000.

The null's one assumption is the fixed-n log test's: the client chose its queries without regard to the
marked answers (e.g. a fixed dataset), so that its logged inputs are independent of ``w``.
"""

from __future__ import annotations

import math

import numpy as np

from wmark.errors import UsageError
from wmark.evidence import DEFAULT_ALPHA, TestResult, check_suspect_fits_key
from wmark.keys import Key
from wmark.schemes.querylog import QueryLog
from wmark.schemes.tiebreak.rule import SCHEME, TieBreakRule, top_pairs
from wmark.schemes.tiebreak.statistic import _outside, centres, evidence_sums, expected_evidence
from wmark.schemes.tiebreak.tests import (
    FEW_PAIRS,
    LOG_TEST_WEIGHT,
    NULL_WHY,
    LogInputs,
    _ask,
    _check_rule_key,
    _next_round,
    _read,
    reads_scores,
    select_log_inputs,
)
from wmark.stats import GaussianMixtureEProcess
from wmark.suspects.base import Suspect

SEQUENTIAL_BUDGET = 10_000
SEQUENTIAL_ROUND = 50
SEQUENTIAL_RHO = 0.13
RESIDUAL_FLOOR = 1e-9


def tiebreak_log_sequential(*, key: Key, rule: TieBreakRule, served: Suspect, suspect: Suspect,
                            log: QueryLog | None = None, client: str | None = None, chosen: LogInputs | None = None,
                            alpha: float = DEFAULT_ALPHA, share: float = 1.0, max_queries: int = SEQUENTIAL_BUDGET,
                            round_size: int = SEQUENTIAL_ROUND, rho: float = SEQUENTIAL_RHO,
                            use_scores: bool | None = None, centred: bool | None = None) -> TestResult:
    """The anytime-valid log test: ask the client's logged inputs until the evidence decides (module docstring).

    The first round asks the ``round_size`` inputs the reference surrogates leave most open
    (:func:`~wmark.schemes.tiebreak.select_log_inputs`), every later one the ``round_size`` where the suspect's
    answers so far put it closest to a tie, as in the fixed-n test. After each round the e-process is updated;
    the test stops once it reaches ``1 / (share × alpha)``, or when ``max_queries`` inputs or the client's
    whole log have been asked.

    Args:
        key: The owner's key (the rule and the log must be under it).
        rule: The tie-break rule the API served with.
        served: The owner's *unmarked* served model (exposing scores): it gives the pairs.
        suspect: The model under test (labels suffice).
        log: The API's log (with ``client``), or
        client: The API client suspected of training the suspect.
        chosen: Instead of ``log`` and ``client``: their inputs ranked by ``select_log_inputs`` (all of them).
        alpha: The verdict's false-accusation bound.
        share: The share of ``alpha`` weighted Holm gives this test (:func:`wmark.evidence.alpha_share`): the
            test stops once its p-value would pass Holm's first step.
        max_queries: The most logged inputs to ask (the budget, stated in the result).
        round_size: Inputs per round: the e-process is updated, and stopping considered, after each.
        rho: The mixing scale of the e-process (see the module docstring for the default's choice).
        use_scores: Read probabilities when the suspect gives them (see :func:`~wmark.schemes.tiebreak.tiebreak_test`;
            by default for an image rule only).
        centred: Centre each answer's evidence on the served model's own (:func:`expected_evidence`); None (the
            default): for a text rule's label reading, as the fixed-n tests (:func:`centres`). Key-free, so the
            e-process stays valid either way.

    Returns:
        A ``TestResult`` of weight ``LOG_TEST_WEIGHT`` whose ``log10_p`` is ``-log10 max E`` (anytime-valid),
        ``queries`` the inputs asked, ``trajectory`` log10 E after each round, and ``details`` the budget, the
        log's size, the rounds asked, why it stopped, ``drift_z`` (``Σ a T / sqrt(Σ a²)``, N(0, 1) under ``H0`` at a
        stopping time fixed in advance) and the fixed-n ``z`` over every answer (both for reading only: their
        normal tails are not p-values after stopping on the evidence).

    Raises:
        UsageError: On a key/rule/log/suspect mismatch, a client with no logged inputs, or a parameter out of range.
    """
    _check_rule_key(rule, key)
    check_suspect_fits_key(key, suspect)
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}.")
    if not 0.0 < share <= 1.0:
        raise UsageError(f"share (of alpha, for a combined verdict) must be in (0, 1], got {share}.")
    if max_queries < 1:
        raise UsageError(f"The budget of logged inputs to ask must be at least 1, got {max_queries}.")
    if round_size < 1:
        raise UsageError(f"round_size must be at least 1, got {round_size}.")
    if not (math.isfinite(rho) and rho > 0):
        raise UsageError(f"rho must be positive, got {rho}.")
    if chosen is None:
        if log is None or client is None:
            raise UsageError("The log test needs the API's log and the client, or their ranked inputs (chosen=).")
        chosen = select_log_inputs(key=key, rule=rule, served=served, log=log, client=client)
    stop_at = alpha * share
    budget = min(max_queries, len(chosen.x))
    _, lo, hi = top_pairs(chosen.scores)
    psi = rule.features(chosen.x)
    w = rule.directions.reshape(-1)
    basis = np.zeros((0, w.size))
    eproc = GaussianMixtureEProcess(rho=rho)
    unit = 0.0
    asked = np.zeros(0, dtype=np.int64)
    answers, evidence = np.zeros(0, dtype=np.int64), np.zeros(0)
    reads: list[str] = []
    directions = 0
    trajectory: list[float] = []
    asked_after: list[int] = []
    stopped = "budget" if budget < len(chosen.x) else "log"
    while len(asked) < budget:
        size = min(round_size, budget - len(asked))
        labels_only = set(reads) == {"labels"}
        if len(asked) == 0:
            batch = np.arange(size)
        else:
            batch = _next_round(psi=psi, lo=lo, hi=hi, leans=chosen.leans, reference_leans=chosen.reference_leans,
                                asked=asked, evidence=evidence,
                                outside=_outside(answers, lo[asked], hi[asked]) if labels_only else None,
                                num_classes=key.num_classes, size=size)
        said, signs, read = _ask(suspect=suspect, xs=chosen.x[batch], lo=lo[batch], hi=hi[batch],
                                 use_scores=reads_scores(rule, use_scores))
        asked, answers = np.concatenate([asked, batch]), np.concatenate([answers, said])
        evidence = np.concatenate([evidence, signs])
        reads.append(read)
        v = _sums(rule=rule, psi=psi, lo=lo, hi=hi, scores=chosen.scores, asked=asked, answers=answers,
                  evidence=evidence, reads=reads, centred=centred)
        residual = v - basis.T @ (basis @ v)
        residual -= basis.T @ (basis @ residual)  # twice: Gram–Schmidt stays orthogonal in floating point
        norm = float(np.linalg.norm(residual))
        if norm > RESIDUAL_FLOOR * float(np.linalg.norm(v)):
            unit = unit or float(np.linalg.norm(v)) / math.sqrt(len(asked))
            basis = np.vstack([basis, residual / norm])
            directions += 1
            eproc.update(float(w @ residual) / norm, norm / unit)
        trajectory.append(eproc.history[-1] if eproc.history else 0.0)
        asked_after.append(len(asked))
        if eproc.crossed(stop_at):
            stopped = "evidence"
            break
    read = reads[0] if len(set(reads)) == 1 else "labels"
    z, info = _read(rule=rule, psi=psi[asked], scores=chosen.scores[asked], answers=answers, evidence=evidence,
                    read=read, centred=centred)
    why = {"evidence": f"the evidence reached 1/(share x alpha) = {1 / stop_at:.3g}",
           "budget": f"the budget of {budget} inputs was asked", "log": f"the client's log ({budget} inputs) ran out"}
    details = {
        "mode": "sequential", "budget": int(budget), "max_queries": int(max_queries), "log_inputs": len(chosen.x),
        "round_size": int(round_size), "rounds": len(reads), "trajectory_queries": asked_after, "directions": directions, "stopped": stopped,
        "stopped_because": why[stopped], "stops_at_log10_p": math.log10(stop_at), "alpha_share": share, "rho": rho,
        "weight_total": eproc.weight,
        "drift_z": eproc.total / math.sqrt(eproc.weight) if eproc.weight > 0 else 0.0, "z": z, "components": rule.components, "skipped_leading": rule.skipped,
        "selection": chosen.selection + f"; asked in rounds of {round_size}, the first by that ranking, the rest "
                                        "where the suspect's answers so far put it closest to a tie",
        "read": read, "client": chosen.client, **info,
    }
    if info["in_pair"] == 0:
        details["inconclusive"] = "The suspect never answered either class of a near-tie; the tie-break test has no data."
    elif eproc.weight == 0:
        details["inconclusive"] = FEW_PAIRS
    return TestResult(
        name=f"{SCHEME}-log", evidence_of="extracted", log10_p=-eproc.compute(), queries=len(answers),
        matches=info["agree"], abstentions=int((answers < 0).sum()),
        method="anytime-valid p = 1/max e-value: half-normal mixture over the drift of the Gram-Schmidt "
               "projections T_n = <w, e_n>/|e_n| of each round's pair sums, iid N(0, 1) under H0 (Ville's "
               "inequality; the client's logged inputs, asked until the evidence decides)",
        null={"distribution": "T_n iid N(0, 1) given the suspect's answers", "why": NULL_WHY.replace(
                  "owner-chosen inputs", "client's inputs"),
              "assumption": "the client chose its queries without regard to the marked answers (e.g. a fixed "
                            "dataset); the committed-input tie-break test needs no such assumption"},
        trajectory=trajectory, details=details, weight=LOG_TEST_WEIGHT,
    )


def _sums(*, rule: TieBreakRule, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, scores: np.ndarray,
          asked: np.ndarray, answers: np.ndarray, evidence: np.ndarray, reads: list[str],
          centred: bool | None) -> np.ndarray:
    """The pair-sum vector ``v`` (flattened) over every answer so far, read as the fixed-n test reads them
    (labels when any round was read from labels), centred on the served ``scores``' own evidence where
    :func:`centres` says."""
    read = "labels" if "labels" in reads else "scores"
    lo, hi = lo[asked], hi[asked]
    centre = expected_evidence(scores[asked], lo, hi, read) if centres(rule, centred, read) else None
    return evidence_sums(psi=psi[asked], lo=lo, hi=hi, answers=answers, leans=None if read == "labels" else evidence,
                         centre=centre, num_classes=rule.directions.shape[0]).reshape(-1)
