"""Keyed tie-breaking: exact N(0, 1) null, what the API changes, a rule-follower is caught, errors."""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial

import numpy as np
import pytest
import torch
from _api_helpers import Follower, LinearModel
from keykit import seeded_key
from scipy import stats

from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors, wmark_metadata
from wmark.keys import generate_key
from wmark.schemes.tiebreak import (
    DEFAULT_LOG_ROUNDS,
    LOG_MIN_RATIO,
    REFERENCE_RECIPES,
    REFERENCE_REPEATS,
    KeyTriggers,
    TieBreakAPI,
    TieBreakLog,
    accuracy_cost,
    build_tiebreak_rule,
    commit_verification_inputs,
    load_tiebreak_rule,
    open_tiebreak_rule,
    probability_leans,
    select_log_inputs,
    select_verification_inputs,
    tiebreak_log_test,
    tiebreak_statistic,
    tiebreak_test,
    top_pairs,
    train_reference_surrogates,
)
from wmark.schemes.trigger_set import generate_triggers
from wmark.suspects import Answers
from wmark.training import predict_logits

C, D, F = 4, 6, 12
Linear = partial(LinearModel, num_classes=C, dims=D)


_PROJ = np.random.default_rng(99).normal(size=(D, F))


def featurizer(x: np.ndarray) -> np.ndarray:
    """A fixed nonlinear feature map (stands in for the served model's penultimate layer)."""
    return np.tanh(np.asarray(x, dtype=np.float64) @ _PROJ)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1500, D)).astype(np.float32)


def make(key, data, backend, **kw):
    rule = build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="test",
                               components=kw.pop("components", 8))
    return rule, TieBreakAPI(key=key, backend=backend, rule=rule, **kw)


def test_the_keys_own_triggers_are_answered_unshifted_and_no_other_input_is(data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,), num_triggers=60)
    backend = Linear(1)
    _, api = make(key, data, backend, beta=25.0)
    triggers = generate_triggers(key).queries(np.arange(60))
    plain = backend.query(triggers)
    marked = api.for_client("owner").query(triggers)
    np.testing.assert_array_equal(marked.labels, plain.labels)
    np.testing.assert_allclose(marked.scores, plain.scores / plain.scores.sum(1, keepdims=True), atol=1e-9)
    # one float32 step away a trigger is an ordinary input, and a mixed batch is answered row by row
    nudged = np.nextafter(triggers, np.float32(2.0)).astype(np.float32)
    assert (api.query(nudged).labels != plain.labels).mean() > 0.3
    mixed = np.concatenate([data[:40], triggers[:5], nudged[5:10]])
    answers = api.query(mixed).labels
    np.testing.assert_array_equal(answers[:40], api.query(data[:40]).labels)
    np.testing.assert_array_equal(answers[40:45], plain.labels[:5])
    np.testing.assert_array_equal(answers[45:], api.query(nudged[5:10]).labels)
    untriggered = dataclasses.replace(key, schemes={n: p for n, p in key.schemes.items() if n != "trigger"})
    assert not KeyTriggers(untriggered).mask(triggers).any()


def test_api_shifts_by_the_keyed_head_changes_only_close_calls_and_is_deterministic(data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rule, api = make(key, data, backend)
    first, second = api.query(data), api.query(data)
    np.testing.assert_array_equal(first.labels, second.labels)
    plain = backend.query(data)
    expected = np.log(plain.scores) + rule.shifts(data)
    np.testing.assert_allclose(np.log(first.scores) - np.log(first.scores).mean(1, keepdims=True),
                               expected - expected.mean(1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(first.scores.sum(1), 1.0)
    assert (first.scores.argmax(1) == first.labels).all()
    ratio, _, _ = top_pairs(plain.scores)
    changed = first.labels != plain.labels
    assert 0 < changed.mean() < 0.5
    # a label changes only where the keyed shift can beat the margin (|u_a - u_b| <= 2 max |u|)
    assert (np.log(1 / ratio[changed]) <= 2 * np.abs(rule.shifts(data[changed])).max(1)).all()
    assert 0.5 < rule.shifts(data).std() < 2.0  # u_c(x) is about N(0, 1): beta is in log-odds units
    labels_only = TieBreakAPI(key=key, backend=backend, rule=rule, expose_scores=False).query(data)
    assert labels_only.scores is None
    np.testing.assert_array_equal(labels_only.labels, first.labels)
    cost = accuracy_cost(api=api, x=data, y=plain.labels)
    assert cost["served_accuracy"] == 1.0
    assert cost["accuracy_cost_pp"] == pytest.approx(100 * cost["changed_fraction"])


def test_an_empty_batch_is_answered_empty_and_logs_nothing(tmp_path, data):
    from wmark.models import build_model, penultimate_featurizer
    from wmark.suspects import LocalSuspect

    key = generate_key(owner="o", num_classes=C, input_shape=(D,), num_triggers=10)
    net = build_model("fmnist-mlp", num_classes=C, input_shape=(D,), seed=0).eval()
    local = LocalSuspect(net, input_shape=(D,))
    fused = build_tiebreak_rule(key=key, x=data, featurizer=penultimate_featurizer(net), feature_space="t",
                                components=8)
    with TieBreakLog(tmp_path / "log.sqlite", key=key) as log:
        for api in (make(key, data, Linear(1), log=log)[1], TieBreakAPI(key=key, backend=local, rule=fused)):
            for scores in (True, False):
                got = TieBreakAPI(key=key, backend=api.backend, rule=api.rule, log=api.log,
                                  expose_scores=scores).query(data[:0])
                assert got.labels.shape == (0,) and (got.scores is None or got.scores.shape == (0, C))
        assert log.clients() == {}


def test_statistic_is_exactly_standard_normal_for_a_key_independent_suspect(data):
    # One fixed served model and one fixed innocent suspect, 400 fresh keys: Z must be N(0, 1) (KS test
    # against scipy), the p-value must be scipy's normal tail, and rejection rates must respect their level.
    # Both readings of the suspect: its labels' signs, and its probabilities' clipped lean.
    backend, suspect = Linear(1), Linear(2)
    for use_scores, read in ((False, "labels"), (True, "probabilities")):
        zs, logs = [], []
        for i in range(400):
            key = seeded_key(f"tiebreak/null/{i}", owner=f"k{i}", num_classes=C, input_shape=(D,))
            rule, _ = make(key, data, backend)
            res = tiebreak_test(key=key, rule=rule, served=backend, suspect=suspect, inputs=data, queries=300,
                                use_scores=use_scores)
            assert res.details["read"].startswith(read)
            zs.append(res.details["z"])
            logs.append(res.log10_p)
            assert res.log10_p == pytest.approx(min(0.0, stats.norm.logsf(res.details["z"]) / np.log(10)),
                                                abs=1e-9)
        assert stats.kstest(zs, "norm").pvalue > 1e-3
        p = 10.0 ** np.asarray(logs)
        for a in (0.01, 0.05, 0.2, 0.5):
            assert stats.binom.sf((p <= a).sum() - 1, len(p), a) > 1e-3


def test_probability_leans_read_only_probabilities():
    lo, hi = np.array([0, 0, 1, 0]), np.array([1, 2, 2, 1])
    probs = np.array([[0.5, 0.2, 0.3], [0.98, 0.01, 0.01], [0.2, 0.3, 0.5], [np.nan] * 3])
    np.testing.assert_allclose(probability_leans(probs, lo, hi), [np.log(2.5), 2.0, np.log(0.6), 0.0])
    assert probability_leans(None, lo, hi) is None
    assert probability_leans(np.log(probs[:3]), lo[:3], hi[:3]) is None  # logits are not guessed at
    assert probability_leans(probs * 2, lo, hi) is None


def test_statistic_matches_a_direct_computation():
    # Z = sum_c <w_c, v_c> / sqrt(sum_c |v_c|^2), phi centred per pair, v_c = sum_i phi_i (s_i ([lo_i = c] -
    # [hi_i = c]) + t_i ([o_i = c] - ([lo_i = c] + [hi_i = c]) / 2)), t_i = 1 for a label o_i outside the pair.
    key = generate_key(owner="o", num_classes=3, input_shape=(D,))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, D)).astype(np.float32)
    rule = build_tiebreak_rule(key=key, x=x, featurizer=featurizer, feature_space="test", components=5)
    psi = rng.normal(size=(40, 5))
    lo = np.array([0] * 20 + [1] * 20)
    hi = np.array([1] * 20 + [2] * 20)
    answers = rng.integers(-1, 3, size=40)
    z, info = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers)
    s = np.where(answers == lo, 1.0, np.where(answers == hi, -1.0, 0.0))
    p1, p2 = psi[:20] - psi[:20].mean(0), psi[20:] - psi[20:].mean(0)
    o1, o2 = (answers[:20] == 2).astype(float), (answers[20:] == 0).astype(float)  # the class outside each pair

    def direct(c: np.ndarray, t: float) -> float:
        v = np.stack([c[:20] @ p1 - t / 2 * o1 @ p1 + t * o2 @ p2,
                      c[20:] @ p2 - c[:20] @ p1 - t / 2 * (o1 @ p1 + o2 @ p2),
                      -(c[20:] @ p2) + t * o1 @ p1 - t / 2 * o2 @ p2])
        return float((rule.directions * v).sum() / np.sqrt((v ** 2).sum()))

    assert o1.sum() > 0 and o2.sum() > 0
    assert z == pytest.approx(direct(s, 1.0), rel=1e-12)
    assert info["in_pair"] == int((s != 0).sum()) and info["outside_pair"] == int(o1.sum() + o2.sum())
    # probabilities are read as the pair's clipped lean only
    leans = rng.normal(size=40)
    z, info2 = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers, leans=leans)
    assert z == pytest.approx(direct(leans, 0.0), rel=1e-12) and info2 == info


