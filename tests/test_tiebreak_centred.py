"""The centred label reading of the tie-break tests: each in-pair sign less the served model's expected sign.

Checked against a plain numpy reference, for an exact N(0, 1) null over keys, for the evidence it adds where a
suspect's signs follow its own fit, and for its plumbing: a text rule reads labels centred by default (and its plan
says so), an image rule does not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats
from test_tiebreak_text import CLASSES, corpus, suspect, train_bow, world  # noqa: F401 (the module fixture)

from wmark.keys import generate_key
from wmark.schemes.tiebreak import (
    TieBreakLogTest,
    TieBreakTest,
    expected_evidence,
    expected_signs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_statistic,
    tiebreak_test,
    top_pairs,
)
from wmark.schemes.tiebreak.rule import TieBreakRule, _directions, pair_log_odds


def _rule(key, k: int) -> TieBreakRule:
    return TieBreakRule(mean=np.zeros(k), projection=np.eye(k), directions=_directions(key, k),
                        commitment=key.commitment(), feature_space="identity")


def _reference_z(w, psi, lo, hi, answers, centre, num_classes, leans=None):
    """Z by its definition, written out input by input (no shared helper)."""
    v = np.zeros((num_classes, psi.shape[1]))
    for g in {(a, b) for a, b in zip(lo, hi)}:
        rows = [i for i in range(len(lo)) if (lo[i], hi[i]) == g]
        phi = psi[rows] - psi[rows].mean(axis=0)
        for j, i in enumerate(rows):
            if leans is not None:
                s = leans[i] - (centre[i] if answers[i] >= 0 else 0.0)
                v[lo[i]] += s * phi[j]
                v[hi[i]] -= s * phi[j]
            elif answers[i] == lo[i] or answers[i] == hi[i]:
                s = (1.0 if answers[i] == lo[i] else -1.0) - centre[i]
                v[lo[i]] += s * phi[j]
                v[hi[i]] -= s * phi[j]
            elif answers[i] >= 0:
                v[answers[i]] += phi[j]
                v[lo[i]] -= 0.5 * phi[j]
                v[hi[i]] -= 0.5 * phi[j]
    return float((w * v).sum() / np.sqrt((v ** 2).sum()))


def test_the_centred_statistic_matches_its_definition_and_the_served_models_expected_sign():
    rng = np.random.default_rng(3)
    key = generate_key(owner="centred", num_classes=4, input_shape=(6,))
    rule = _rule(key, 6)
    scores = rng.dirichlet(np.ones(4), size=200)
    _, lo, hi = top_pairs(scores)
    psi = rng.normal(size=(200, 6))
    answers = rng.integers(-1, 4, size=200)
    centre = expected_signs(scores, lo, hi)
    p_lo, p_hi = scores[np.arange(200), lo], scores[np.arange(200), hi]
    np.testing.assert_allclose(centre, (p_lo - p_hi) / (p_lo + p_hi))
    np.testing.assert_allclose(centre, np.tanh(pair_log_odds(scores, lo, hi) / 2))
    z, _ = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers, centre=centre)
    assert z == pytest.approx(_reference_z(rule.directions, psi, lo, hi, answers, centre, 4), rel=1e-10)
    plain, _ = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers)
    assert plain == pytest.approx(_reference_z(rule.directions, psi, lo, hi, answers, np.zeros(200), 4), rel=1e-10)
    assert z != pytest.approx(plain)
    # a probability reading: each answered lean less the served model's own clipped lean
    leans = np.where(answers >= 0, np.clip(rng.normal(size=200) * 2, -2, 2), 0.0)
    own = expected_evidence(scores, lo, hi, "scores")
    np.testing.assert_allclose(own, np.clip(np.log(p_lo / p_hi), -2, 2))
    z, _ = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers, leans=leans, centre=own)
    assert z == pytest.approx(_reference_z(rule.directions, psi, lo, hi, answers, own, 4, leans=leans), rel=1e-10)


def test_centred_signs_keep_an_exact_standard_normal_null_over_keys():
    rng = np.random.default_rng(5)
    n, k, c = 300, 8, 5
    scores = rng.dirichlet(np.ones(c) * 0.5, size=n)
    _, lo, hi = top_pairs(scores)
    psi = rng.normal(size=(n, k))
    # an innocent suspect whose answers follow the served model's own lean (and its features): key-free
    answers = np.where(rng.random(n) < (1 + expected_signs(scores, lo, hi)) / 2, lo, hi)
    centre = expected_signs(scores, lo, hi)
    zs = [tiebreak_statistic(rule=_rule(generate_key(owner=f"o{i}", num_classes=c, input_shape=(k,)), k), psi=psi,
                             lo=lo, hi=hi, answers=answers, centre=centre)[0] for i in range(400)]
    assert stats.kstest(zs, "norm").pvalue > 1e-3


def test_centring_adds_evidence_where_a_suspects_signs_follow_its_own_fit():
    """A suspect whose near-tie calls follow the served model's lean (a linear function of the features) plus a
    small keyed lean: the key-free part inflates the plain statistic's norm, not its signal."""
    rng = np.random.default_rng(11)
    n, k, c = 1500, 16, 4
    head = rng.normal(size=(c, k))
    gains = []
    for i in range(12):
        key = generate_key(owner=f"lean {i}", num_classes=c, input_shape=(k,))
        rule = _rule(key, k)
        psi = rng.normal(size=(n, k))
        served = psi @ head.T * 0.3
        scores = np.exp(served) / np.exp(served).sum(axis=1, keepdims=True)
        _, lo, hi = top_pairs(scores)
        keyed = rule.shifts_of(psi)
        lean = pair_log_odds(scores, lo, hi) + 0.4 * (keyed[np.arange(n), lo] - keyed[np.arange(n), hi])
        answers = np.where(rng.random(n) < 1 / (1 + np.exp(-lean)), lo, hi)
        plain, _ = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers)
        centred, _ = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers,
                                        centre=expected_signs(scores, lo, hi))
        gains.append(centred - plain)
    assert np.mean(gains) > 0.5 and np.mean(np.array(gains) > 0) >= 0.75


