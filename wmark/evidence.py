"""The evidence core: hypothesis tests on a suspect, and the one place they are combined into a verdict.

Every way of verifying a suspect (a stolen file, a suspect API, a surrogate extracted from the owner's
API, a weight file read white-box) comes down to the same thing: a few tests, each with a stated null
hypothesis and a prior weight, each asking the suspect and returning an exact (or anytime-valid) log10
p-value, combined by weighted Holm at the false-accusation bound ``alpha``. :class:`Verifier` does that
once; schemes provide tests (:class:`EvidenceTest`) and depend only on this module, never on the CLI.

Example:
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME")
    >>> class Fixed:
    ...     name, weight = "fixed", 1.0
    ...     null = "a fixed p-value of 1e-8 (for illustration)"
    ...     def run(self, suspect, *, alpha, share):
    ...         return TestResult(name=self.name, evidence_of="copy", null={"why": self.null}, log10_p=-8.0,
    ...                           queries=1, matches=1)
    >>> Verifier(key=key, alpha=1e-6, tests=[Fixed()]).run(suspect=None, description="demo").decision
    'detected'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from wmark import __version__
from wmark.errors import UsageError
from wmark.keys import Key
from wmark.stats import holm, log10_to_p
from wmark.suspects.base import Suspect

DEFAULT_ALPHA = 1e-6


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
        """A JSON-ready document; never contains the key's secret. Its ``matches`` and ``null`` are those of the
        test that gives ``log10_p`` (:attr:`primary`)."""
        primary = self.primary
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
    def primary(self) -> TestResult | None:
        """The test whose adjusted p-value is the verdict's: the first in weighted Holm's order (smallest
        ``p / weight``). With unequal weights it need not be the test of smallest raw p (whose null and matches
        would then be reported beside another test's p-value)."""
        if not self.tests:
            return None
        return min(self.tests, key=lambda t: t.log10_p - math.log10(t.weight))

    @property
    def correction(self) -> str:
        """How the tests were combined: ``none`` (one test), ``holm`` or ``weighted holm``."""
        if len(self.tests) < 2:
            return "none"
        return "holm" if len({t.weight for t in self.tests}) == 1 else "weighted holm"


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1e300


class EvidenceTest(Protocol):
    """A hypothesis test a :class:`Verifier` runs: it states its null and prior weight, asks a suspect and
    returns a :class:`TestResult` (with that weight).

    Attributes:
        name: The test's name in the verdict.
        null: Its null hypothesis in one sentence (what an innocent suspect is).
        weight: Its prior weight in weighted Holm, fixed before any answer is seen.
    """

    @property
    def name(self) -> str: ...

    @property
    def null(self) -> str: ...

    @property
    def weight(self) -> float: ...

    def run(self, suspect: Suspect, *, alpha: float, share: float) -> TestResult:
        """Ask ``suspect`` and test. ``share`` is the share of ``alpha`` weighted Holm's first step gives this
        test (:func:`alpha_share`): a sequential test runs on until its evidence reaches 1 / (share × alpha),
        a fixed-n test ignores it."""
        ...

    def plan(self) -> dict[str, Any]:
        """What fixes the test's outcome before any answer is seen, besides alpha: ``{"mode": "sequential"}``
        for an anytime-valid test, else ``{"mode": "fixed", "budget": n, ...}`` (a transcript holding its
        answers takes only a run of the same plan, :mod:`wmark.testplan`)."""
        ...


class Verifier:
    """Splits ``alpha`` over its tests by their weights, runs them on one suspect and decides.

    Args:
        key: The owner's key (its commitment and owner go into the verdict).
        alpha: Bound on the probability of accusing a suspect for which every test's null holds.
        tests: The tests, in the order they are asked.

    Raises:
        UsageError: On an alpha outside (0, 1), no tests, or a non-positive weight.
    """

    def __init__(self, *, key: Key, alpha: float = DEFAULT_ALPHA, tests: Sequence[EvidenceTest]) -> None:
        if not 0.0 < alpha < 1.0:
            raise UsageError(f"alpha must be in (0, 1), got {alpha}.")
        if not tests:
            raise UsageError("No test was given to the verifier.")
        if any(not 0 < t.weight < math.inf for t in tests):
            # an infinite weight makes the other tests' alpha shares NaN, which Holm cannot order
            raise UsageError("Every test's weight must be a positive finite number.")
        self.key, self.alpha, self.tests = key, float(alpha), list(tests)

    def shares(self) -> list[float]:
        """Each test's share of alpha in weighted Holm's first step (:func:`alpha_share`)."""
        weights = [t.weight for t in self.tests]
        return [alpha_share(w, weights) for w in weights]

    def run(self, *, suspect: Suspect, description: str | None = None) -> Verdict:
        """Run every test on ``suspect`` (each with its share of alpha) and combine them (:func:`decide`)."""
        results = []
        for test, share in zip(self.tests, self.shares()):
            result = test.run(suspect, alpha=self.alpha, share=share)
            result.weight = test.weight
            results.append(result)
        return decide(key=self.key, tests=results, alpha=self.alpha,
                      suspect=description if description is not None else suspect.description)


def decide(*, key: Key, tests: list[TestResult], alpha: float, suspect: str) -> Verdict:
    """Combine tests with (weighted) Holm's correction and name the kind of evidence found.

    Each test enters with its prior :attr:`TestResult.weight`; the weights are fixed by the kinds of test
    run, never by their answers, so the family-wise bound alpha holds (:func:`wmark.stats.holm`).

    Raises:
        UsageError: On an alpha outside (0, 1) or no tests.
    """
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}.")
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
                   "1/alpha; raise the query budget to conclude.")
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
