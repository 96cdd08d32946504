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
from typing import Literal

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
from wmark.schemes.trigger_set import generate_triggers
from wmark.stats import BinomialTest, MixtureEProcess
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
    budget = len(triggers) if max_queries is None else min(int(max_queries), len(triggers))
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
            answers = suspect.query(triggers.inputs[idx].numpy())
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
        details={"mode": mode, "budget": budget, "triggers": len(triggers),
                 **({"stops_at_log10_p": math.log10(stop_at), "alpha_share": share} if mode == "sequential" else {})},
    )


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
                   progress: bool = False, api_log: PathLike | None = None, client: str | None = None,
                   api_max_queries: int | None = 300, rule: PathLike | None = None, served: PathLike | None = None,
                   served_arch: str | None = None, holdout: str | None = None, rule_queries: int = 1000,
                   tiebreak_log: PathLike | None = None, log_queries: int = 1000,
                   log_rounds: int = 21) -> list[EvidenceTest]:
    """The tests one verification runs, in order: the trigger set, then the API-side marks the files given
    allow. The one place a workflow's tests are put together (a model file and an HTTP suspect alike).

    Args:
        key: The owner's key.
        mode: The trigger-set test: ``sequential`` or ``fixed``.
        max_queries: Its query budget (default: every trigger).
        batch_size: Triggers per request in sequential mode.
        progress: Show a progress bar.
        api_log: The flip mark's log (:class:`~wmark.schemes.api_mark.MarkLog`): ask ``client``'s marked inputs,
            at most ``api_max_queries``.
        client: The API client suspected of extraction (with a log).
        api_max_queries: See ``api_log``.
        rule: A tie-break rule file: ask its first ``rule_queries`` committed inputs (0: none, only the log test).
        served: The served model file the rule was built from.
        served_arch: Its architecture.
        holdout: Only for a rule that commits no inputs: the owner's held inputs (dataset spec).
        rule_queries: See ``rule``.
        tiebreak_log: The tie-break API's log: ask ``log_queries`` of ``client``'s inputs in ``log_rounds`` rounds.
        log_queries: See ``tiebreak_log``.
        log_rounds: See ``tiebreak_log``.

    Raises:
        UsageError: On a partial or inconsistent set of files.
    """
    if client is not None and api_log is None and tiebreak_log is None:
        raise UsageError("A client names whose logged queries to ask; give the API's query log too.")
    if (api_log is not None or tiebreak_log is not None) and client is None:
        raise UsageError("A query log is read for one client; name the client suspected of extraction.")
    if rule is None and (served is not None or holdout is not None or tiebreak_log is not None):
        raise UsageError("The served model, holdout inputs and tie-break log belong to the tie-break test; give the "
                         "tie-break rule too.")
    if rule is not None and (served is None or served_arch is None):
        raise UsageError("The tie-break test needs the served model file the rule was built from and its "
                         "architecture.")
    if rule_queries < 0:
        raise UsageError(f"The number of committed tie-break inputs to ask must be at least 0, got {rule_queries}.")
    if rule is not None and rule_queries == 0 and tiebreak_log is None:
        raise UsageError("Asking no committed tie-break input leaves only the log test; give the tie-break log and "
                         "the client, or ask at least one committed input.")
    tests: list[EvidenceTest] = [TriggerSetTest(key=key, mode=mode, max_queries=max_queries, batch_size=batch_size,
                                                progress=progress)]
    if api_log is not None:
        from wmark.schemes.api_mark import ApiMarkTest

        tests.append(ApiMarkTest(key=key, log=api_log, client=client, max_queries=api_max_queries))  # type: ignore[arg-type]
    if rule is not None:
        from wmark.schemes.tiebreak import tiebreak_tests_from_files

        tests.extend(tiebreak_tests_from_files(key=key, rule=rule, served=served, arch=served_arch,  # type: ignore[arg-type]
                                               holdout=holdout, queries=rule_queries, log=tiebreak_log, client=client,
                                               log_queries=log_queries, log_rounds=log_rounds))
    return tests