def test_a_rule_follower_is_caught_and_the_unmarked_server_is_not(data):
    # Fixed keys keep this deterministic: over fresh random keys the follower's log10 p spreads from about
    # -3.5 to -12 (the evidence is capped near sqrt(pairs * components) standard deviations here).
    caught, innocent = [], []
    for seed in range(5):
        key = seeded_key(f"tiebreak/{seed}", owner="o", num_classes=C, input_shape=(D,))
        backend = Linear(1)
        rule, api = make(key, data, backend, beta=3.0, components=F)
        res = tiebreak_test(key=key, rule=rule, served=backend, suspect=Follower(api, q=0.9, seed=seed),
                            inputs=data, queries=600)
        assert res.evidence_of == "extracted" and res.matches > 0.6 * res.details["in_pair"]
        caught.append(res.log10_p)
        innocent.append(tiebreak_test(key=key, rule=rule, served=backend, suspect=backend, inputs=data,
                                      queries=600).log10_p)
    assert max(caught) < -3 and np.median(caught) < -5, caught
    assert min(innocent) > -3, innocent


def test_the_log_keeps_each_clients_near_tie_inputs_and_is_bound_to_the_key(tmp_path, data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    path = tmp_path / "tiebreak.sqlite"
    with TieBreakLog(path, key=key) as log:
        rule, api = make(key, data, backend, log=log)
        api.for_client("alice").query(data[:500])
        api.for_client("alice").query(data[:100])  # asked again: counted, kept once
        api.for_client("bob").query(data[500:800])
        ratio, _, _ = top_pairs(backend.query(data).scores)
        near = ratio >= LOG_MIN_RATIO
        assert 0 < near[:500].sum() < 500  # the filter keeps some and drops some
        assert log.clients() == {"alice": {"queries": 600, "kept": int(near[:500].sum())},
                                 "bob": {"queries": 300, "kept": int(near[500:800].sum())}}
        np.testing.assert_array_equal(log.inputs("alice"), data[:500][near[:500]])
        with pytest.raises(UsageError, match=r"no inputs of client 'carol' \(clients: alice, bob\)"):
            log.inputs("carol")
    with TieBreakLog(path, key=key, create=False) as reopened:
        np.testing.assert_array_equal(reopened.inputs("bob"), data[500:800][near[500:800]])
    with pytest.raises(UsageError, match="written under another key"):
        TieBreakLog(path, key=generate_key(owner="x", num_classes=C, input_shape=(D,)))
    with pytest.raises(UsageError, match="does not exist; the marked API writes it"):
        TieBreakLog(tmp_path / "missing.sqlite", key=key, create=False)
    from wmark.schemes.api_mark import MarkLog

    MarkLog(tmp_path / "mark.sqlite", key=key, rate=0.1, candidates=2).close()
    with pytest.raises(UsageError, match="written by the flip mark's API, not the tiebreak mark's"):
        TieBreakLog(tmp_path / "mark.sqlite", key=key)
    with MarkLog(tmp_path / "mark.sqlite", key=key) as flip, pytest.raises(UsageError, match="belongs to the flip"):
        TieBreakAPI(key=key, backend=backend, rule=rule, log=flip)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(UsageError, match="not a readable SQLite query log"):
        TieBreakLog(tmp_path / "junk.sqlite", key=key)
    other = generate_key(owner="x", num_classes=C, input_shape=(D,))
    with TieBreakLog(tmp_path / "other.sqlite", key=other) as log, pytest.raises(UsageError, match="another key"):
        TieBreakAPI(key=key, backend=backend, rule=rule, log=log)


def test_a_log_is_bound_to_the_rule_and_served_model_that_answered_its_clients(tmp_path, data):
    # a log written while one rule served is no evidence about another rule's head: refused, not read silently
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    served = build_tiebreak_rule(key=key, x=data[:1000], featurizer=featurizer, feature_space="test", components=8)
    other = build_tiebreak_rule(key=key, x=data[500:], featurizer=featurizer, feature_space="test", components=8)
    moved = dataclasses.replace(served, model_digest="another served model")
    path = tmp_path / "tiebreak.sqlite"
    with TieBreakLog(path, key=key) as log:
        TieBreakAPI(key=key, backend=backend, rule=served, log=log).for_client("alice").query(data[:300])
        assert log.rule == served.served_digest  # the API answering into a new log binds it to its rule
    refused = "written while another tie-break rule or served model answered"
    for rule in (other, moved):
        with TieBreakLog(path, key=key, create=False) as log:
            with pytest.raises(UsageError, match=refused):
                TieBreakAPI(key=key, backend=backend, rule=rule, log=log)
            with pytest.raises(UsageError, match=refused):
                select_log_inputs(key=key, rule=rule, served=backend, log=log, client="alice")
    with TieBreakLog(path, key=key, create=False) as log:
        assert log.rule == served.served_digest
        assert len(select_log_inputs(key=key, rule=served, served=backend, log=log, client="alice").x) > 0


def test_a_log_keeps_at_most_max_kept_inputs_per_client_the_first_ones_and_counts_the_rest(tmp_path, data):
    from wmark.schemes.api_mark import MarkedAPI, MarkLog
    from wmark.schemes.querylog import LOG_MAX_KEPT, QueryLog

    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    near = top_pairs(backend.query(data).scores)[0] >= LOG_MIN_RATIO
    with TieBreakLog(tmp_path / "default.sqlite", key=key) as log:
        assert log.max_kept == LOG_MAX_KEPT and log.params["max_kept"] == LOG_MAX_KEPT
    with QueryLog(tmp_path / "small.sqlite", key=key, mark="tiebreak", params={"max_kept": 25}, create=True) as log:
        _, api = make(key, data, backend, log=log)
        for start in range(0, 300, 10):  # the cap falls inside a request
            api.for_client("alice").query(data[start:start + 10])
        api.for_client("alice").query(data[:50])  # asked again: nothing new kept
        api.for_client("bob").query(data[300:400])
        assert log.clients() == {"alice": {"queries": 350, "kept": 25}, "bob": {"queries": 100, "kept": 25}}
        np.testing.assert_array_equal(log.inputs("alice"), data[:300][near[:300]][:25])
        np.testing.assert_array_equal(log.inputs("bob"), data[300:400][near[300:400]][:25])
    with TieBreakLog(tmp_path / "small.sqlite", key=key, create=False) as reopened:  # the cap is the log's own
        _, api = make(key, data, backend, log=reopened)
        api.for_client("alice").query(data[400:])
        assert reopened.max_kept == 25 and reopened.clients()["alice"] == {"queries": 1450, "kept": 25}
    with MarkLog(tmp_path / "flip.sqlite", key=key, rate=0.5, candidates=2) as flip:
        flip.params["max_kept"] = 10  # as a log created with that cap
        MarkedAPI(key=key, backend=backend, rate=0.5, candidates=2, log=flip, client="c").query(data[:200])
        assert flip.clients()["c"] == {"queries": 200, "kept": 10}
    for bad in (0, 2.5, True):
        with pytest.raises(UsageError, match="max_kept .* is not a positive integer"):
            QueryLog(tmp_path / f"bad{bad}.sqlite", key=key, mark="tiebreak", params={"max_kept": bad}, create=True)
        assert not (tmp_path / f"bad{bad}.sqlite").exists()


def test_a_client_name_with_control_characters_reaches_no_message_raw(tmp_path, data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    odd = "eve\n\x1b[2Jerror: forged"
    with TieBreakLog(tmp_path / "odd.sqlite", key=key) as log:
        _, api = make(key, data, Linear(1), log=log)
        api.for_client(odd).query(data[:50])
        api.for_client("alice").query(data[:50])
        np.testing.assert_array_equal(log.inputs(odd), log.inputs("alice"))  # stored and read back exactly
        with pytest.raises(UsageError) as err:
            log.inputs("carol")
    assert str(err.value).endswith("(clients: alice, 'eve\\n\\x1b[2Jerror: forged').")


def test_log_test_is_exactly_standard_normal_for_a_fixed_client_and_catches_a_follower(tmp_path, data):
    # A client whose queries are a fixed dataset (not chosen by the answers): over 300 keys an innocent
    # suspect's Z on that client's logged inputs is N(0, 1) (KS against scipy), with the later rounds
    # following the references that call its answers best. A rule follower is caught.
    backend, innocent = Linear(1), Linear(2)
    refs = tuple(train_reference_surrogates(served=backend, x=data, archs=["fmnist-mlp"], queries=400))
    zs, label_zs = [], []
    for i in range(300):
        key = seeded_key(f"tiebreak/log-null/{i}", owner=f"k{i}", num_classes=C, input_shape=(D,))
        with TieBreakLog(tmp_path / f"log{i}.sqlite", key=key) as log:
            rule, api = make(key, data, backend, log=log)
            rule = dataclasses.replace(rule, references=refs)
            api.for_client("c").query(data[:1000])
            res = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=innocent, log=log, client="c",
                                    queries=300)
            zs.append(res.details["z"])
            # read from its labels, the later rounds also follow the labels it gave outside each pair
            labels = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=innocent, log=log, client="c",
                                       queries=300, use_scores=False)
            assert labels.details["read"] == "labels"
            label_zs.append(labels.details["z"])
    assert res.name == "api-tiebreak-log" and res.evidence_of == "extracted" and res.queries == 300
    assert "without regard to the marked answers" in res.null["assumption"]
    assert res.details["client"] == "c" and "1000 queries logged" in res.details["selection"]
    n_refs = REFERENCE_REPEATS * len(REFERENCE_RECIPES)
    assert f"most open for the rule's {n_refs} reference surrogates" in res.details["selection"]
    assert f"asked in {DEFAULT_LOG_ROUNDS} rounds, the first 15 by that ranking" in res.details["selection"]
    assert stats.kstest(zs, "norm").pvalue > 1e-3
    assert stats.kstest(label_zs, "norm").pvalue > 1e-3
    key = seeded_key("tiebreak/log-follower", owner="o", num_classes=C, input_shape=(D,))
    with TieBreakLog(tmp_path / "follow.sqlite", key=key) as log:
        rule, api = make(key, data, backend, log=log, beta=3.0, components=F)
        api.for_client("thief").query(data)
        caught = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=Follower(api, q=0.9), log=log,
                                   client="thief", queries=600)
        clean = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, log=log, client="thief",
                                  queries=600)
        with pytest.raises(UsageError, match="another key"):
            tiebreak_log_test(key=generate_key(owner="x", num_classes=C, input_shape=(D,)), rule=rule,
                              served=backend, suspect=backend, log=log, client="thief")
        with pytest.raises(UsageError, match="queries must be at least 1"):
            tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, log=log, client="thief", queries=0)
        with pytest.raises(UsageError, match="rounds must be at least 1"):
            tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, log=log, client="thief", rounds=0)
        with pytest.raises(UsageError, match=r"first_share must be in \(0, 1\]"):
            tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, log=log, client="thief",
                              first_share=0)
        committed = tiebreak_test(key=key, rule=rule, served=backend, suspect=Follower(api, q=0.9), inputs=data,
                                  queries=600)
        # ranked once, asked of several suspects: the same test
        ranked = select_log_inputs(key=key, rule=rule, served=backend, log=log, client="thief")
        again = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, chosen=ranked, queries=600)
        assert again.log10_p == clean.log10_p and again.details["selection"] == clean.details["selection"]
        with pytest.raises(UsageError, match="needs the API's log and the client"):
            tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, log=log)
    assert caught.log10_p < -5 and clean.log10_p > -3, (caught.log10_p, clean.log10_p)
    # a verdict resting on the log test alone says so; with the assumption-free test also rejecting, it need not
    from wmark.verify import decide

    alone = decide(key=key, tests=[caught, clean], alpha=1e-3, suspect="s")
    assert alone.kind == "extracted"
    assert "rests on a stated assumption (api-tiebreak-log: the client chose its queries" in alone.message
    assert decide(key=key, tests=[committed, caught], alpha=1e-3, suspect="s").message == ""


