"""Verification: hypothesis tests that say whether a suspect carries the owner's watermark.

Each test states its null hypothesis and returns an exact log10 p-value; :class:`Verdict` combines tests
with Holm's correction and decides at the false-accusation bound ``alpha``.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from wmark import __version__
from wmark.errors import UsageError
from wmark.keys import Key
from wmark.schemes.trigger_set import generate_triggers
from wmark.stats import BinomialTest, MixtureEProcess, holm, log10_to_p
from wmark.suspects.base import Suspect

DEFAULT_ALPHA = 1e-6
Mode = Literal["sequential", "fixed"]


@dataclass
class TestResult:
    """One hypothesis test on one suspect.

    Attributes:
        name: Which test (e.g. ``trigger-set``).
        evidence_of: What a rejection shows: ``copy`` (memorised watermark) or ``extracted``.
        null: The null hypothesis: per-query probability under it and why that holds.
        log10_p: log10 of the (exact or anytime-valid) p-value.
        queries: Queries sent to the suspect for this test.
        matches: Answers that matched the key.
        abstentions: Queries with no usable answer (never counted as matches).
        method: How the p-value was computed.
        trajectory: log10 evidence after each counted answer (sequential tests), for plots.
        details: Test-specific extras.
        weight: Its prior weight in the verdict's weighted Holm correction (:func:`decide`), fixed by the kind of
            test before any answer is seen: the tie-break log test, the extraction test the API is built for,
            weighs ``8``, every other test ``1``.
    """

    __test__ = False  # not a pytest test class, though its name starts with "Test"

    name: str
    evidence_of: str
    null: dict[str, Any]
    log10_p: float
    queries: int
    matches: int
    abstentions: int = 0
    method: str = ""
    trajectory: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0

    @property
    def answered(self) -> int:
        return self.queries - self.abstentions


@dataclass
class Verdict:
    """The outcome of verifying one suspect.

    ``decision`` is ``detected`` when the Holm-adjusted p-value of some test is at most ``alpha``;
    ``kind`` says what the rejected tests are evidence of (``copy``, ``extracted`` or ``none``);
    ``adjusted`` holds each test's adjusted log10 p-value.
    """

    decision: str
    kind: str
    log10_p: float
    alpha: float
    tests: list[TestResult]
    suspect: str
    key_commitment: str
    owner: str
    status: str = "complete"
    message: str = ""
    adjusted: list[float] = field(default_factory=list)

    @property
    def detected(self) -> bool:
        return self.decision == "detected"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document; never contains the key's secret."""
        primary = min(self.tests, key=lambda t: t.log10_p) if self.tests else None
        return {
            "decision": self.decision,
            "kind": self.kind,
            "status": self.status,
            "message": self.message,
            "log10_p": _finite(self.log10_p),
            "p_value": log10_to_p(self.log10_p),
            "alpha": self.alpha,
            "queries": sum(t.queries for t in self.tests),
            "matches": primary.matches if primary else 0,
            "null": primary.null if primary else {},
            "suspect": self.suspect,
            "owner": self.owner,
            "key_commitment": self.key_commitment,
            "correction": self.correction,
            "tests": [dict(asdict(t), log10_p=_finite(t.log10_p),
                           **({"adjusted_log10_p": _finite(a)} if len(self.tests) > 1 else {}))
                      for t, a in zip(self.tests, self.adjusted or [t.log10_p for t in self.tests])],
            "wmark_version": __version__,
        }

    @property
    def correction(self) -> str:
        """How the tests were combined: ``none`` (one test), ``holm`` or ``weighted holm``."""
        if len(self.tests) < 2:
            return "none"
        return "holm" if len({t.weight for t in self.tests}) == 1 else "weighted holm"


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1e300


def check_suspect_fits_key(key: Key, suspect: Suspect) -> None:
    """Refuse a suspect whose classes or input shape differ from the key's."""
    if suspect.num_classes is not None and suspect.num_classes != key.num_classes:
        raise UsageError(
            f"The key is for {key.num_classes}-class models but the suspect answers over {suspect.num_classes} "
            "classes; use the key made for this model."
        )
    if suspect.input_shape is not None and tuple(suspect.input_shape) != tuple(key.input_shape):
        raise UsageError(
            f"The key's inputs are {tuple(key.input_shape)} but the suspect takes {tuple(suspect.input_shape)}."
        )


def owner_inputs(key: Key, inputs: Any) -> np.ndarray:
    """The owner's verification inputs as float32, refused if their shape is not the key's."""
    x = np.asarray(inputs, dtype=np.float32)
    if x.shape[1:] != tuple(key.input_shape):
        raise UsageError(f"Verification inputs are shaped {x.shape[1:]}, the key's input shape is "
                         f"{tuple(key.input_shape)}.")
    return x


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
            answers = suspect.query(triggers.queries(idx))
            got = np.asarray(answers.labels).reshape(-1)
            if len(got) != len(idx):
                raise UsageError(f"The suspect answered {len(got)} labels for {len(idx)} inputs.")
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


def decide(*, key: Key, tests: list[TestResult], alpha: float, suspect: str) -> Verdict:
    """Combine tests with (weighted) Holm's correction and name the kind of evidence found.

    Each test enters with its prior :attr:`TestResult.weight`; the weights are fixed by the kinds of test
    run, never by their answers, so the family-wise bound alpha holds (:func:`wmark.stats.holm`).
    """
    if not tests:
        raise UsageError("No test was run.")
    adjusted = holm([t.log10_p for t in tests], [t.weight for t in tests])
    threshold = math.log10(alpha)
    rejected = [t for t, a in zip(tests, adjusted) if a <= threshold]
    kinds = {t.evidence_of for t in rejected}
    kind = "copy" if "copy" in kinds else ("extracted" if "extracted" in kinds else "none")
    answered = sum(t.answered for t in tests)
    status, message = "complete", ""
    if not rejected and answered == 0:
        status, message = "inconclusive", "The suspect gave no usable answer; nothing can be concluded."
    elif not rejected and any(t.details.get("budget", 0) < t.details.get("triggers", 0) for t in tests):
        status = "inconclusive"
        message = ("The query budget ran out before every trigger was asked and before the evidence reached "
                   "1/alpha; raise --max-queries to conclude.")
    elif not rejected and any(t.details.get("inconclusive") for t in tests):
        status = "inconclusive"
        message = " ".join(t.details["inconclusive"] for t in tests if t.details.get("inconclusive"))
    assumed = [f"{t.name}: {t.null['assumption']}" for t in rejected if t.null.get("assumption")]
    if assumed and not any(not t.null.get("assumption") for t in rejected):
        message = " ".join(filter(None, [message, "The evidence rests on a stated assumption ("
                                         + "; ".join(assumed) + ")."]))
    return Verdict(
        decision="detected" if rejected else "not_detected",
        kind=kind,
        log10_p=min(adjusted),
        alpha=alpha,
        tests=tests,
        suspect=suspect,
        key_commitment=key.commitment(),
        owner=key.owner,
        status=status,
        message=message,
        adjusted=adjusted,
    )


def alpha_share(weight: float, weights: Sequence[float]) -> float:
    """The share of alpha Holm's first step gives a test of ``weight`` among tests of ``weights`` (all of them,
    its own included): a sequential test that will be combined stops once its evidence reaches
    1 / (share × alpha)."""
    return float(weight) / math.fsum(weights)


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
    test = trigger_set_test(key=key, suspect=suspect, alpha=alpha, mode=mode, max_queries=max_queries,
                            batch_size=batch_size, progress=progress)
    return decide(key=key, tests=[test], alpha=alpha, suspect=suspect.description)