def test_a_text_rule_reads_labels_centred_by_default_and_its_plans_say_so(world):  # noqa: F811
    key, rule, backend = world["key"], world["rule"], world["backend"]
    thief = suspect(world, world["surrogate"])
    by_default = tiebreak_test(key=key, rule=rule, served=backend, suspect=thief, queries=300)
    plain = tiebreak_test(key=key, rule=rule, served=backend, suspect=thief, queries=300, centred=False)
    assert by_default.details["read"] == plain.details["read"] == "labels"
    assert "centred" in by_default.details and "centred" not in plain.details
    assert by_default.log10_p != plain.log10_p
    scored = tiebreak_test(key=key, rule=rule, served=backend, suspect=suspect(world, world["surrogate"], scores=True),
                           queries=300, use_scores=True)
    assert "centred" not in scored.details  # a probability reading is never centred
    logged = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=thief, log=world["log"], client="thief",
                               queries=300)
    assert "centred" in logged.details
    assert TieBreakTest(key=key, rule=rule, served=backend).plan()["reads"] == "labels-centred"
    assert TieBreakTest(key=key, rule=rule, served=backend, centred=False).plan()["reads"] == "labels"
    chosen = select_log_inputs(key=key, rule=rule, served=backend, log=world["log"], client="thief")
    assert TieBreakLogTest(key=key, rule=rule, served=backend, chosen=chosen).plan()["reads"] == "labels-centred"
    # the sequential log test reads them centred too, unless told not to
    sequential = TieBreakLogTest(key=key, rule=rule, served=backend, chosen=chosen, mode="sequential")
    assert sequential.plan()["reads"] == "labels-centred"
    assert "centred" in sequential.run(thief, alpha=1e-6, share=0.8).details
    plain = dataclasses.replace(sequential, centred=False)
    assert plain.plan()["reads"] == "labels" and "centred" not in plain.run(thief, alpha=1e-6, share=0.8).details


def test_an_image_rule_reads_plain_evidence_unless_asked(world):  # noqa: F811
    rule = dataclasses.replace(world["rule"], text=None)
    assert TieBreakTest(key=world["key"], rule=rule, served=world["backend"], use_scores=False).plan()["reads"] == \
        "labels"
    assert TieBreakTest(key=world["key"], rule=rule, served=world["backend"], use_scores=False,
                        centred=True).plan()["reads"] == "labels-centred"
    assert TieBreakTest(key=world["key"], rule=rule, served=world["backend"]).plan()["reads"] == "scores"
    assert TieBreakTest(key=world["key"], rule=rule, served=world["backend"], centred=True).plan()["reads"] == \
        "scores-centred"


def test_a_report_read_with_plain_signs_is_rechecked_with_plain_signs(world, tmp_path, monkeypatch):  # noqa: F811
    """A report written before text labels were centred (simulated: centring switched off while it is made) replays
    the way it was read, and one read centred replays centred."""
    from wmark import api
    from wmark.io import save_model
    from wmark.recheck import recheck
    from wmark.report import write_report
    from wmark.schemes.tiebreak import tests as tiebreak_tests

    tmp = world["tmp"]
    save_model(world["surrogate"], tmp_path / "s.safetensors",
               metadata={"arch": "text-bow", "num_classes": CLASSES, "input_shape": [world["key"].input_shape[0]]})
    real = tiebreak_tests.centres
    for plain in (True, False):
        if plain:
            monkeypatch.setattr(tiebreak_tests, "centres", lambda rule, centred, read: False)
        verdict = api.verify(key=tmp / "owner.key", arch="text-bow", suspect=tmp_path / "s.safetensors", mode="fixed",
                             rule=tmp / "rule.safetensors", rule_queries=300, labels_only=True)
        monkeypatch.setattr(tiebreak_tests, "centres", real)
        (test,) = [t for t in verdict.tests if t.name == "api-tiebreak"]
        assert ("centred" in test.details) is not plain
        write_report(verdict=verdict, key=world["key"], path=tmp_path / f"r{plain}.html")
        outcome = recheck(report=tmp_path / f"r{plain}.json", key=tmp / "owner.key")
        assert outcome.status == "same", outcome.message
