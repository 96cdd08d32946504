"""Black-box verification with the key's trigger set, and the one place a verification's tests are assembled.

:func:`trigger_set_test` queries the key's triggers; :func:`assemble_tests` lists the tests a workflow runs
(the trigger set and, for extraction, the API-side marks), and :class:`wmark.evidence.Verifier` runs and
combines them. :class:`TestResult`, :class:`Verdict`, :func:`decide` and :func:`alpha_share` live in
:mod:`wmark.evidence` and are re-exported here.

Example:
    >>> import torch
    >>> from wmark.keys import generate_key
    >>> from wmark.models import build_model
    >>> from wmark.suspects import LocalSuspect
    >>> key = generate_key(owner="ACME")
    >>> innocent = LocalSuspect(build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28), seed=1),
    ...                         input_shape=(1, 28, 28))
    >>> verify_blackbox(key=key, suspect=innocent).decision
    'not_detected'
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from wmark.errors import RuntimeFailure, UsageError
from wmark.evidence import (
    DEFAULT_ALPHA,
    EvidenceTest,
    TestResult,
    Verdict,
    Verifier,
    alpha_share,
    check_suspect_fits_key,
    decide,
    owner_inputs,
)
from wmark.keys import Key
from wmark.schemes.trigger_set import generate_triggers, trigger_params
from wmark.stats import BinomialTest, MixtureEProcess, mixture_plan
from wmark.suspects.base import Suspect

__all__ = ["DEFAULT_ALPHA", "EvidenceTest", "Mode", "TestResult", "TriggerSetTest", "Verdict", "Verifier",
           "alpha_share", "assemble_tests", "check_suspect_fits_key", "decide", "owner_inputs", "trigger_set_test",
           "verify_blackbox"]

Mode = Literal["sequential", "fixed"]
PathLike = str | os.PathLike[str]


def trigger_set_test(*, key: Key, suspect: Suspect, alpha: float = DEFAULT_ALPHA, mode: Mode = "sequential",
                     max_queries: int | None = None, batch_size: int = 1, progress: bool = False,
                     share: float = 1.0) -> TestResult:
    """Query the key's triggers in key-derived order and test the match rate against 1/C.

    Null hypothesis: the suspect never saw the key, so each answer matches the uniformly random secret
    label with probability exactly 1/C, independently across triggers.

    In ``sequential`` mode the evidence is a mixture e-process (:class:`wmark.stats.MixtureEProcess`); the
    test stops as soon as it reaches 1 / (``share`` × alpha), and the reported p-value (1 / max e-value)
    stays valid under that optional stopping. In ``fixed`` mode all ``max_queries`` triggers are asked and
    the p-value is the exact binomial tail.

    Args:
        share: The share of alpha the verdict's Holm correction gives this test when it is combined with
            others (:func:`alpha_share`; 1/m for m equal weights). Holm's first step needs p <= share × alpha,
            so a sequential test that stopped at 1/alpha would leave a copy it had found below the bar.
    """
    if mode not in ("sequential", "fixed"):
        raise UsageError(f"Unknown mode {mode!r}; use sequential or fixed.")
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}.")
    if not 0.0 < share <= 1.0:
        raise UsageError(f"share (of alpha, for a combined verdict) must be in (0, 1], got {share}.")
    check_suspect_fits_key(key, suspect)
    stop_at = alpha * share
    triggers = generate_triggers(key)
    budget = trigger_budget(key, max_queries)
    if budget < 1:
        raise UsageError("The query budget must be at least 1.")
    p0 = 1.0 / key.num_classes
    eproc = MixtureEProcess(p0=p0)
    fixed = BinomialTest(p0=p0)
    queries = abstentions = 0
    step = max(1, batch_size if mode == "sequential" else budget)
    bar = tqdm(total=budget, desc="querying triggers", disable=not progress, leave=False, unit="q")
    try:
        while queries < budget and not (mode == "sequential" and eproc.crossed(stop_at)):
            idx = triggers.order[queries:min(budget, queries + step)]
            answers = suspect.query(triggers.queries(idx))
            got = np.asarray(answers.labels).reshape(-1)
            if len(got) != len(idx):
                raise RuntimeFailure(f"The suspect answered {len(got)} labels for {len(idx)} inputs.")
            for j, label in zip(idx, got):
                queries += 1
                bar.update(1)
                if label < 0:
                    abstentions += 1
                    continue
                hit = int(label == int(triggers.labels[j]))
                eproc.update(hit)
                fixed.update(hit)
                if mode == "sequential" and eproc.crossed(stop_at):
                    break
    finally:
        bar.close()
    details: dict[str, Any] = {"mode": mode, "budget": budget, "triggers": len(triggers)}
    if mode == "sequential":
        details.update(stops_at_log10_p=math.log10(stop_at), alpha_share=share)
    answered = queries - abstentions
    # A key (or budget) too small for alpha fails even a perfect copy: say so, or "not detected" reads as innocent.
    # C**budget bounds every test's evidence (the likelihood ratio of an all-matching suspect).
    if (budget * math.log10(key.num_classes) < -math.log10(stop_at)
            or (0 < answered == fixed.successes and queries == budget and mode == "sequential"
                and not eproc.crossed(stop_at))):
        details["inconclusive"] = (
            f"Even a suspect that answered every one of the {budget} triggers asked with its secret label could not reach "
            f"alpha = {alpha:g} here; verify with a key of more triggers, a larger budget or a larger alpha.")
    if mode == "sequential":
        log10_p = -eproc.compute()
        method = "anytime-valid p = 1/max e-value of a mixture likelihood-ratio e-process (Ville's inequality)"
    else:
        log10_p = fixed.compute()
        method = "exact binomial tail P(X >= matches), X ~ Binomial(answered, 1/C), summed in log space"
    return TestResult(
        name="trigger-set",
        evidence_of="copy",
        null={
            "p0": p0,
            "distribution": f"Binomial(answered, 1/{key.num_classes})",
            "why": "trigger labels are drawn uniformly at random from the key, independently of any model that "
                   f"never saw it, so each answer matches with probability exactly 1/{key.num_classes}",
        },
        log10_p=log10_p,
        queries=queries,
        matches=fixed.successes,
        abstentions=abstentions,
        method=method,
        trajectory=list(eproc.history) if mode == "sequential" else [],
        details=details,
    )


def trigger_budget(key: Key, max_queries: int | None) -> int:
    """The triggers a test of budget ``max_queries`` asks at most: all of the key's by default, never more."""
    n = int(trigger_params(key)["n"])
    return n if max_queries is None else min(int(max_queries), n)


