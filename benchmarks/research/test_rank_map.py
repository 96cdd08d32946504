"""The research low-rank keyed head (``rank_map.py``): its conditional ``Z`` is exactly N(0, 1) for a suspect made
without the key, it reads a suspect that follows the low-rank shift, and the library's tests use it."""

from __future__ import annotations

import numpy as np
import pytest
from keykit import seeded_key
from rank_map import RankRule, pair_sums, rank_rule, rank_z, use_rank_statistic
from scipy import stats

from wmark.schemes.tiebreak import build_tiebreak_rule, tiebreak_statistic, top_pairs
from wmark.schemes.tiebreak import tests as tiebreak_tests

SHAPE = (1, 4, 4)


def featurizer(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, *SHAPE)).astype(np.float32)
    return x, rng.dirichlet(np.ones(5), size=400)


def rule_for(i: int, x: np.ndarray, rank: int) -> RankRule:
    key = seeded_key(f"tiebreak/rank/{i}", owner="o", num_classes=5, input_shape=SHAPE)
    return rank_rule(build_tiebreak_rule(key=key, x=x, featurizer=featurizer, feature_space="pixels",
                                         components=12), key=key, rank=rank)


@pytest.mark.parametrize("rank", [1, 3])
def test_conditional_z_is_standard_normal_for_a_key_free_suspect(data, rank):
    x, scores = data
    _, lo, hi = top_pairs(scores)
    answers = np.random.default_rng(1).choice(5, size=len(x))
    zs = []
    for i in range(400):
        rule = rule_for(i, x, rank)
        zs.append(rank_z(rule, pair_sums(rule, psi=rule.features(x), lo=lo, hi=hi, answers=answers)))
    assert stats.kstest(zs, "norm").pvalue > 1e-3
    assert abs(np.mean(zs)) < 0.2 and 0.85 < np.std(zs) < 1.15


def test_a_suspect_following_the_low_rank_shift_is_read_and_the_library_test_uses_it(data):
    x, scores = data
    _, lo, hi = top_pairs(scores)
    rule = rule_for(0, x, 1)
    psi = rule.features(x)
    u = rule.shifts_of(psi)
    answers = np.where(u[np.arange(len(x)), lo] > u[np.arange(len(x)), hi], lo, hi)
    z = rank_z(rule, pair_sums(rule, psi=psi, lo=lo, hi=hi, answers=answers))
    assert z > 0.7 * np.linalg.norm(rule.rank_b)  # Z is at most |b|: the head's own length
    plain, _ = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers)
    with use_rank_statistic():
        patched, _ = tiebreak_tests.tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers)
    assert patched == pytest.approx(z) and patched != pytest.approx(plain)
    assert tiebreak_tests.tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers)[0] == plain


def test_rank_is_bounded_by_the_classes_and_components(data):
    x, _ = data
    with pytest.raises(ValueError, match="rank must be between 1 and 5"):
        rule_for(0, x, 6)
