"""API-side mark: determinism, the log, the exact conditional null, and bad input."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from scipy import stats

from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.models import build_model
from wmark.schemes.api_mark import (
    MarkedAPI,
    MarkLog,
    api_mark_test,
    candidate_set,
    input_digest,
    parse_candidates,
    poisson_binomial_log10_sf,
)
from wmark.suspects import Answers, LocalSuspect
from wmark.verify import decide

SHAPE = (1, 6, 6)
C = 5


def _model(seed: int) -> torch.nn.Module:
    return build_model("fmnist-mlp", num_classes=C, input_shape=SHAPE, seed=seed)


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


@pytest.fixture()
def key():
    return generate_key(owner="Test", num_classes=C, input_shape=SHAPE)


def _api(key, tmp_path, *, rate=0.2, candidates=2, client="thief", expose=True):
    log = MarkLog(tmp_path / "marks.sqlite", key=key, rate=rate, candidates=parse_candidates(candidates, C))
    backend = LocalSuspect(_model(0), input_shape=SHAPE)
    return MarkedAPI(key=key, backend=backend, rate=rate, candidates=candidates, log=log, client=client,
                     expose_scores=expose), log


def test_answers_are_deterministic_per_input_and_client_independent(key, tmp_path):
    api, log = _api(key, tmp_path)
    x = _inputs(400)
    a, b = api.query(x), api.for_client("other").query(x[::-1].copy())
    assert np.array_equal(a.labels, b.labels[::-1])
    plain = LocalSuspect(_model(0), input_shape=SHAPE).query(x)
    marked = a.labels != plain.labels
    assert 0.12 < marked.mean() < 0.28  # rate 0.2
    # Swapped scores: still a distribution, argmax is the keyed label, the top probability is kept.
    assert np.allclose(a.scores.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(a.scores.argmax(1), a.labels)
    assert np.allclose(a.scores.max(1), plain.scores.max(1))
    counts = log.clients()
    assert counts["thief"]["queries"] == 400 and counts["other"]["queries"] == 400
    assert counts["thief"]["kept"] == counts["other"]["kept"] >= marked.sum()
    for r in log.records("thief"):
        assert r["label"] in r["candidates"] and r["top1"] not in r["candidates"]
        assert input_digest(r["x"]) == r["digest"]


def test_label_only_api_and_candidate_sets(key, tmp_path):
    api, _ = _api(key, tmp_path, expose=False, candidates="all")
    assert api.query(_inputs(10)).scores is None
    assert candidate_set(np.array([0.1, 0.5, 0.3, 0.05, 0.05]), 2) == [2, 0]
    assert parse_candidates("all", 10) == 9
    with pytest.raises(UsageError, match="no randomness"):
        parse_candidates(1, 10)


def test_poisson_binomial_matches_scipy_and_brute_force():
    assert poisson_binomial_log10_sf(7, [0.25] * 20) == pytest.approx(np.log10(stats.binom.sf(6, 20, 0.25)))
    probs = [0.5, 1 / 3, 0.25, 0.5, 1 / 9, 1 / 3]
    pmf = np.array([1.0])
    for p in probs:
        pmf = np.convolve(pmf, [1 - p, p])
    for k in range(len(probs) + 1):
        assert poisson_binomial_log10_sf(k, probs) == pytest.approx(np.log10(pmf[k:].sum()), abs=1e-12)
    assert poisson_binomial_log10_sf(0, probs) == 0.0


def test_null_is_super_uniform_over_random_keys(tmp_path):
    # A model that never saw the marked answers: its p-values over fresh keys must satisfy P(p <= t) <= t.
    x = _inputs(300, seed=1)
    innocent = LocalSuspect(_model(7), input_shape=SHAPE, expose_scores=False)
    backend = LocalSuspect(_model(0), input_shape=SHAPE)
    pvals, anytime = [], []
    for i in range(150):
        k = generate_key(owner="null", num_classes=C, input_shape=SHAPE)
        log = MarkLog(tmp_path / f"n{i}.sqlite", key=k, rate=0.3, candidates=3)
        MarkedAPI(key=k, backend=backend, rate=0.3, candidates=3, log=log, client="c").query(x)
        res = api_mark_test(key=k, suspect=innocent, log=log, client="c", statistic="exact")
        assert res.details["conditioned"] > 10
        pvals.append(10 ** res.log10_p)
        anytime.append(10 ** res.details["anytime_log10_p"])
        log.close()
    for p in (np.array(pvals), np.array(anytime)):
        for t in (0.05, 0.1, 0.25, 0.5):
            # Binomial(150, t) upper 99.9 % quantile: a valid p-value exceeds it with probability < 0.001.
            assert (p <= t).sum() <= stats.binom.ppf(0.999, len(p), t)
    # The exact statistic is not conservative by much: its p-values spread over (0, 1].
    assert np.mean(np.array(pvals) <= 0.5) > 0.25


def test_a_model_that_learned_the_answers_is_detected(key, tmp_path):
    api, log = _api(key, tmp_path, rate=0.3, candidates=3)
    x = _inputs(400, seed=2)
    api.query(x)

    class Memoriser:  # answers exactly what the API answered
        description, num_classes, input_shape = "memoriser", C, SHAPE

        def query(self, inputs):
            return Answers(labels=api.query(inputs).labels)

    res = api_mark_test(key=key, suspect=Memoriser(), log=log, client="thief")
    assert res.matches == res.details["conditioned"] == res.queries
    assert res.details["exact_log10_p"] == pytest.approx(res.matches * np.log10(1 / 3))
    # The anytime-valid statistic is weaker but still far beyond 1/alpha, and is what the verdict uses.
    assert res.details["exact_log10_p"] < res.log10_p == res.details["anytime_log10_p"] < -20
    verdict = decide(key=key, tests=[res], alpha=1e-6, suspect="memoriser")
    assert verdict.decision == "detected" and verdict.kind == "extracted"
    # The served model itself answers its own top-1 on every marked input: no evidence of extraction.
    own = api_mark_test(key=key, suspect=LocalSuspect(_model(0), input_shape=SHAPE), log=log, client="thief")
    assert own.details["conditioned"] == 0 and own.log10_p == 0.0


def test_bad_input_is_refused_or_inconclusive(key, tmp_path):
    api, log = _api(key, tmp_path, rate=0.3)
    api.query(_inputs(200))
    innocent = LocalSuspect(_model(3), input_shape=SHAPE)
    with pytest.raises(UsageError, match="no marked queries for client 'nobody'"):
        api_mark_test(key=key, suspect=innocent, log=log, client="nobody")
    other = generate_key(owner="Other", num_classes=C, input_shape=SHAPE)
    with pytest.raises(UsageError, match="another key"):
        MarkLog(tmp_path / "marks.sqlite", key=other, create=False)
    with pytest.raises(UsageError, match="does not exist"):
        MarkLog(tmp_path / "missing.sqlite", key=key, create=False)
    wrong_classes = LocalSuspect(build_model("fmnist-mlp", num_classes=C + 1, input_shape=SHAPE), input_shape=SHAPE)
    with pytest.raises(UsageError, match="classes"):
        api_mark_test(key=key, suspect=wrong_classes, log=log, client="thief")

    class Abstainer:  # answers one query in five
        description, num_classes, input_shape = "flaky", C, SHAPE

        def query(self, inputs):
            labels = innocent.query(inputs).labels.copy()
            labels[np.arange(len(labels)) % 5 != 0] = -1
            return Answers(labels=labels)

    res = api_mark_test(key=key, suspect=Abstainer(), log=log, client="thief")
    verdict = decide(key=key, tests=[res], alpha=1e-6, suspect="flaky")
    assert verdict.decision == "not_detected" and verdict.status == "inconclusive"
    assert "answered only" in verdict.message
    log.close()
    with sqlite3.connect(tmp_path / "marks.sqlite") as db:  # an edited log: labels shifted
        db.execute(f"UPDATE inputs SET label = (label + 1) % {C}")
    with MarkLog(tmp_path / "marks.sqlite", key=key, create=False) as edited, \
            pytest.raises(UsageError, match="does not follow from this key"):
        api_mark_test(key=key, suspect=innocent, log=edited, client="thief")
    from wmark.schemes.querylog import TieBreakLog

    # one log format, but the test checks the mark
    with TieBreakLog(tmp_path / "tb.sqlite", key=key) as other_mark, \
            pytest.raises(UsageError, match="flip-mark test reads the flip mark's log"):
        api_mark_test(key=key, suspect=innocent, log=other_mark, client="thief")
    with pytest.raises(UsageError, match="written by the tiebreak mark's API, not the flip"):
        MarkLog(tmp_path / "tb.sqlite", key=key, create=False)


def test_api_refuses_mismatched_backend_and_inputs(key, tmp_path):
    backend = LocalSuspect(build_model("fmnist-mlp", num_classes=C + 2, input_shape=SHAPE), input_shape=SHAPE)
    with pytest.raises(UsageError, match="answers over 7"):
        MarkedAPI(key=key, backend=backend)
    api, _ = _api(key, tmp_path)
    with pytest.raises(UsageError, match="inputs shaped"):
        api.query(np.zeros((2, 1, 5, 5), dtype=np.float32))
    with pytest.raises(UsageError, match="rate"):
        MarkLog(tmp_path / "marks.sqlite", key=key, rate=0.5, candidates=2)
    with pytest.raises(UsageError, match="Unknown statistic"):
        api_mark_test(key=key, suspect=api, log=api.log, client="thief", statistic="bayes")
