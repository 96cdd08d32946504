"""How far the keyed shift survives image shifts under feature maps read from the served CNN's conv layers.

A pre-check before spending a thief panel on a feature map (``docs/research/extraction-families.md``): per map
and key, the correlation of the keyed shift ``u(x)`` with ``u(shift(x))`` for zero-filled translations by
(0, 1), (1, 1) and (2, 2) pixels on 3000 held-out owner images (the map fitted on 8000 others), and the share
of ``u``'s variance within the served model's classes. Maps: the library's principal 64 directions of the
penultimate features; the invariant 32 of ``invariant_map.invariant_rule``; and :class:`PooledFeaturizer`
features (the ReLU'd output of ``conv2`` or ``conv1`` averaged over the whole map, and with quadrant averages).

Usage: python benchmarks/research/pooled_invariance.py [--keys 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import numpy as np
from common import table, tiebreak_setting, write_results
from invariant_map import PooledFeaturizer, image_shifts, invariant_rule

from wmark.keys import generate_key
from wmark.models import penultimate_featurizer
from wmark.schemes.tiebreak import build_tiebreak_rule

MOVES = ((0, 1), (1, 1), (2, 2))


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(x)
    out[:, :, dy:, dx:] = x[:, :, :x.shape[2] - dy, :x.shape[3] - dx]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2)
    args = parser.parse_args()
    setting = tiebreak_setting()
    fit_x, held = setting.x_owner[:8000], setting.x_owner[8000:11000]
    labels = setting.served.query(held).labels
    penultimate = penultimate_featurizer(setting.victim)
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
            rows.append(row)
    print(table(rows, list(rows[0])))
    print(f"wrote {write_results('research_pooled_invariance', {'rows': rows, 'held_out': len(held)})}")


if __name__ == "__main__":
    main()