def test_later_rounds_follow_the_references_that_call_the_suspects_answers_best():
    from wmark.schemes.tiebreak.tests import FOLLOWED_REFERENCES, _closest_references

    rng = np.random.default_rng(3)
    answers = rng.choice([-1.0, 1.0, 0.0], size=200)
    agreeing = np.where(answers == 0, rng.normal(size=200), answers * rng.uniform(0.1, 2, size=200))
    per_ref = rng.normal(size=(12, 200))
    assert FOLLOWED_REFERENCES == 4
    follow = [2, 5, 7, 11]
    per_ref[follow] = agreeing + 0.01 * rng.normal(size=(4, 200))  # these four call every answer
    asked = np.arange(120)
    got = _closest_references(per_ref.mean(axis=0), per_ref, asked=asked, evidence=answers[asked])
    np.testing.assert_allclose(got, per_ref[follow].mean(axis=0))
    # with fewer than twice as many references, half of them are followed
    four = per_ref[[0, 2, 3, 5]]
    got = _closest_references(four.mean(axis=0), four, asked=asked, evidence=answers[asked])
    np.testing.assert_allclose(got, per_ref[[2, 5]].mean(axis=0))
    # no references, or no answer in a pair yet: the mean lean the ranking used
    mean = per_ref.mean(axis=0)
    np.testing.assert_array_equal(_closest_references(mean, None, asked=asked, evidence=answers[asked]), mean)
    np.testing.assert_array_equal(_closest_references(mean, per_ref, asked=asked, evidence=np.zeros(120)), mean)


def test_verification_inputs_are_the_nearest_ties():
    scores = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2], [0.6, 0.3, 0.1]])
    np.testing.assert_array_equal(select_verification_inputs(scores=scores, count=2), [2, 0])
    np.testing.assert_array_equal(select_verification_inputs(scores=scores, count=10, min_ratio=0.45), [2, 0, 3])


def test_reference_ranking_puts_the_most_open_calls_first():
    served = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    # served pairs (lo, hi): (0, 1), (0, 1), (0, 1), (0, 2); the references' log(p_lo / p_hi) averages
    # to 1.0, -1.5, 0.05 and 0.0 on the four rows
    ref1 = np.array([[np.e, 1, 1], [1, np.e ** 2, 1], [np.e ** 0.1, 1, 1], [1, 1, 1]], dtype=float)
    ref2 = np.array([[np.e, 1, 1], [1, np.e, 1], [1, 1, 1], [1, 5, 1]], dtype=float)
    refs = [r / r.sum(1, keepdims=True) for r in (ref1, ref2)]
    np.testing.assert_array_equal(select_verification_inputs(scores=served, count=4, reference_scores=refs),
                                  [3, 2, 0, 1])
    with pytest.raises(UsageError, match="Reference scores are shaped"):
        select_verification_inputs(scores=served, count=2, reference_scores=[refs[0][:3]])