@dataclass(frozen=True)
class TriggerSetTest:
    """The trigger-set test as an :class:`~wmark.evidence.EvidenceTest` (see :func:`trigger_set_test`)."""

    key: Key
    mode: Mode = "sequential"
    max_queries: int | None = None
    batch_size: int = 1
    progress: bool = False
    name: str = "trigger-set"
    weight: float = 1.0

    @property
    def null(self) -> str:
        return ("the suspect never saw the key: each answer matches its trigger's label with probability "
                f"1/{self.key.num_classes}")

    def plan(self) -> dict[str, Any]:
        """Fixed-n: its budget. Sequential: its e-process's mixture; not its budget, as one more run of a larger
        budget continues the same e-process over the same key-ordered triggers (optional continuation)."""
        if self.mode == "sequential":
            return {"mode": "sequential", "eprocess": mixture_plan()}
        return {"mode": "fixed", "budget": trigger_budget(self.key, self.max_queries)}

    def run(self, suspect: Suspect, *, alpha: float, share: float) -> TestResult:
        return trigger_set_test(key=self.key, suspect=suspect, alpha=alpha, mode=self.mode,
                                max_queries=self.max_queries, batch_size=self.batch_size, progress=self.progress,
                                share=share)


def verify_blackbox(*, key: Key, suspect: Suspect, alpha: float = DEFAULT_ALPHA, mode: Mode = "sequential",
                    max_queries: int | None = None, batch_size: int = 1, progress: bool = False) -> Verdict:
    """Black-box verification of one suspect with the key's trigger set.

    Args:
        key: The owner's key.
        suspect: Anything with ``query`` (a local model, an HTTP API).
        alpha: Bound on the probability of accusing a model that never saw the key.
        mode: ``sequential`` (stop as soon as the evidence suffices) or ``fixed`` (ask every trigger).
        max_queries: Query budget (default: the whole trigger set).
        batch_size: Triggers per request in sequential mode.
        progress: Show a progress bar on stderr.
    """
    test = TriggerSetTest(key=key, mode=mode, max_queries=max_queries, batch_size=batch_size, progress=progress)
    return Verifier(key=key, alpha=alpha, tests=[test]).run(suspect=suspect)


