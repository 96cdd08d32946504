"""Pre-check: does the tie-break statistic lose evidence to the suspect's own, key-free lean? (#17, research)

The statistic sums each answer's sign times its features, ``v_c = sum_i s_i phi_i`` (per pair, centred), and reads
``Z = <w, v> / |v|``. Near a tie a suspect's sign still follows its own decision, which is largely a linear function
of the same features (the served head's directions). That part of ``v`` is key-free, so it adds to ``|v|`` and
to ``<w, v>``'s noise, not to its signal. Two key-free readings of the same answers remove it, each keeping the
null exact (``v`` stays a function of the answers and key-free quantities, the directions stay independent of it):

* ``proj``: the features with the served head's class directions (in the rule's whitened space, fitted on the
  owner's texts) projected out;
* ``resid``: each in-pair sign minus the served model's own expected sign, ``tanh(m / 2)`` for its pair
  log-odds ``m``;
* ``both``.

Read on the MiniLM victim's near-ties among the thief's texts (the first 1000 by the served model's margin),
for null MiniLM models (Z ~ N(0, 1) under every reading) and for simulated thieves: a null model's logits plus
``gamma`` times the keyed shift (a thief that learnt a fraction of it). What it decides: nothing in the library.
It is a lead worth a pre-registered stage with real thieves if, at the ``gamma`` where the library reading's
mean ``Z`` is 3 to 6, a reading raises the mean ``Z`` by at least 15 % on every simulated thief's base model.

``python benchmarks/research/residual_statistic.py --keys 6``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import write_results
from benchmarks.text_extraction import (
    VICTIM_LR,
    TextTable,
    _cached_minilm,
    _digest,
    fortunes_minilm_victim,
    head_basis,
    texts_and_labels,
    trained,
)
from wmark.data import load_dataset
from wmark.distill import extract
from wmark.keys import generate_key
from wmark.schemes.querylog import LOG_MIN_RATIO
from wmark.schemes.tiebreak import build_tiebreak_rule
from wmark.schemes.tiebreak.rule import pair_log_odds, top_pairs
from wmark.schemes.tiebreak.statistic import _outside, _pair_sums, expected_signs

READINGS = ("library", "proj", "resid", "both")  # "library": plain signs, its reading when this pre-check ran
GAMMAS = (0.0, 0.15, 0.25, 0.4)


def z_of(reading: str, *, w: np.ndarray, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, answers: np.ndarray,
         centre: np.ndarray, basis: np.ndarray) -> tuple[float, float]:
    """``Z`` and ``|v|`` of one reading of label answers (``centre``: the served model's expected signs)."""
    signs = np.where(answers == lo, 1.0, np.where(answers == hi, -1.0, 0.0))
    phi = psi - (psi @ basis) @ basis.T if reading in ("proj", "both") else psi
    s = signs - np.where(signs != 0, centre, 0.0) if reading in ("resid", "both") else signs
    v = _pair_sums(phi, lo, hi, s, num_classes=w.shape[0], outside=_outside(answers, lo, hi))
    norm = float(np.sqrt((v ** 2).sum()))
    return (float((w * v).sum() / norm) if norm > 0 else 0.0), norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=6)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    start = time.perf_counter()
    setting = fortunes_minilm_victim()
    text, victim, xo, yo = setting["text"], setting["victim"], setting["xo"], setting["yo"]
    thief_ds = load_dataset("fortunes@attacker")
    xa, ya = texts_and_labels(thief_ds.texts_train, thief_ds.y_train, text)
    arch = "minilm-classifier"
    nulls = {
        "MiniLM, owner third, seed 1": trained(arch, xo, yo, text, epochs=2, seed=1),
        "MiniLM, thief third, true labels": trained(arch, xa, ya, text, epochs=2, seed=2),
        "MiniLM, distilled from the unmarked victim": _cached_minilm(
            {"name": "text-extraction-minilm-distilled", "texts": _digest(xa), "victim": [_digest(xo), _digest(yo), 2],
             "seed": 3},
            lambda: extract(victim, x=xa, arch=arch, epochs=2, lr=VICTIM_LR[arch], batch_size=32, seed=3,
                            text=text).model),
    }
    tables = {name: TextTable(m, text, description=name, expose_scores=True) for name, m in nulls.items()}
    scores = victim.query(xa).scores
    ratio, lo, hi = top_pairs(scores)
    near = ratio >= LOG_MIN_RATIO
    margin_all = pair_log_odds(scores, lo, hi)
    order = np.argsort(np.abs(margin_all), kind="stable")
    order = order[near[order]][:args.queries]
    x, lo, hi = xa[order], lo[order], hi[order]
    centre = expected_signs(scores[order], lo, hi)
    logits = {name: t._rows(x)[0] for name, t in tables.items()}
    print(f"setting ready: {len(x)} near ties ({time.perf_counter() - start:.0f} s)", flush=True)
    rows: list[dict[str, Any]] = []
    modality = setting["modality"]
    for k in range(args.keys):
        key = generate_key(owner=f"residual pre-check {k}", num_classes=8, modality=modality)
        rule = build_tiebreak_rule(key=key, x=xo, featurizer=victim.features, feature_space="served-penultimate",
                                   text=text)
        basis = head_basis(rule.features(xo), victim.query(xo).scores)
        psi = rule.features(x)
        shift = rule.shifts_of(psi)
        for name, lg in logits.items():
            for gamma in GAMMAS:
                answers = np.argmax(lg + gamma * shift, axis=1)
                row: dict[str, Any] = {"key": k, "model": name, "gamma": gamma}
                for reading in READINGS:
                    z, norm = z_of(reading, w=rule.directions, psi=psi, lo=lo, hi=hi, answers=answers, centre=centre,
                                   basis=basis)
                    row[f"z_{reading}"], row[f"norm_{reading}"] = round(z, 3), round(norm, 1)
                rows.append(row)
        print(f"key {k} done, head basis rank {basis.shape[1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = []
    for name in logits:
        for gamma in GAMMAS:
            sel = [r for r in rows if r["model"] == name and r["gamma"] == gamma]
            entry: dict[str, Any] = {"model": name, "gamma": gamma}
            for reading in READINGS:
                zs = np.array([r[f"z_{reading}"] for r in sel])
                entry[f"mean_z_{reading}"] = round(float(zs.mean()), 3)
                entry[f"sd_z_{reading}"] = round(float(zs.std(ddof=1)), 3) if len(zs) > 1 else 0.0
                entry[f"norm_{reading}"] = round(float(np.mean([r[f"norm_{reading}"] for r in sel])), 1)
            summary.append(entry)
            print(entry, flush=True)
    write_results("research_residual_statistic", {"keys": args.keys, "queries": len(x), "gammas": list(GAMMAS),
                                                  "readings": list(READINGS), "rows": rows, "summary": summary,
                                                  "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