def test_committed_inputs_are_key_independent_saved_and_used(tmp_path, data):
    backend = Linear(1)
    refs = train_reference_surrogates(served=backend, x=data, archs=["fmnist-mlp"], queries=400)
    n_refs = REFERENCE_REPEATS * len(REFERENCE_RECIPES)
    assert len(refs) == n_refs
    # each repeat of a recipe has its own seed, so no two references are the same network
    outputs = [predict_logits(net, torch.from_numpy(data)).numpy() for _, net in refs]
    assert all(not np.allclose(outputs[i], outputs[j]) for i in range(n_refs) for j in range(i))
    with pytest.raises(UsageError, match="repeats must be at least 1"):
        train_reference_surrogates(served=backend, x=data, archs=["fmnist-mlp"], repeats=0)
    chosen = []
    for owner in ("a", "b"):
        key = generate_key(owner=owner, num_classes=C, input_shape=(D,))
        rule = commit_verification_inputs(make(key, data, backend)[0], served=backend, x=data, references=refs,
                                          count=300, how="test")
        chosen.append(rule.verification_inputs)
    # the committed inputs depend on the served model and the references, never on the key
    np.testing.assert_array_equal(chosen[0], chosen[1])
    rule.save(tmp_path / "rule.safetensors")
    back = load_tiebreak_rule(tmp_path / "rule.safetensors", key=key, featurizer=featurizer)
    np.testing.assert_array_equal(back.verification_inputs, chosen[1])
    assert back.verification == f"{n_refs} reference surrogates (test)"
    res = tiebreak_test(key=key, rule=back, served=backend, suspect=backend, queries=120)
    assert res.queries == 120 and res.details["selection"].startswith(f"committed in the rule: {n_refs} reference")
    # the references travel with the rule and rank a client's logged inputs the same way
    assert [arch for arch, _ in back.references] == ["fmnist-mlp"] * n_refs
    for (_, saved), (_, loaded) in zip(refs, back.references):
        np.testing.assert_allclose(predict_logits(loaded, torch.from_numpy(data)).numpy(),
                                   predict_logits(saved, torch.from_numpy(data)).numpy(), atol=1e-6)
    with TieBreakLog(tmp_path / "log.sqlite", key=key) as log:
        TieBreakAPI(key=key, backend=backend, rule=back, log=log, client="c").query(data)
        logged = log.inputs("c")

        class Recorder:
            description, num_classes, input_shape, asked = "recorder", C, (D,), []

            def query(self, x):
                self.asked.append(np.array(x))
                return backend.query(x)

        res = tiebreak_log_test(key=key, rule=back, served=backend, suspect=Recorder(), log=log, client="c", queries=50,
                                rounds=1)
        one_round = np.concatenate(Recorder.asked)
        Recorder.asked = []
        rounds = tiebreak_log_test(key=key, rule=back, served=backend, suspect=Recorder(), log=log, client="c",
                                   queries=50, rounds=4, first_share=0.4)
        four = Recorder.asked
        Recorder.asked = []
        default = tiebreak_log_test(key=key, rule=back, served=backend, suspect=Recorder(), log=log, client="c",
                                    queries=50)
    assert res.details["selection"].startswith(f"most open for the rule's {n_refs} reference surrogates among the {len(logged)}")
    expected = select_verification_inputs(scores=backend.query(logged).scores, count=50, min_ratio=0.0,
                                          reference_scores=[torch.softmax(predict_logits(n, torch.from_numpy(logged))
                                                                          .double(), 1).numpy() for _, n in refs])
    assert res.queries == 50 and rounds.queries == 50
    np.testing.assert_array_equal(one_round, logged[expected])
    # in rounds: the first 40 % by the same ranking, then 50 distinct logged inputs in all
    assert [len(a) for a in four] == [20, 10, 10, 10] and rounds.details["rounds"] == 4
    np.testing.assert_array_equal(four[0], logged[expected[:20]])
    asked = np.concatenate(four)
    assert len(np.unique(asked, axis=0)) == 50 and "asked in 4 rounds" in rounds.details["selection"]
    assert {a.tobytes() for a in asked} <= {x.tobytes() for x in logged}
    # the default: a 5 % start (3 of 50), then 20 rounds of 2 or 3, still 50 distinct logged inputs
    sizes = [len(a) for a in Recorder.asked]
    assert sizes[0] == 3 and len(sizes) == DEFAULT_LOG_ROUNDS and set(sizes[1:]) == {2, 3} and sum(sizes) == 50
    np.testing.assert_array_equal(Recorder.asked[0], logged[expected[:3]])
    assert len(np.unique(np.concatenate(Recorder.asked), axis=0)) == 50
    assert default.details["rounds"] == DEFAULT_LOG_ROUNDS
    tensors, raw = load_tensors(tmp_path / "rule.safetensors")
    save_tensors({n: t for n, t in tensors.items() if not n.startswith("reference1/")}, tmp_path / "damaged.safetensors",
                 metadata=wmark_metadata(raw))
    with pytest.raises(UsageError, match="Reference surrogate 1 in the tie-break rule .* does not fit"):
        load_tiebreak_rule(tmp_path / "damaged.safetensors", key=key, featurizer=featurizer)
    plain = make(key, data, backend)[0]
    with pytest.raises(UsageError, match="carries no committed verification inputs"):
        tiebreak_test(key=key, rule=plain, served=backend, suspect=backend)


