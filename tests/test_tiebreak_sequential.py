"""The sequential tie-break log test: its null over many keys under optional stopping, a follower caught early,
the budget, the e-process's closed form, and its place in a verdict."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from _api_helpers import Follower, LinearModel
from keykit import seeded_key
from scipy import integrate, stats

from wmark.errors import UsageError
from wmark.evidence import TestResult, Verifier
from wmark.keys import generate_key
from wmark.schemes.tiebreak import (
    LOG_TEST_WEIGHT,
    SEQUENTIAL_BUDGET,
    TieBreakAPI,
    TieBreakLog,
    TieBreakLogTest,
    build_tiebreak_rule,
    expected_evidence,
    probability_leans,
    select_log_inputs,
    tiebreak_log_sequential,
    tiebreak_statistic,
    top_pairs,
)
from wmark.stats import GaussianMixtureEProcess

C, D, F = 4, 16, 32
Linear = partial(LinearModel, num_classes=C, dims=D)
_PROJ = np.random.default_rng(7).normal(size=(D, F)) / np.sqrt(D)


def featurizer(x: np.ndarray) -> np.ndarray:
    """A fixed nonlinear feature map (stands in for the served model's penultimate layer)."""
    return np.tanh(np.asarray(x, dtype=np.float64) @ _PROJ)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(3000, D)).astype(np.float32)


def rule_for(key, data):
    return build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="test", components=F)


@pytest.fixture(scope="module")
def logged(data, tmp_path_factory):
    """One client's log (a fixed dataset, not chosen by the answers) under one key, ranked (key-free)."""
    backend = Linear(1)
    key = seeded_key("tiebreak/sequential/log", owner="o", num_classes=C, input_shape=(D,))
    rule = rule_for(key, data)
    path = tmp_path_factory.mktemp("seq") / "log.sqlite"
    with TieBreakLog(path, key=key) as log:
        api = TieBreakAPI(key=key, backend=backend, rule=rule, beta=3.0, log=log)
        api.for_client("thief").query(data)
        ranked = select_log_inputs(key=key, rule=rule, served=backend, log=log, client="thief")
    return key, rule, TieBreakAPI(key=key, backend=backend, rule=rule, beta=3.0), backend, ranked


def test_the_e_process_is_its_mixture_integral_and_starts_at_one():
    e = GaussianMixtureEProcess(rho=0.3)
    assert e.log_e() == pytest.approx(0.0, abs=1e-12) and e.compute() == 0.0
    rng = np.random.default_rng(0)
    for score, weight in zip(rng.normal(1.0, 1.0, 12), rng.uniform(0.5, 2.0, 12)):
        e.update(float(score), float(weight))
    m, a = e.total, e.weight

    def integrand(theta: float) -> float:
        return math.exp(theta * m - theta ** 2 * a / 2) * 2 * stats.norm.pdf(theta / 0.3) / 0.3

    value, _ = integrate.quad(integrand, 0, np.inf)
    assert e.log_e() == pytest.approx(math.log(value), rel=1e-7)
    assert e.compute() == pytest.approx(max(0.0, *e.history))
    with pytest.raises(ValueError, match="rho must be positive"):
        GaussianMixtureEProcess(rho=0.0)
    with pytest.raises(ValueError, match="finite weight >= 0"):
        e.update(1.0, -1.0)


@pytest.mark.parametrize("centred", [False, True])
def test_the_null_holds_over_many_keys_under_optional_stopping(data, logged, centred):
    # One fixed innocent suspect, 200 keys, the same client's log: stopping as soon as E >= 1/0.05 (after
    # every round of 25 inputs), the rejection rate stays within the binomial bound of 0.05 and the stopped
    # e-value's mean within 1; run to the budget, the weighted sum's z is N(0, 1) (KS against scipy). Centring
    # on the served model's own evidence (key-free) keeps all of it.
    _, _, _, backend, ranked = logged
    innocent = Linear(2)
    rejected, stopped_e, zs = [], [], []
    for i in range(200):
        key = seeded_key(f"tiebreak/sequential/null/{i}", owner=f"k{i}", num_classes=C, input_shape=(D,))
        rule = rule_for(key, data)
        res = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=innocent, chosen=ranked,
                                      alpha=0.05, max_queries=400, round_size=25, centred=centred)
        rejected.append(res.log10_p <= math.log10(0.05))
        assert (res.details["stopped"] == "evidence") == rejected[-1]
        assert res.queries == 400 or rejected[-1]
        stopped_e.append(10.0 ** res.trajectory[-1])
        full = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=innocent, chosen=ranked,
                                       alpha=1e-300, max_queries=400, round_size=25, centred=centred)
        assert full.queries == 400 and full.details["stopped"] == "budget"
        zs.append(full.details["drift_z"])
    assert stats.binom.sf(sum(rejected) - 1, len(rejected), 0.05) > 1e-3, sum(rejected)
    e = np.asarray(stopped_e)
    assert e.mean() <= 1.0 + 3 * e.std(ddof=1) / math.sqrt(len(e)), (e.mean(), e.std())
    assert stats.kstest(zs, "norm").pvalue > 1e-3