def assemble_tests(*, key: Key, mode: Mode = "sequential", max_queries: int | None = None, batch_size: int = 1,
                   progress: bool = False, log: PathLike | None = None, client: str | None = None,
                   rule: PathLike | None = None, served: PathLike | None = None, served_arch: str | None = None,
                   holdout: str | None = None, rule_queries: int = 1000, log_queries: int | None = None,
                   log_rounds: int = 21, log_mode: Mode = "fixed", use_scores: bool | None = None,
                   log_read: int | None = None) -> list[EvidenceTest]:
    """The tests one verification runs, in order: the trigger set, then the API-side marks the files given
    allow. The one place a workflow's tests are put together (a model file and an HTTP suspect alike).

    The query ``log`` says which mark's API wrote it: a flip-mark log gives the flip-mark test on ``client``'s
    marked inputs (at most ``log_queries``, default 300); a tie-break log gives the log test on ``client``'s
    inputs and needs the ``rule``: with ``log_mode`` ``fixed`` (the default) exactly ``log_queries`` (default
    1000) in ``log_rounds`` rounds, the exact Gaussian tail; with ``sequential`` until its evidence reaches its
    share of alpha, the log runs out or ``log_queries`` are asked (default 10,000;
    :func:`~wmark.schemes.tiebreak.sequential.tiebreak_log_sequential`). A tie-break
    ``rule`` also gives the committed-input test (its first ``rule_queries``; 0 skips it, next to a log).

    Args:
        key: The owner's key.
        mode: The trigger-set test: ``sequential`` or ``fixed``.
        max_queries: Its query budget (default: every trigger).
        batch_size: Triggers per request in sequential mode.
        progress: Show a progress bar.
        log: The marked API's query log (:class:`~wmark.schemes.querylog.QueryLog`).
        client: The API client suspected of extraction (with a log).
        rule: The tie-break rule file the API served with.
        served: The served model file, only if it moved since the rule was built.
        served_arch: Its architecture, only for a rule that records none.
        holdout: Only for a rule that commits no inputs: the owner's held inputs (dataset spec).
        rule_queries: Committed tie-break inputs to ask.
        log_queries: Logged inputs to ask (sequential: at most).
        log_rounds: Fixed tie-break log test: rounds to ask them in.
        log_mode: The tie-break log test: ``fixed`` or ``sequential``.
        use_scores: The tie-break tests: read the suspect's probabilities where it gives them (True), its labels
            (False), or by default probabilities for an image key and labels for a text key
            (:func:`~wmark.schemes.tiebreak.tests.reads_scores`).
        log_read: A log test reads only the client's first ``log_read`` logged inputs: those a transcript's plan
            read (:func:`~wmark.testplan.recorded_log_read`), for a run resuming it while the API kept logging.

    Raises:
        UsageError: On a partial or inconsistent set of files.
    """
    if (client is None) != (log is None):
        raise UsageError("A query log is read for one client; give both the log and the client suspected of "
                         "extraction.")
    if rule is None and (served is not None or served_arch is not None or holdout is not None):
        raise UsageError("The served model and holdout inputs belong to the tie-break test; give its rule too.")
    if rule_queries < 0:
        raise UsageError(f"The number of committed tie-break inputs to ask must be at least 0, got {rule_queries}.")
    if log_queries is not None and log_queries < 1:
        raise UsageError(f"The number of logged inputs to ask must be at least 1, got {log_queries}.")
    tests: list[EvidenceTest] = [TriggerSetTest(key=key, mode=mode, max_queries=max_queries, batch_size=batch_size,
                                                progress=progress)]
    mark = None
    if log is not None:
        from wmark.schemes.querylog import QueryLog

        with QueryLog(log, key=key) as opened:
            mark = opened.mark
    if mark == "flip":
        if rule is not None:
            raise UsageError(f"The query log {log} was written by the flip mark's API, which has no tie-break rule; "
                             "give no rule.")
        from wmark.schemes.api_mark import ApiMarkTest

        tests.append(ApiMarkTest(key=key, log=log, client=client,  # type: ignore[arg-type]
                                 max_queries=300 if log_queries is None else log_queries, read=log_read))
        return tests
    if mark == "tiebreak" and rule is None:
        raise UsageError(f"The query log {log} was written by the tie-break mark's API; give the rule it served with.")
    if rule is not None:
        if rule_queries == 0 and log is None:
            raise UsageError("Asking no committed tie-break input leaves only the log test; give the query log and "
                             "the client, or ask at least one committed input.")
        from wmark.schemes.tiebreak import tiebreak_tests_from_files

        tests.extend(tiebreak_tests_from_files(key=key, rule=rule, served=served, arch=served_arch, holdout=holdout,
                                               queries=rule_queries, log=log, client=client, log_queries=log_queries,
                                               log_rounds=log_rounds, log_mode=log_mode, use_scores=use_scores,
                                               log_read=log_read))
    return tests