def test_save_load_roundtrip_rederives_directions(tmp_path, data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rule, api = make(key, data, backend)
    rule.save(tmp_path / "rule.safetensors")
    back = load_tiebreak_rule(tmp_path / "rule.safetensors", key=key, featurizer=featurizer)
    np.testing.assert_array_equal(back.directions, rule.directions)
    np.testing.assert_allclose(back.shifts(data[:5]), rule.shifts(data[:5]))
    again = TieBreakAPI(key=key, backend=backend, rule=back)
    np.testing.assert_array_equal(again.query(data).labels, api.query(data).labels)
    with pytest.raises(UsageError, match="built under another key"):
        load_tiebreak_rule(tmp_path / "rule.safetensors", key=generate_key(owner="x", num_classes=C,
                                                                             input_shape=(D,)), featurizer=featurizer)
    # a rule file re-bound to a key for another class count is refused, not misread
    other = dataclasses.replace(key, num_classes=3)
    tensors, raw = load_tensors(tmp_path / "rule.safetensors")
    save_tensors(tensors, tmp_path / "rule3.safetensors",
                 metadata={**wmark_metadata(raw), "key_commitment": other.commitment()})
    with pytest.raises(UsageError, match="for 4 classes, the key for 3"):
        load_tiebreak_rule(tmp_path / "rule3.safetensors", key=other, featurizer=featurizer)


def test_a_model_file_given_as_the_rule_is_named_as_not_a_rule(tmp_path):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    save_tensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors", metadata={"arch": "fmnist-mlp"})
    with pytest.raises(UsageError, match=r"model.safetensors is not a wmark tie-break rule; build one with"):
        open_tiebreak_rule(key=key, rule=tmp_path / "model.safetensors")


def test_a_rule_opened_with_another_key_names_the_key_before_building_the_served_model(tmp_path, data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    make(key, data, Linear(1))[0].save(tmp_path / "rule.safetensors")
    other = generate_key(owner="o", num_classes=C + 3, input_shape=(D,))
    with pytest.raises(UsageError, match=r"rule.safetensors was built under another key; use the key that served"):
        open_tiebreak_rule(key=other, rule=tmp_path / "rule.safetensors")


def test_a_rule_without_the_served_models_digest_is_refused_wherever_its_served_model_is_opened(tmp_path, data):
    # built through the Python API without model_digest, the rule would take any model as its served one: serving
    # (and logging) with one model, then verifying with another, chosen after the answers were seen
    from wmark.io import save_model
    from wmark.marks import open_served
    from wmark.models import build_model, model_metadata
    from wmark.schemes.tiebreak import tiebreak_tests_from_files

    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    for seed in (1, 2):
        save_model(build_model("fmnist-mlp", num_classes=C, input_shape=(D,), seed=seed),
                   tmp_path / f"served{seed}.safetensors",
                   metadata=model_metadata(arch="fmnist-mlp", num_classes=C, input_shape=(D,)))
    rule = dataclasses.replace(make(key, data, Linear(1))[0], served_arch="fmnist-mlp",
                               served_path=str(tmp_path / "served1.safetensors"))
    assert rule.model_digest == ""
    rule.save(tmp_path / "rule.safetensors")
    refused = (r"rule.safetensors records no digest of the served model it was built from, so any model would pass "
               r"for it; rebuild it with `wmark tiebreak build` \(or build_tiebreak_rule with model_digest=")
    for served in (None, tmp_path / "served2.safetensors"):
        with pytest.raises(UsageError, match=refused):
            open_tiebreak_rule(key=key, rule=tmp_path / "rule.safetensors", served=served)
        with pytest.raises(UsageError, match=refused):
            open_served(key=key, mark="tiebreak", rule=tmp_path / "rule.safetensors", weights=served)
        with pytest.raises(UsageError, match=refused):
            tiebreak_tests_from_files(key=key, rule=tmp_path / "rule.safetensors", served=served)


@pytest.mark.parametrize(("change", "message"), [
    ({"projection": torch.zeros(3, 2)}, r"damaged \(feature map of shapes \(\d+,\) and \(3, 2\), or not finite\)"),
    ({"mean": torch.full((D,), float("nan"))}, r"damaged \(feature map .* or not finite\)"),
    ({"wmark.version": "x"}, r"damaged \(version 'x'\)"),
    ({"wmark.skipped_leading": "x"}, r"damaged \(skipped_leading 'x'\)"),
    ({"wmark.input_shape": '["a"]'}, r"damaged \(input shape \['a'\]\)"),
])
def test_a_damaged_rule_file_is_refused_in_one_sentence(tmp_path, data, change, message):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    make(key, data, Linear(1))[0].save(tmp_path / "rule.safetensors")
    tensors, raw = load_tensors(tmp_path / "rule.safetensors")
    tensors.update({n: t for n, t in change.items() if not n.startswith("wmark.")})
    save_tensors(tensors, tmp_path / "bad.safetensors",
                 metadata={**{n: v for n, v in wmark_metadata(raw).items() if f"wmark.{n}" not in change},
                           **{n: v for n, v in change.items() if n.startswith("wmark.")}})  # stored text, verbatim
    with pytest.raises(UsageError, match=rf"^The tie-break rule .*bad.safetensors is {message}; rebuild it with"):
        load_tiebreak_rule(tmp_path / "bad.safetensors", key=key, featurizer=featurizer)


def test_the_leading_directions_are_left_out_and_the_rest_whitened(tmp_path):
    rng = np.random.default_rng(3)
    scales = np.array([40, 30, 20, 9, 8, 7, 6, 5, 4, 1, 0.7, 0.5])  # well separated around the cut
    x = (rng.normal(size=(4000, 12)) * scales).astype(np.float32)
    key = generate_key(owner="o", num_classes=C, input_shape=(12,))
    rule = build_tiebreak_rule(key=key, x=x, featurizer=lambda v: v, feature_space="t", components=6, skip=3)
    # The kept directions are the 4th to 9th largest-variance columns; the others carry (almost) no weight.
    weight = np.abs(rule.projection).sum(axis=1)
    assert np.all(weight[:3] < 0.05 * weight[3:9].min()) and np.all(weight[9:] < 0.05 * weight[3:9].min())
    # Exactly orthogonal to the three leading sample principal directions (in covariance).
    lead = np.linalg.eigh(np.cov((x - x.mean(0)).T.astype(np.float64)))[1][:, -3:]
    np.testing.assert_allclose(np.cov(np.c_[(x - x.mean(0)) @ lead, rule.features(x)].T)[:3, 3:], 0, atol=1e-6)
    psi = rule.features(x)
    np.testing.assert_allclose(np.cov(psi.T), np.eye(6), atol=1e-6)
    rule.save(tmp_path / "rule.safetensors")
    loaded = load_tiebreak_rule(tmp_path / "rule.safetensors", key=key, featurizer=lambda v: v)
    assert loaded.skipped == 3 and loaded.components == 6
    np.testing.assert_allclose(loaded.shifts(x[:50]), rule.shifts(x[:50]))
    # By default none is left out and the top 64 are kept.
    wide = (rng.normal(size=(3000, 80)) * np.linspace(5, 1, 80)).astype(np.float32)
    rule = build_tiebreak_rule(key=key, x=wide, featurizer=lambda v: v, feature_space="t")
    assert (rule.skipped, rule.components) == (0, 64)


def test_errors(data, tmp_path):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    with pytest.raises(UsageError, match="one feature row per input"):
        build_tiebreak_rule(key=key, x=data, featurizer=lambda x: featurizer(x)[:3], feature_space="t")
    with pytest.raises(UsageError, match="components must be between"):
        build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="t", components=F + 1)

    def dead(x: np.ndarray) -> np.ndarray:  # four dead units
        return np.concatenate([featurizer(x), np.zeros((len(x), 4))], axis=1)

    with pytest.raises(UsageError, match=f"vary in only {F} directions"):
        build_tiebreak_rule(key=key, x=data, featurizer=dead, feature_space="t", components=F + 2)
    default = build_tiebreak_rule(key=key, x=data, featurizer=dead, feature_space="t")
    assert (default.skipped, default.components) == (0, F)
    assert build_tiebreak_rule(key=key, x=data, featurizer=dead, feature_space="t", skip=3).components == F - 3
    with pytest.raises(UsageError, match=rf"use components \+ skip <= {F} \(got 10 \+ 3\)"):
        build_tiebreak_rule(key=key, x=data, featurizer=dead, feature_space="t", components=10, skip=3)
    with pytest.raises(UsageError, match="skip must be 0 or more"):
        build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="t", skip=-1)
    rule, _ = make(key, data, backend)
    with pytest.raises(UsageError, match="beta must be above 0 and at most 100"):
        TieBreakAPI(key=key, backend=backend, rule=rule, beta=0)
    with pytest.raises(UsageError, match="another key"):
        TieBreakAPI(key=generate_key(owner="x", num_classes=C, input_shape=(D,)), backend=backend, rule=rule)
    with pytest.raises(UsageError, match="answers over 3 classes"):
        tiebreak_test(key=key, rule=rule, served=backend, suspect=Linear(2, num_classes=3), inputs=data)
    with pytest.raises(UsageError, match="input shape"):
        tiebreak_test(key=key, rule=rule, served=backend, suspect=backend, inputs=data[:, :3])
    confident = Linear(1, scale=200.0)
    with pytest.raises(UsageError, match="near a tie"):
        tiebreak_test(key=key, rule=rule, served=confident, suspect=backend, inputs=data[:5], min_ratio=0.999)
    rule.save(tmp_path / "rule.safetensors")
    with pytest.raises(UsageError, match="loaded without its featurizer"):
        load_tiebreak_rule(tmp_path / "rule.safetensors", key=key, featurizer=None).features(data)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="features"):
        load_tiebreak_rule(tmp_path / "rule.safetensors", key=key, featurizer=lambda x: x).features(data)


def test_a_suspect_that_never_answers_in_pair_is_inconclusive(data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rule, _ = make(key, data, backend)

    class Refuser:
        description, num_classes, input_shape = "refuser", C, (D,)

        def query(self, x):
            return Answers(labels=np.full(len(x), -1))

    res = tiebreak_test(key=key, rule=rule, served=backend, suspect=Refuser(), inputs=data, queries=50)
    assert res.log10_p == 0.0
    assert res.abstentions == res.queries == 50
    assert "no data" in res.details["inconclusive"]


def test_answers_in_pairs_asked_once_are_inconclusive_not_a_p_of_one(tmp_path, data):
    # one near-tie per class pair: the per-pair centred features are all zero, so Z carries nothing
    from wmark.schemes.tiebreak import tiebreak_log_sequential

    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rule, _ = make(key, data, backend)
    res = tiebreak_test(key=key, rule=rule, served=backend, suspect=backend, inputs=data, queries=1)
    assert res.details["in_pair"] == 1 and res.log10_p == 0.0
    assert "no data; ask more inputs" in res.details["inconclusive"]
    with TieBreakLog(tmp_path / "few.sqlite", key=key) as log:
        TieBreakAPI(key=key, backend=backend, rule=rule, log=log).for_client("few").query(data[:1])
        chosen = select_log_inputs(key=key, rule=rule, served=backend, log=log, client="few")
    fixed = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=backend, chosen=chosen)
    ongoing = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=backend, chosen=chosen,
                                      alpha=1e-3, share=1.0)
    for res in (fixed, ongoing):
        assert res.queries == 1 and "no data; ask more inputs" in res.details["inconclusive"]


