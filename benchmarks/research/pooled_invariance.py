"""How far the keyed shift survives image shifts under feature maps read from the served CNN's conv layers.

A pre-check before spending a thief panel on a feature map (``docs/research/extraction-families.md``): per map
and key, the correlation of the keyed shift ``u(x)`` with ``u(shift(x))`` for zero-filled translations by
(0, 1), (1, 1) and (2, 2) pixels on 3000 held-out owner images (the map fitted on 8000 others), and the share
of ``u``'s variance within the served model's classes. On the held-out images whose top two classes are near a
tie (``p_b / p_a >= 0.3``), where the verdict reads the mark, two more: the variance of the pair's keyed
difference ``u_lo - u_hi`` centred per pair, relative to the shift's overall scale (``2 mean_c var(u_c)``), and
that centred difference's correlation under a (0, 1) shift. Maps: the library's principal 64 directions of the
penultimate features; the invariant 32 of ``invariant_map.invariant_rule``; :class:`PooledFeaturizer`
features (the ReLU'd output of ``conv2`` or ``conv1`` averaged over the whole map, and with quadrant averages);
and the served model's own logits and log-probabilities (10 and 9 live directions).

Usage: python benchmarks/research/pooled_invariance.py [--keys 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import numpy as np
import torch
from common import table, tiebreak_setting, write_results
from invariant_map import PooledFeaturizer, image_shifts, invariant_rule

from wmark.keys import generate_key
from wmark.models import penultimate_featurizer
from wmark.schemes.tiebreak import build_tiebreak_rule, top_pairs
from wmark.training import predict_logits

MOVES = ((0, 1), (1, 1), (2, 2))


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(x)
    out[:, :, dy:, dx:] = x[:, :, :x.shape[2] - dy, :x.shape[3] - dx]
    return out


def pair_centred(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The keyed difference ``u_lo - u_hi`` of each input's pair, centred over the inputs of that pair."""
    d = u[np.arange(len(u)), lo] - u[np.arange(len(u)), hi]
    pair = lo * u.shape[1] + hi
    for p in np.unique(pair):
        d[pair == p] -= d[pair == p].mean()
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2)
    args = parser.parse_args()
    setting = tiebreak_setting()
    fit_x, held = setting.x_owner[:8000], setting.x_owner[8000:11000]
    scores = np.asarray(setting.served.query(held).scores)
    labels = scores.argmax(1)
    ratio, a, b = top_pairs(scores)
    near = ratio >= 0.3
    lo, hi = np.minimum(a, b)[near], np.maximum(a, b)[near]
    penultimate = penultimate_featurizer(setting.victim)

    def logits(x: np.ndarray) -> np.ndarray:
        return predict_logits(setting.victim, torch.as_tensor(np.asarray(x, np.float32))).numpy()

    def log_probs(x: np.ndarray) -> np.ndarray:
        return torch.log_softmax(torch.as_tensor(logits(x)), 1).numpy()

    maps: dict[str, Any] = {
        "principal64": lambda key: build_tiebreak_rule(key=key, x=fit_x, featurizer=penultimate, feature_space="p"),
        "invariant32": lambda key: invariant_rule(invariance=image_shifts(2), components=32, key=key, x=fit_x,
                                                  featurizer=penultimate, feature_space="i"),
        "conv2-global": lambda key: build_tiebreak_rule(key=key, x=fit_x, feature_space="g2", featurizer=PooledFeaturizer(
            setting.victim, "conv2", quadrants=False)),
        "conv2-quadrants": lambda key: build_tiebreak_rule(key=key, x=fit_x, feature_space="q2",
                                                           featurizer=PooledFeaturizer(setting.victim, "conv2")),
        "conv1-global": lambda key: build_tiebreak_rule(key=key, x=fit_x, feature_space="g1", featurizer=PooledFeaturizer(
            setting.victim, "conv1", quadrants=False)),
        "logits": lambda key: build_tiebreak_rule(key=key, x=fit_x, featurizer=logits, feature_space="l", components=10),
        "log-probs": lambda key: build_tiebreak_rule(key=key, x=fit_x, featurizer=log_probs, feature_space="lp",
                                                     components=9),
    }
    rows = []
    for name, make in maps.items():
        for k in range(args.keys):
            rule = make(generate_key(owner=f"Pooled check {k}", num_classes=10, input_shape=(1, 28, 28)))
            u = rule.shifts(held)
            row: dict[str, Any] = {"map": name, "key": k, "components": rule.components}
            for dy, dx in MOVES:
                moved = rule.shifts(shifted(held, dy, dx))
                row[f"corr_{dy}{dx}"] = round(float(np.corrcoef(u.ravel(), moved.ravel())[0, 1]), 3)
            within = sum(u[labels == c].var(axis=0).sum() * (labels == c).mean() for c in range(10))
            row["within_class_share"] = round(float(within / u.var(axis=0).sum()), 3)
            tie = pair_centred(u[near], lo, hi)
            row["near_tie_variance"] = round(float(tie.var() / (2 * u.var(axis=0).mean())), 3)
            moved = pair_centred(rule.shifts(shifted(held, 0, 1))[near], lo, hi)
            row["near_tie_corr_01"] = round(float(np.corrcoef(tie, moved)[0, 1]), 3)
            rows.append(row)
    print(table(rows, list(rows[0])))
    doc = {"rows": rows, "held_out": len(held), "near_ties": int(near.sum())}
    print(f"wrote {write_results('research_pooled_invariance', doc)}")


if __name__ == "__main__":
    main()
