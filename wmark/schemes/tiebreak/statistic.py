"""The tie-break statistic: the exact Gaussian ``Z`` of a suspect's answers and how they are read.

Read as labels (signs within each input's pair), probabilities (a clipped lean), and either one centred on the
unmarked served model's own evidence. :mod:`wmark.schemes.tiebreak` says why the null is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_ndtr

from wmark.schemes.tiebreak.rule import TieBreakRule, pair_log_odds

LEAN_CLIP = 2.0
OUTSIDE_WEIGHT = 1.0


def probability_leans(scores: np.ndarray | None, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """The suspect's lean ``log(p_lo / p_hi)`` per input, clipped at ``±LEAN_CLIP``; NaN rows (abstentions) 0.

    Returns None unless ``scores`` are probabilities (non-negative rows summing to 1): logits or other
    scores are not guessed at, and the test then reads the labels.
    """
    if scores is None:
        return None
    sc = np.asarray(scores, dtype=np.float64)
    if sc.ndim != 2 or sc.shape[0] != len(lo):
        return None
    ok = np.isfinite(sc).all(axis=1)
    if not ok.any() or (sc[ok] < 0).any() or not np.allclose(sc[ok].sum(axis=1), 1.0, atol=1e-3):
        return None
    with np.errstate(invalid="ignore"):
        lean = np.clip(pair_log_odds(sc, lo, hi), -LEAN_CLIP, LEAN_CLIP)
    return np.where(ok, lean, 0.0)


def _outside(answers: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The class answered where it is neither of the pair, else −1 (in the pair, or an abstention)."""
    a = np.asarray(answers, dtype=np.int64)
    return np.where((a >= 0) & (a != lo) & (a != hi), a, -1)


def _pair_sums(psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, s: np.ndarray, *, num_classes: int,
               outside: np.ndarray | None = None) -> np.ndarray:
    """``v_c`` of the module docstring (C×k), the features centred per pair; ``outside`` (from
    :func:`_outside`) adds the labels outside each pair, None leaves them out (a probability reading)."""
    phi = np.array(psi, dtype=np.float64)
    groups = lo * num_classes + hi
    for g in np.unique(groups):
        phi[groups == g] -= phi[groups == g].mean(axis=0)
    v = np.zeros((num_classes, phi.shape[1]))
    np.add.at(v, lo, s[:, None] * phi)
    np.add.at(v, hi, -s[:, None] * phi)
    if outside is not None:
        out = outside >= 0
        np.add.at(v, outside[out], OUTSIDE_WEIGHT * phi[out])
        np.add.at(v, lo[out], -0.5 * OUTSIDE_WEIGHT * phi[out])
        np.add.at(v, hi[out], -0.5 * OUTSIDE_WEIGHT * phi[out])
    return v