def test_cli_build_extract_through_the_tiebreak_api_then_verify(tmp_path):
    import json

    import torch
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.keys import load_key, save_key
    from wmark.models import build_model, model_metadata
    from wmark.training import make_loader, train_epochs

    shape, c = (1, 6, 6), 4

    def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
        y = ((x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long() * 2
             + (x[:, 0, :, :3].mean((1, 2)) > 0.5).long())
        return x, y

    x, y = task(1500, 0)
    victim = build_model("fmnist-mlp", num_classes=c, input_shape=shape, seed=0)
    train_epochs(victim, make_loader(x, y, seed=0), epochs=8, optimizer=torch.optim.Adam(victim.parameters(), 3e-3))
    weights = tmp_path / "victim.safetensors"
    save_tensors(victim.state_dict(), weights, metadata=model_metadata(arch="fmnist-mlp", num_classes=c,
                                                                       input_shape=shape))
    for name, seed in (("thief", 4), ("owner", 6)):
        xs, ys = task(1200, seed)
        xt, yt = task(300, seed + 1)
        save_tensors({"x": xs, "y": ys, "x_test": xt, "y_test": yt}, tmp_path / f"{name}.safetensors")
    key, rule = tmp_path / "owner.key", tmp_path / "rule.safetensors"
    save_key(seeded_key("tiebreak/cli", owner="Owner", num_classes=c, input_shape=shape), key)
    runner = CliRunner()
    res = runner.invoke(main, ["tiebreak", "build", "--key", str(key), "--arch", "fmnist-mlp", "--weights",
                               str(weights), "--data", str(tmp_path / "owner.safetensors"), "--out", str(rule),
                               "--reference-repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "64 components" in res.output and "1000 verification inputs chosen by 4 reference surrogates" in res.output
    cost = re.search(r"served at beta 1, this key changes (\S+) % of the answers on the 300 test inputs and costs "
                     r"honest clients (\S+) ± (\S+) accuracy points \((\S+) % -> (\S+) %\); a lower scale \(`serve "
                     r"--beta`, or `--max-cost` here\) costs less", res.output)
    assert cost is not None, res.output
    changed, lost, se, plain, marked = map(float, cost.groups())
    assert 0 < se < lost
    assert 0 < changed <= 100 and lost == pytest.approx(plain - marked, abs=0.011)
    res = runner.invoke(main, ["tiebreak", "build", "--key", str(key), "--arch", "fmnist-mlp", "--weights",
                               str(weights), "--data", str(tmp_path / "owner.safetensors"), "--out",
                               str(tmp_path / "small.safetensors"), "--references", "none", "--max-samples", "500",
                               "--verify-count", "100"])
    assert res.exit_code == 0 and "from 500 inputs; 100 verification inputs" in res.output, res.output
    out = tmp_path / "surrogate.safetensors"
    # the rule names the served model: the thief's marked API needs only the rule and the key
    res = runner.invoke(main, ["attack", "extract", "--arch", "fmnist-mlp", "--queries", "1200", "--data",
                               str(tmp_path / "thief.safetensors"), "--out", str(out), "--epochs", "40", "--mark",
                               "tiebreak", "--key", str(key), "--rule", str(rule), "--beta", "2", "--log",
                               str(tmp_path / "tb.sqlite"), "--client", "thief-1"])
    assert res.exit_code == 0, res.output
    assert wmark_metadata(load_tensors(out)[1])["attack"]["beta"] == 2.0  # the scale the thief was answered at
    # This checks the plumbing, not the power (benchmarks/extraction_tiebreak.py measures that). Over 6 fresh
    # keys this 40-epoch surrogate scored log10 p from -8.0 to -12.5 on the 1000 committed inputs, but one
    # clean-clone run drew a key at -3.9, so the key is fixed: it gives -9.9 there and -14.7 on the thief's
    # own queries, against alpha = 1e-4.
    verify = ["verify", "extraction", "--key", str(key), "--arch", "fmnist-mlp", "--fixed", "--json", "--alpha",
              "1e-4"]
    tb = ["--rule", str(rule)]
    res = runner.invoke(main, verify + ["--suspect", str(out)] + tb)
    doc = json.loads(res.output)
    assert [t["name"] for t in doc["tests"]] == ["trigger-set", "api-tiebreak"]
    tie = doc["tests"][1]
    assert tie["details"]["budget"] == 1000 and tie["queries"] <= 1000
    assert (res.exit_code, doc["kind"]) == (0, "extracted"), tie
    # the thief writes another class count into the copy: it cannot block verification, and the verdict says so
    lying = tmp_path / "lying.safetensors"
    save_tensors(load_tensors(out)[0], lying, metadata=model_metadata(arch="fmnist-mlp", num_classes=c + 3,
                                                                      input_shape=shape))
    res = runner.invoke(main, verify + ["--suspect", str(lying)] + tb)
    doc = json.loads(res.stdout)
    assert (res.exit_code, doc["kind"]) == (0, "extracted") and doc["message"].endswith(
        f"The model file {lying} records {c + 3} classes (wmark.num_classes) while the key is for {c}-class models; "
        f"it was verified anyway, as the {c}-class model its weights fit.")
    # the served model itself never learned the keyed tie-breaks: no evidence
    res = runner.invoke(main, verify + ["--suspect", str(weights)] + tb)
    doc = json.loads(res.output)
    assert (res.exit_code, doc["kind"]) == (1, "none") and doc["tests"][1]["log10_p"] > -3
    # the thief's own logged queries: a second, stronger tie-break test that names its extra assumption
    logged = ["--log", str(tmp_path / "tb.sqlite"), "--client", "thief-1"]
    res = runner.invoke(main, verify + ["--suspect", str(out), "--report", str(tmp_path / "r.html")] + tb + logged)
    doc = json.loads(res.output)
    assert [t["name"] for t in doc["tests"]] == ["trigger-set", "api-tiebreak", "api-tiebreak-log"]
    page = (tmp_path / "r.html").read_text()
    assert "Every test, combined" in page and "api-tiebreak-log" in page and "without regard to the marked" in page
    assert (res.exit_code, doc["kind"]) == (0, "extracted"), doc["tests"][2]
    assert "without regard to the marked answers" in doc["tests"][2]["null"]["assumption"]
    assert doc["tests"][2]["details"]["client"] == "thief-1" and doc["tests"][2]["log10_p"] < -4
    assert doc["correction"] == "weighted holm" and [t["weight"] for t in doc["tests"]] == [1.0, 1.0, 8.0]
    assert doc["tests"][2]["adjusted_log10_p"] == pytest.approx(doc["tests"][2]["log10_p"] - math.log10(0.8))
    # sequential (the default): the trigger set runs until its evidence clears its share (1/10) of alpha
    sequential = [a for a in verify if a != "--fixed"]
    res = runner.invoke(main, sequential + ["--suspect", str(out), "--log-sequential"] + tb + logged)
    trig, seq = json.loads(res.output)["tests"][0], json.loads(res.output)["tests"][2]
    assert (trig["details"]["mode"], trig["details"]["alpha_share"]) == ("sequential", pytest.approx(0.1))
    assert trig["details"]["stops_at_log10_p"] == pytest.approx(-5.0)
    # --log-sequential: the log test asks the client's logged inputs until its evidence clears 0.8 of alpha
    assert (seq["details"]["mode"], seq["details"]["alpha_share"]) == ("sequential", pytest.approx(0.8))
    assert (res.exit_code, seq["details"]["stopped"]) == (0, "evidence") and seq["log10_p"] <= math.log10(0.8e-4)
    assert seq["queries"] < seq["details"]["log_inputs"] and "anytime-valid" in seq["method"]
    res = runner.invoke(main, verify + ["--suspect", str(out), "--log-sequential", "--rounds", "3"] + tb + logged)
    assert res.exit_code == 2 and "--rounds does not apply to --log-sequential" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out), "--log-sequential"] + tb)
    assert res.exit_code == 2 and "--log-sequential does not apply without --log" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(weights)] + tb + logged)
    doc = json.loads(res.output)
    assert (res.exit_code, doc["kind"]) == (1, "none") and doc["tests"][2]["log10_p"] > -3
    # the log test alone: the committed inputs are not asked, and Holm corrects for two tests
    res = runner.invoke(main, verify + ["--suspect", str(out), "--rule-queries", "0"] + tb + logged)
    doc = json.loads(res.output)
    assert [t["name"] for t in doc["tests"]] == ["trigger-set", "api-tiebreak-log"]
    assert (res.exit_code, doc["kind"]) == (0, "extracted") and doc["tests"][1]["details"]["rounds"] == DEFAULT_LOG_ROUNDS
    res = runner.invoke(main, verify + ["--suspect", str(out), "--rule-queries", "0", "--rounds", "1"] + tb + logged)
    doc = json.loads(res.output)
    assert (res.exit_code, doc["kind"]) == (0, "extracted") and doc["tests"][1]["details"]["rounds"] == 1
    res = runner.invoke(main, verify + ["--suspect", str(out), "--rounds", "0"] + tb + logged)
    assert res.exit_code == 2 and "rounds must be at least 1" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out), "--rule-queries", "0"] + tb)
    assert res.exit_code == 2 and "Asking no committed tie-break input leaves only the log test" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out), "--rule-queries", "-1"] + tb + logged)
    assert res.exit_code == 2 and "committed tie-break inputs to ask must be at least 0" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out)] + tb + logged[:2])
    assert res.exit_code == 2 and "--log needs --client" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out)] + logged)
    assert res.exit_code == 2 and "written by the tie-break mark's API; give the rule it served with" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out)] + tb + logged[:3] + ["nobody"])
    assert res.exit_code == 2 and "no inputs of client 'nobody' (clients: thief-1)" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out), "--served", str(weights)] + logged)
    assert res.exit_code == 2 and res.output.strip() == "error: --served does not apply without --rule (tie-break only)."
    res = runner.invoke(main, verify + ["--suspect", str(out), "--served", str(out)] + tb)
    assert res.exit_code == 2 and "built from another served model" in res.output
    res = runner.invoke(main, verify + ["--suspect", str(out), "--holdout", str(tmp_path / "owner.safetensors")] + tb)
    assert res.exit_code == 2 and "commits its own verification inputs" in res.output
    other = tmp_path / "other.key"
    save_key(generate_key(owner="Other", num_classes=c, input_shape=shape), other)
    res = runner.invoke(main, ["verify", "extraction", "--key", str(other), "--arch", "fmnist-mlp", "--suspect",
                               str(out)] + tb)
    assert res.exit_code == 2 and "built under another key" in res.output
    # the served model moved: the rule says where it was, --served says where it is (its digest is checked)
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    try:
        res = runner.invoke(main, verify + ["--suspect", str(out)] + tb)
        assert res.exit_code == 2 and "recorded in the tie-break rule" in res.output and "is missing" in res.output
        res = runner.invoke(main, verify + ["--suspect", str(out), "--served", str(moved)] + tb)
        assert res.exit_code == 0, res.output
    finally:
        moved.rename(weights)
    # the same, over HTTP: the owner serves the marked API, the thief's copy is served elsewhere
    from wmark.models import load_model
    from wmark.schemes.tiebreak import open_tiebreak_rule
    from wmark.serve import build_app, serve_in_background
    from wmark.suspects.http import open_http_suspect

    owner_key = load_key(key)
    loaded, backend = open_tiebreak_rule(key=owner_key, rule=rule)
    assert (loaded.served_arch, loaded.served_path, loaded.input_shape) == ("fmnist-mlp", str(weights), shape)
    marked = TieBreakAPI(key=owner_key, backend=backend, rule=loaded)
    app = build_app(model=victim, name="owner", num_classes=c, input_shape=shape, labels_only=True, answerer=marked)
    probe = task(200, 9)[0].numpy()
    with serve_in_background(app) as server:
        remote = open_http_suspect(url=f"{server.url}/v2/models/owner", protocol="v2", num_classes=c,
                                   input_shape=shape)
        try:
            np.testing.assert_array_equal(remote.query(probe).labels, marked.query(probe).labels)
        finally:
            remote.close()
    thief, _ = load_model("fmnist-mlp", out)

    class Counting(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net, self.rows = net, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.rows += len(x)
            return self.net(x)

    counting = Counting(thief)
    app = build_app(model=counting, name="thief", num_classes=c, input_shape=shape, labels_only=True)
    remote_verify = ["verify", "extraction", "--key", str(key), "--fixed", "--json", "--alpha", "1e-4"]
    with serve_in_background(app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        res = runner.invoke(main, remote_verify + ["--suspect", f"{server.url}/v2/models/thief",
                                                   "--transcript", str(tmp_path / "t.sqlite")] + tb + logged)
    doc = json.loads(res.output)
    assert [t["name"] for t in doc["tests"]] == ["trigger-set", "api-tiebreak", "api-tiebreak-log"]
    assert (res.exit_code, doc["kind"]) == (0, "extracted"), doc["tests"][1:]
    assert counting.rows > 0
    # the log test's later rounds follow from the answers, so the transcript replays them all: run again on
    # it, the suspect answers no new input and the numbers are the same
    counting.rows = 0
    with serve_in_background(app, port=port) as server:
        res = runner.invoke(main, remote_verify + ["--suspect", f"{server.url}/v2/models/thief",
                                                   "--transcript", str(tmp_path / "t.sqlite")] + tb + logged)
    assert res.exit_code == 0, res.output
    assert [t["log10_p"] for t in json.loads(res.output)["tests"]] == [t["log10_p"] for t in doc["tests"]]
    assert counting.rows == 0
    # but its answers were seen: a fixed test asked further on them, or the log test made sequential, is a
    # repeated test (alpha lost), refused before anything is asked
    with serve_in_background(app, port=port) as server:
        for extra, why in ((["--log-queries", "2000"], "rerun with the recorded plan or start a new transcript"),
                           (["--rule-queries", "500"], "rerun with the recorded plan or start a new transcript"),
                           (["--log-sequential"], "start a new transcript: reading the same answers under another")):
            res = runner.invoke(main, remote_verify + ["--suspect", f"{server.url}/v2/models/thief", "--transcript",
                                                       str(tmp_path / "t.sqlite")] + tb + logged + extra)
            assert res.exit_code == 2 and res.stdout == "" and why in res.stderr, res.output
    assert counting.rows == 0
    with serve_in_background(app) as server:
        res = runner.invoke(main, ["verify", "extraction", "--key", str(key), "--suspect",
                                   f"{server.url}/v2/models/thief", "--json", "--alpha", "1e-4", "--rule-queries",
                                   "0"] + tb + logged)
    doc = json.loads(res.output)
    assert [t["name"] for t in doc["tests"]] == ["trigger-set", "api-tiebreak-log"]
    assert (res.exit_code, doc["kind"]) == (0, "extracted")
    assert doc["tests"][0]["details"]["alpha_share"] == pytest.approx(1 / 9)  # sequential over HTTP too
    res = runner.invoke(main, ["verify", "extraction", "--key", str(key), "--suspect", "http://127.0.0.1:9/v2/models/m",
                               "--with-scores"] + tb)
    assert res.exit_code == 2 and res.output.strip() == "error: --with-scores does not apply to an API suspect."
    res = runner.invoke(main, ["serve", "--arch", "fmnist-mlp", "--weights", str(weights), "--name", "m",
                               "--key", str(key)])
    assert res.exit_code == 2 and res.output.strip() == "error: --key does not apply without --mark."
    res = runner.invoke(main, ["serve", "--name", "m", "--mark", "tiebreak", "--key", str(key), "--rule", str(rule),
                               "--rate", "0.1"])
    assert res.exit_code == 2 and res.output.strip() == "error: --rate does not apply to --mark tiebreak."


def test_the_served_api_logs_each_client_under_its_own_token(tmp_path, data):
    import os

    import torch
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.serve import build_app, read_clients, serve_in_background
    from wmark.suspects.http import open_http_suspect

    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    tokens = {"alice": "token-a", "bob": "token-b"}
    with TieBreakLog(tmp_path / "served.sqlite", key=key) as log:
        _, api = make(key, data, backend, log=log)
        app = build_app(model=torch.nn.Linear(D, C), name="m", num_classes=C, input_shape=(D,), answerer=api,
                        clients=tokens)
        with serve_in_background(app) as server:
            for client, x in (("alice", data[:300]), ("bob", data[300:400])):
                remote = open_http_suspect(url=f"{server.url}/v2/models/m", protocol="v2", num_classes=C,
                                           input_shape=(D,), token=tokens[client])
                try:
                    np.testing.assert_array_equal(remote.query(x).labels, api.query(x).labels)
                finally:
                    remote.close()
            with pytest.raises(UsageError, match="token was refused"):
                open_http_suspect(url=f"{server.url}/v2/models/m", protocol="v2", num_classes=C, input_shape=(D,),
                                  token="token-c")
        assert {c: v["queries"] for c, v in log.clients().items()} == {"alice": 300, "bob": 100, "anonymous": 400}
        near = top_pairs(backend.query(data).scores)[0] >= LOG_MIN_RATIO
        np.testing.assert_array_equal(log.inputs("bob"), data[300:400][near[300:400]])
    with pytest.raises(UsageError, match="not both"):
        build_app(model=torch.nn.Linear(D, C), name="m", num_classes=C, input_shape=(D,), token="t", clients=tokens)
    with pytest.raises(UsageError, match="non-empty and distinct"):
        build_app(model=torch.nn.Linear(D, C), name="m", num_classes=C, input_shape=(D,), clients={"a": "t", "b": "t"})
    path = tmp_path / "clients.json"
    path.write_text('{"alice": "token-a"}')
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match="readable by others; `chmod 600"):
        read_clients(path)
    os.chmod(path, 0o600)
    assert read_clients(path) == {"alice": "token-a"}
    for bad, message in (('["token"]', "non-empty JSON object"), ('{"a": "t", "b": "t"}', "same token")):
        path.write_text(bad)
        with pytest.raises(UsageError, match=message):
            read_clients(path)
    res = CliRunner().invoke(main, ["serve", "--arch", "fmnist-mlp", "--weights", str(tmp_path / "w.safetensors"),
                                    "--name", "m", "--log", str(tmp_path / "x.sqlite")])
    assert res.exit_code == 2 and "--log does not apply without --mark" in res.output


def test_every_entry_point_asks_in_the_librarys_default_rounds():
    import inspect

    from wmark.api import verify
    from wmark.cli import main
    from wmark.remote import verify_remote

    assert inspect.signature(verify).parameters["log_rounds"].default == DEFAULT_LOG_ROUNDS
    assert inspect.signature(verify_remote).parameters["log_rounds"].default == DEFAULT_LOG_ROUNDS
    option = next(p for p in main.commands["verify"].commands["extraction"].params if p.name == "rounds")
    assert option.default == DEFAULT_LOG_ROUNDS
    # and the fixed-n log test by default (the sequential one is --log-sequential; docs/extraction.md says why)
    from wmark.verify import assemble_tests

    for entry in (verify, verify_remote, assemble_tests):
        assert inspect.signature(entry).parameters["log_mode"].default == "fixed"


def test_the_rule_build_reports_this_keys_honest_cost_on_the_test_split(tmp_path):
    """The cost varies by key, so the build measures it: the marked API's labels against the served ones."""
    from wmark import api
    from wmark.data import load_dataset
    from wmark.keys import load_key, save_key
    from wmark.models import build_model, load_model, model_metadata, penultimate_featurizer
    from wmark.schemes.tiebreak import TieBreakAPI, accuracy_cost, load_tiebreak_rule
    from wmark.suspects import LocalSuspect
    from wmark.training import make_loader, train_epochs

    ds = load_dataset("digits")
    model = build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8), seed=0)
    train_epochs(model, make_loader(ds.x_train, ds.y_train, seed=0), epochs=3,
                 optimizer=torch.optim.Adam(model.parameters(), 3e-3))
    weights, key, rule = tmp_path / "served.safetensors", tmp_path / "owner.key", tmp_path / "rule.safetensors"
    save_tensors(model.state_dict(), weights, metadata=model_metadata(arch="fmnist-mlp", num_classes=10,
                                                                       input_shape=(1, 8, 8)))
    save_key(seeded_key("tiebreak/honest cost", num_classes=10, input_shape=(1, 8, 8)), key)
    info = api.build_tiebreak(key=key, arch="fmnist-mlp", weights=weights, data="digits", out=rule, references=[],
                              verify_count=100)
    served, _ = load_model("fmnist-mlp", weights, num_classes=10, input_shape=(1, 8, 8))
    k = load_key(key)
    marked = TieBreakAPI(key=k, backend=LocalSuspect(served, input_shape=(1, 8, 8)), expose_scores=False,
                         rule=load_tiebreak_rule(rule, key=k, featurizer=penultimate_featurizer(served)))
    expected = accuracy_cost(api=marked, x=ds.x_test.numpy(), y=ds.y_test.numpy())
    cost = info["honest_cost"]
    assert cost["beta"] == 1.0 and cost["test_inputs"] == len(ds.y_test) and cost["cost_se_pp"] > 0
    assert {name: cost[name] for name in expected} == pytest.approx(expected)
    assert 0 < expected["changed_fraction"] < 0.5


