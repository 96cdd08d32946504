"""A low-rank keyed head for the tie-break rule (measured, not adopted: ``docs/research/extraction-families.md``).

The library's keyed head ``w`` (C×k) has iid N(0, 1) entries, so its shift ``u(x) = w psi(x) / sqrt(k)`` moves
each class along its own direction: a surrogate must pick up C−1 new feature directions to reproduce it. A
rank-``r`` head ``w ~ a b`` (``a``: C×r, ``b``: r×k, both iid N(0, 1) from the key) puts the same shift energy
into ``r`` feature directions read out to every class. The hypothesis: a thief that stops early learns a few
strong directions sooner than many weak ones (gradient descent fits the largest singular modes of its target
first), so it carries more of a low-rank mark per changed answer.

The served head is normalised so that its energy does not vary from key to key (an unnormalised product of
Gaussians does: on two keys a rank-1 head cost 0.45 and 4.65 pp at beta 1 where the library's cost 2.49 and
2.90): ``a`` is centred over the classes (a lean shared by every class changes no answer) and orthonormalised,
and the served ``w = a_o b`` is scaled to the Frobenius norm ``sqrt((C - 1) k)`` of a centred iid head. The test
reads ``b`` itself, so none of this touches its null.

The test stays exact. Given ``a`` and everything key-free (the inputs, the pairs, the suspect's answers and
so the pair sums ``v``, C×k), ``Z = sum(b * (a_o^T v)) / |a_o^T v|`` is a fixed unit combination of the iid N(0, 1)
entries of ``b``: N(0, 1) exactly under the null, like the library's ``sum(w * v) / |v|``. Where the suspect
reproduces the shift, ``v ~ w``-shaped plus noise, and in the noise-dominated regime both statistics give the
same ``Z`` for the same fraction of the shift learnt, so only the learning can differ.

:func:`rank_rule` turns a library rule into a :class:`RankRule` (the same feature map, the low-rank head);
:func:`use_rank_statistic` makes the library's tests read a :class:`RankRule` with the conditional ``Z`` (a
research patch of ``wmark.schemes.tiebreak.tests.tiebreak_statistic``; every other rule is read as before).
Side by side with the library's head (``benchmarks/tiebreak_invariance.py --maps principal64,rank1,rank3``) both
low-rank heads were weaker: their thieves reached the accuracy bar sooner and carried less of the mark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wmark.keys import Key
from wmark.schemes.tiebreak import TieBreakRule
from wmark.schemes.tiebreak import tests as tiebreak_tests


@dataclass(frozen=True)
class RankRule(TieBreakRule):
    """A tie-break rule with a rank-r keyed head: ``rank_a`` (C×r, orthonormal columns) and ``rank_b`` (r×k) as the
    test reads them, ``directions`` the normalised product the API serves."""

    rank_a: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), compare=False)
    rank_b: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), compare=False)


def rank_rule(rule: TieBreakRule, *, key: Key, rank: int) -> RankRule:
    """``rule``'s feature map with a rank-``rank`` keyed head drawn from ``key`` (independent of its own head)."""
    if not 1 <= rank <= min(key.num_classes, rule.components):
        raise ValueError(f"rank must be between 1 and {min(key.num_classes, rule.components)}, got {rank}.")
    a = key.normal(f"research/rank-head/r{rank}/a", (key.num_classes, rank))
    b = key.normal(f"research/rank-head/r{rank}/b", (rank, rule.components))
    a_o = np.linalg.qr(a - a.mean(axis=0))[0]
    w = a_o @ b
    fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)}
    fields["directions"] = w * np.sqrt((key.num_classes - 1) * rule.components) / np.linalg.norm(w)
    return RankRule(**fields, rank_a=a_o, rank_b=b)


def rank_z(rule: RankRule, v: np.ndarray) -> float:
    """The conditional ``Z`` of the module docstring from the suspect's pair sums ``v`` (C×k)."""
    c = rule.rank_a.T @ v
    norm = float(np.sqrt((c ** 2).sum()))
    return float((rule.rank_b * c).sum() / norm) if norm > 0 else 0.0


def pair_sums(rule: TieBreakRule, *, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, answers: np.ndarray,
              leans: np.ndarray | None = None) -> np.ndarray:
    """The suspect's pair sums ``v`` exactly as ``tiebreak_statistic`` forms them."""
    a = np.asarray(answers, dtype=np.int64)
    signs = np.where(a == lo, 1.0, np.where(a == hi, -1.0, 0.0))
    s = signs if leans is None else np.asarray(leans, dtype=np.float64)
    outside = tiebreak_tests._outside(a, lo, hi) if leans is None else None
    return tiebreak_tests._pair_sums(psi, lo, hi, s, num_classes=rule.directions.shape[0], outside=outside)


@contextmanager
def use_rank_statistic() -> Iterator[None]:
    """Within the block, the library's tie-break tests read a :class:`RankRule` with :func:`rank_z`."""
    original = tiebreak_tests.tiebreak_statistic

    def statistic(*, rule: TieBreakRule, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, answers: np.ndarray,
                  leans: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
        z, info = original(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers, leans=leans)
        if isinstance(rule, RankRule):
            z = rank_z(rule, pair_sums(rule, psi=psi, lo=lo, hi=hi, answers=answers, leans=leans))
        return z, info

    tiebreak_tests.tiebreak_statistic = statistic
    try:
        yield
    finally:
        tiebreak_tests.tiebreak_statistic = original