def expected_signs(scores: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The unmarked served model's own expected sign within each input's pair, ``(p_lo − p_hi) / (p_lo + p_hi)``
    (``tanh(m / 2)`` for its pair log-odds ``m``): the part of a label answer's sign its own fit predicts.

    Key-free (the served model's scores), so subtracting it from the signs keeps the null exact.
    """
    return np.tanh(pair_log_odds(np.asarray(scores, dtype=np.float64), lo, hi) / 2)


def expected_evidence(scores: np.ndarray, lo: np.ndarray, hi: np.ndarray, read: str) -> np.ndarray:
    """What the served model itself would give as evidence per input: its expected sign for a label reading
    (:func:`expected_signs`), its own lean clipped at ``±LEAN_CLIP`` for a probability reading."""
    if read == "labels":
        return expected_signs(scores, lo, hi)
    return np.clip(pair_log_odds(np.asarray(scores, dtype=np.float64), lo, hi), -LEAN_CLIP, LEAN_CLIP)


def centres(rule: TieBreakRule, centred: bool | None, read: str) -> bool:
    """Whether a tie-break test (fixed-n or sequential) centres the evidence it reads on the served model's own
    (:func:`expected_evidence`): ``centred`` when given, else for a text rule's label reading.

    Near a tie a suspect's calls still follow its own fit, largely a linear function of the rule's features (the
    served head's directions), and that key-free part adds noise to ``Z``, not signal. That is what a text thief
    stopped early looks like (MiniLM thieves read from their labels: ``docs/extraction.md``). An image surrogate
    trained to scope answers near-ties much as the marked API does, and centring its reading made it slightly
    weaker, so image rules keep the plain reading.
    """
    return (read == "labels" and rule.text is not None) if centred is None else centred


def evidence_sums(*, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, answers: np.ndarray,
                  leans: np.ndarray | None, centre: np.ndarray | None, num_classes: int) -> np.ndarray:
    """The pair sums ``v`` (C×k) of answers read as :func:`tiebreak_statistic` reads them: in-pair signs (with the
    labels outside each pair) or ``leans``, less ``centre`` where given."""
    a = np.asarray(answers, dtype=np.int64)
    signs = np.where(a == lo, 1.0, np.where(a == hi, -1.0, 0.0))
    s = signs if leans is None else np.asarray(leans, dtype=np.float64)
    if centre is not None:  # never on an abstention, nor (labels) on an answer outside the pair
        s = s - np.where(signs != 0 if leans is None else a >= 0, np.asarray(centre, dtype=np.float64), 0.0)
    return _pair_sums(psi, lo, hi, s, num_classes=num_classes, outside=_outside(a, lo, hi) if leans is None else None)


def tiebreak_statistic(*, rule: TieBreakRule, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                       answers: np.ndarray, leans: np.ndarray | None = None,
                       centre: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
    """The exact Z statistic of the module docstring for answers on inputs with features ``psi``.

    Args:
        rule: The tie-break rule (its directions are used only here).
        psi: Features of the verification inputs (n×k), as :meth:`TieBreakRule.features` gives them.
        lo: The smaller class of each input's pair (under the unmarked served model).
        hi: The larger class of each input's pair.
        answers: The suspect's labels (−1 = abstention); labels outside an input's pair count too.
        leans: Optionally the suspect's continuous lean towards ``lo`` per input (:func:`probability_leans`),
            used in place of the labels: any function of the suspect's own answers keeps the null exact, and
            a lean also counts the calls a surrogate moved without flipping.
        centre: Optionally a key-free expected evidence per input (:func:`expected_evidence`), subtracted from
            each in-pair sign (or each answered lean): any key-free centring keeps the null exact.

    Returns:
        ``Z`` (N(0, 1) exactly under H0; 0 when no answer carries evidence) and details.
    """
    a = np.asarray(answers, dtype=np.int64)
    signs = np.where(a == lo, 1.0, np.where(a == hi, -1.0, 0.0))
    v = evidence_sums(psi=psi, lo=lo, hi=hi, answers=a, leans=leans, centre=centre,
                      num_classes=rule.directions.shape[0])
    groups = lo * rule.directions.shape[0] + hi
    variance = float((v ** 2).sum())
    z = float((rule.directions * v).sum() / np.sqrt(variance)) if variance > 0 else 0.0
    u = psi @ rule.directions.T
    lean = u[np.arange(len(a)), lo] - u[np.arange(len(a)), hi]
    in_pair = signs != 0
    return z, {"in_pair": int(in_pair.sum()), "agree": int(np.sum(in_pair & (np.sign(lean) == signs))),
               "pairs": len(np.unique(groups[in_pair])), "outside_pair": int(((a >= 0) & ~in_pair).sum())}


def z_log10_p(z: float) -> float:
    """log10 of the one-sided p-value ``P(N(0, 1) >= z)``, in log space (0 for ``z`` = 0: no evidence either way)."""
    return float(log_ndtr(-z) / np.log(10.0)) if z != 0.0 else 0.0