def test_a_text_rule_build_scores_the_test_texts_a_text_api_takes(tmp_path):
    from textkit import text_key

    from wmark import api
    from wmark.data import load_dataset
    from wmark.keys import save_key
    from wmark.models import build_model, model_metadata
    from wmark.text import MINILM, load_tokenizer

    key = text_key(num_classes=8, max_length=64, tag="honest cost")
    save_key(key, tmp_path / "t.key")
    model = build_model("text-bow", num_classes=8, input_shape=(64,), seed=0)
    weights = tmp_path / "bow.safetensors"
    save_tensors(model.state_dict(), weights, metadata=model_metadata(arch="text-bow", num_classes=8,
                                                                       input_shape=(64,), modality=key.modality))
    info = api.build_tiebreak(key=tmp_path / "t.key", arch="text-bow", weights=weights, data="fortunes@owner",
                              out=tmp_path / "rule.safetensors", references=[], verify_count=50, max_samples=300)
    texts = load_dataset("fortunes@owner").texts_test or ()
    lengths = [len(ids) for ids in load_tokenizer(MINILM)(list(texts), truncation=False, verbose=False)["input_ids"]]
    cost = info["honest_cost"]
    assert cost["test_inputs"] == sum(n <= 64 for n in lengths) < len(texts)
    assert 0 < cost["changed_fraction"] <= 1
    assert cost["accuracy_cost_pp"] == pytest.approx(100 * (cost["served_accuracy"] - cost["api_accuracy"]))
    # a cost target picks a scale for a text rule too, and the text API serves it
    from wmark.marks import open_served

    target = max(cost["accuracy_cost_pp"], 1.0)
    info = api.build_tiebreak(key=tmp_path / "t.key", arch="text-bow", weights=weights, data="fortunes@owner",
                              out=tmp_path / "cheap.safetensors", references=[], verify_count=50, max_samples=300,
                              max_cost=target)
    picked = info["honest_cost"]
    assert picked["test_inputs"] == cost["test_inputs"] and picked["max_cost_pp"] == target
    assert picked["accuracy_cost_pp"] + stats.norm.ppf(0.9) * picked["cost_se_pp"] <= target
    assert open_served(key=key, mark="tiebreak", rule=tmp_path / "cheap.safetensors").answerer.beta == picked["beta"]


def test_the_marked_api_is_refused_where_the_unmarked_served_model_belongs(data):
    """Inputs, pairs and references chosen by the marked answers would make the null depend on the key."""
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    rule, api = make(key, data, Linear(1))
    message = r"^The served model given is the marked API, whose answers depend on the key"
    with pytest.raises(UsageError, match=message):
        commit_verification_inputs(rule, served=api, x=data, count=50)
    with pytest.raises(UsageError, match=message):
        tiebreak_test(key=key, rule=rule, served=api, suspect=Linear(2), inputs=data, queries=50)
    with pytest.raises(UsageError, match=message):
        train_reference_surrogates(served=api, x=data, archs=["mlp"], repeats=1)
    from wmark.schemes.api_mark import MarkedAPI

    flip = MarkedAPI(key=key, backend=Linear(1))
    with pytest.raises(UsageError, match=message):
        train_reference_surrogates(served=flip, x=data, archs=["mlp"], repeats=1)