def test_a_follower_is_caught_early_and_an_innocent_asks_the_whole_log(logged):
    key, rule, api, backend, ranked = logged
    caught = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=Follower(api, q=0.9),
                                     chosen=ranked, alpha=1e-6, share=0.8)
    assert caught.details["stopped"] == "evidence" and caught.log10_p <= math.log10(0.8e-6)
    assert caught.queries < len(ranked.x) and caught.queries % 50 == 0
    assert caught.trajectory[-1] >= -math.log10(0.8e-6) > max(caught.trajectory[:-1])
    assert caught.name == "api-tiebreak-log" and caught.evidence_of == "extracted"
    assert caught.weight == LOG_TEST_WEIGHT and "anytime-valid" in caught.method
    assert "without regard to the marked answers" in caught.null["assumption"]
    assert caught.details["stops_at_log10_p"] == pytest.approx(math.log10(0.8e-6))
    clean = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=backend, chosen=ranked)
    assert clean.details["stopped"] == "log" and clean.queries == len(ranked.x) == clean.details["log_inputs"]
    assert clean.log10_p > -3
    assert clean.details["budget"] == len(ranked.x) < SEQUENTIAL_BUDGET


def test_centred_it_reads_the_answers_as_the_fixed_test_does_and_catches_a_follower(logged):
    key, rule, api, backend, ranked = logged
    suspect = Linear(5)
    res = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=suspect, chosen=ranked,
                                  max_queries=200, round_size=200, centred=True)
    x = ranked.x[:200]  # one round: the first 200 by the ranking
    _, lo, hi = top_pairs(ranked.scores[:200])
    z, _ = tiebreak_statistic(rule=rule, psi=rule.features(x), lo=lo, hi=hi, answers=suspect.query(x).labels,
                              leans=probability_leans(suspect.query(x).scores, lo, hi),
                              centre=expected_evidence(ranked.scores[:200], lo, hi, "scores"))
    assert res.details["z"] == pytest.approx(z, rel=1e-10) and "centred" in res.details
    plain = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=suspect, chosen=ranked,
                                    max_queries=200, round_size=200)
    assert "centred" not in plain.details and plain.details["z"] != pytest.approx(z)
    caught = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=Follower(api, q=0.9),
                                     chosen=ranked, alpha=1e-6, share=0.8, centred=True)
    assert caught.details["stopped"] == "evidence" and caught.queries < len(ranked.x)


def test_the_budget_is_respected_and_the_p_value_is_the_largest_e_value(logged):
    key, rule, _, backend, ranked = logged
    res = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=Linear(5), chosen=ranked,
                                  max_queries=230, round_size=50)
    assert res.queries == 230 and res.details["budget"] == 230 and res.details["stopped"] == "budget"
    assert res.details["rounds"] == len(res.trajectory) == 5 and res.details["max_queries"] == 230
    assert res.details["trajectory_queries"] == [50, 100, 150, 200, 230]
    assert "the budget of 230 inputs was asked" == res.details["stopped_because"]
    assert res.log10_p == pytest.approx(-max(0.0, *res.trajectory))
    assert res.details["directions"] <= res.details["rounds"]


def test_the_verdict_runs_it_with_its_share_of_alpha_and_the_fixed_mode_stays_the_default(logged):
    key, rule, api, backend, ranked = logged

    class Fixed:
        name, weight, null = "fixed", 1.0, "a fixed p-value"

        def run(self, suspect, *, alpha, share):
            return TestResult(name=self.name, evidence_of="copy", null={"why": self.null}, log10_p=0.0, queries=1,
                              matches=0)

    log_test = TieBreakLogTest(key=key, rule=rule, served=backend, chosen=ranked, mode="sequential")
    verdict = Verifier(key=key, alpha=1e-6, tests=[Fixed(), Fixed(), log_test]).run(suspect=Follower(api, q=0.9))
    seq = verdict.tests[2]
    assert seq.details["mode"] == "sequential" and seq.details["alpha_share"] == pytest.approx(0.8)
    assert seq.details["max_queries"] == SEQUENTIAL_BUDGET
    assert verdict.detected and verdict.kind == "extracted"
    fixed = TieBreakLogTest(key=key, rule=rule, served=backend, chosen=ranked, queries=300, rounds=3)
    res = fixed.run(Follower(api, q=0.9), alpha=1e-6, share=0.8)
    assert res.queries == 300 and res.details["rounds"] == 3 and "fixed n" in res.method


def test_errors(logged):
    key, rule, _, backend, ranked = logged
    ask = partial(tiebreak_log_sequential, key=key, rule=rule, served=backend, suspect=backend, chosen=ranked)
    with pytest.raises(UsageError, match=r"alpha must be in \(0, 1\)"):
        ask(alpha=0.0)
    with pytest.raises(UsageError, match=r"share \(of alpha, for a combined verdict\) must be in \(0, 1\]"):
        ask(share=1.5)
    with pytest.raises(UsageError, match="budget of logged inputs to ask must be at least 1"):
        ask(max_queries=0)
    with pytest.raises(UsageError, match="round_size must be at least 1"):
        ask(round_size=0)
    with pytest.raises(UsageError, match="rho must be positive"):
        ask(rho=-0.1)
    with pytest.raises(UsageError, match="another key"):
        tiebreak_log_sequential(key=generate_key(owner="x", num_classes=C, input_shape=(D,)), rule=rule,
                                served=backend, suspect=backend, chosen=ranked)
    with pytest.raises(UsageError, match="needs the API's log and the client"):
        tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=backend)
