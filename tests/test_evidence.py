"""The evidence core: one Verifier splits alpha by the tests' weights, runs them and combines them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from wmark.errors import UsageError
from wmark.evidence import TestResult, Verifier, alpha_share, decide
from wmark.keys import generate_key


@dataclass
class Recording:
    """A test with a fixed p-value that records the share of alpha it was run with."""

    name: str
    weight: float
    log10_p: float
    null: str = "fixed for the test"
    seen: list[tuple[float, float]] = field(default_factory=list)

    def run(self, suspect, *, alpha, share):
        self.seen.append((alpha, share))
        return TestResult(name=self.name, evidence_of="extracted", null={"why": self.null}, log10_p=self.log10_p,
                          queries=1, matches=0)


def test_the_verifier_gives_each_test_its_weighted_share_and_combines_by_weighted_holm():
    key = generate_key(owner="ACME", num_classes=3, input_shape=(2,))
    tests = [Recording("a", 1.0, -6.5), Recording("b", 1.0, 0.0), Recording("log", 8.0, -6.2)]
    verdict = Verifier(key=key, alpha=1e-6, tests=tests).run(suspect=None, description="s")
    assert [t.seen[0][1] for t in tests] == pytest.approx([0.1, 0.1, 0.8])
    assert all(t.seen[0][0] == 1e-6 for t in tests)
    assert [t.weight for t in verdict.tests] == [1.0, 1.0, 8.0]
    assert verdict.correction == "weighted holm" and verdict.detected and verdict.kind == "extracted"
    # weighted Holm: the log test's p of 10^-6.2 is below 0.8 alpha, but alpha/3 would miss it alone
    assert verdict.adjusted[2] == pytest.approx(-6.2 - math.log10(0.8))
    assert alpha_share(8.0, [1.0, 1.0, 8.0]) == pytest.approx(0.8)


def test_the_verifier_refuses_a_bad_alpha_no_tests_or_a_non_positive_weight():
    key = generate_key(owner="ACME", num_classes=3, input_shape=(2,))
    with pytest.raises(UsageError, match="alpha must be in"):
        Verifier(key=key, alpha=1.5, tests=[Recording("a", 1.0, 0.0)])
    with pytest.raises(UsageError, match="No test"):
        Verifier(key=key, alpha=1e-6, tests=[])
    for weight in (0.0, math.inf, math.nan):  # infinity made the other shares NaN, which Holm failed to order
        with pytest.raises(UsageError, match="^Every test's weight must be a positive finite number.$"):
            Verifier(key=key, alpha=1e-6, tests=[Recording("a", weight, 0.0)])


def test_a_suspect_answering_the_wrong_number_of_labels_is_a_runtime_error():
    import numpy as np

    from wmark.errors import RuntimeFailure
    from wmark.schemes.tiebreak.tests import _ask
    from wmark.suspects import Answers
    from wmark.verify import TriggerSetTest

    key = generate_key(owner="ACME", num_classes=3, input_shape=(1, 4, 4))

    class Short:
        description, num_classes, input_shape = "short", 3, (1, 4, 4)

        def query(self, inputs):
            return Answers(labels=np.zeros(max(0, len(inputs) - 1), dtype=np.int64))

    with pytest.raises(RuntimeFailure, match="answered 0 labels for 1 inputs") as caught:
        Verifier(key=key, alpha=1e-6, tests=[TriggerSetTest(key=key)]).run(suspect=Short())
    assert caught.value.exit_code == 3
    with pytest.raises(RuntimeFailure, match="answered 1 labels for 2 queries"):
        _ask(suspect=Short(), xs=np.zeros((2, 1, 4, 4), np.float32), lo=np.zeros(2, int), hi=np.ones(2, int),
             use_scores=False)


def test_the_verdict_reports_the_null_and_matches_of_the_test_that_gives_its_p_value():
    # Weighted Holm can put a heavier test's adjusted p below that of the test with the smallest raw p: the
    # trigger set at 10^-5 (weight 1) is not rejected at 10^-4.8, the log test at 10^-4.95 (weight 8) is, and
    # the verdict's log10 p is the log test's -4.95 + log10(10/8). Its null and matches must be reported with it.
    from wmark.evidence import decide
    from wmark.stats import holm

    key = generate_key(owner="ACME", num_classes=10, input_shape=(2,))
    trigger = TestResult(name="trigger-set", evidence_of="copy", null={"distribution": "Binomial(answered, 1/10)"},
                         log10_p=-5.0, queries=100, matches=30)
    log = TestResult(name="api-tiebreak-log", evidence_of="extracted", null={"distribution": "N(0, 1)"},
                     log10_p=-4.95, queries=1000, matches=600, weight=8.0)
    committed = TestResult(name="api-tiebreak", evidence_of="extracted", null={"distribution": "N(0, 1)"},
                           log10_p=0.0, queries=1000, matches=500)
    verdict = decide(key=key, tests=[trigger, log, committed], alpha=10 ** -4.8, suspect="s")
    expected = holm([-5.0, -4.95, 0.0], [1.0, 8.0, 1.0])
    assert verdict.adjusted == pytest.approx(expected)
    assert verdict.log10_p == pytest.approx(-4.95 - math.log10(0.8)) == pytest.approx(min(expected))
    assert verdict.detected and verdict.kind == "extracted"
    doc = verdict.to_dict()
    assert verdict.primary is log
    assert doc["null"] == {"distribution": "N(0, 1)"} and doc["matches"] == 600
    # equal weights: still the test of smallest raw p
    plain = decide(key=key, tests=[committed, trigger], alpha=1e-6, suspect="s")
    assert plain.primary is trigger and plain.to_dict()["matches"] == 30


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.0, -1e-6, float("nan")])
def test_decide_refuses_an_alpha_outside_0_1(alpha):
    # alpha >= 1 put the threshold at log10 alpha >= 0, above every adjusted p-value: a suspect whose tests all
    # gave p = 1 (an independent model) was 'detected'; recheck passes the alpha read from a report to decide
    key = generate_key(owner="ACME", num_classes=3, input_shape=(2,))
    innocent = TestResult(name="a", evidence_of="copy", null={"why": "fixed"}, log10_p=0.0, queries=1, matches=0)
    with pytest.raises(UsageError, match=r"alpha must be in \(0, 1\)"):
        decide(key=key, tests=[innocent], alpha=alpha, suspect="s")
