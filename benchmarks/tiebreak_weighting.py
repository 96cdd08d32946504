"""Weighting the tie-break statistic's feature directions at test time, side by side on the same answers.

The library's statistic ``Z = sum_c <w_c, v_c> / |v|`` counts all ``k`` whitened directions alike. A thief that
trains with augmentation can only learn the keyed shift along directions its augmentation leaves in place, so in
the others its pair sums ``v`` would be noise. A fixed diagonal weighting ``D`` of the directions,

    Z_D = sum_j d_j a_j / sqrt(sum_j d_j^2 b_j),   a_j = sum_c w_cj v_cj,   b_j = sum_c v_cj^2,

is still exactly N(0, 1) for a suspect made without the marked answers, as long as ``D`` never reads the key
(given ``v``, the ``w_cj`` are independent standard normals). The mark, its cost and the queries are unchanged:
only the reading of the same answers differs. Weightings, all fixed from the served model's feature map before
any thief exists:

* ``uniform``: the library's statistic;
* ``shift``: ``d_j`` = how well direction ``j`` survives a 1-pixel shift (the mean over the 8 one-pixel
  zero-filled shifts of the correlation of ``psi_j(x)`` with ``psi_j(shift(x))`` on 4000 owner images,
  floored at 0);
* ``eigen``: ``d_j`` = the feature's standard deviation along direction ``j`` before whitening (a surrogate's
  head learns the large directions first), relative to the largest;
* ``top32``: the 32 largest directions only.

Per fresh key: one rule (the library's principal 64 directions, beta 1, label-only API with a log), the
thieves of ``tiebreak_invariance.THIEVES`` trained through it, each verified leave-family-out (conv thieves with
the 16 MLP references, the MLP thief with the 16 CNN ones): the library's committed-input test and log test are
run once on a recording suspect, and every weighting reads the answers those tests got. Verdict per weighting:
weighted Holm over the committed-input and log readings under that weighting (weights 1 and 8, as the library).
Null panel: ``tiebreak_invariance.null_models`` on every thief's log and the committed inputs.
``a`` and ``b`` are stored per test so other weightings can be read later (as exploration, not as a result).

Usage: nice -n 10 python benchmarks/tiebreak_weighting.py [--keys 2] [--first-key 0] [--name tiebreak_weighting]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "research")]

import numpy as np
from common import SCOPE_PP, cached_references, machine, table, tiebreak_setting, write_results
from extraction_families import LFO_SUBSET, SHAPE
from invariant_map import image_shifts
from scipy.special import log_ndtr
from tiebreak_invariance import THIEVES, null_models, verdict

from wmark.keys import generate_key
from wmark.models import penultimate_featurizer
from wmark.schemes.tiebreak import (
    TieBreakAPI,
    TieBreakLog,
    build_tiebreak_rule,
    commit_verification_inputs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
    top_pairs,
)
from wmark.schemes.tiebreak.statistic import _outside, _pair_sums
from wmark.suspects import LocalSuspect
from wmark.suspects.base import Answers

ALPHA = 1e-6


class Recording:
    """A suspect that answers as ``inner`` and keeps every input and label it was asked (labels only)."""

    def __init__(self, inner: LocalSuspect) -> None:
        self.inner, self.asked, self.labels = inner, [], []
        self.num_classes, self.input_shape, self.description = inner.num_classes, inner.input_shape, inner.description

    def query(self, x: np.ndarray) -> Answers:
        said = self.inner.query(x)
        self.asked.append(np.asarray(x))
        self.labels.append(np.asarray(said.labels))
        return Answers(labels=said.labels)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        out = np.concatenate(self.asked), np.concatenate(self.labels)
        self.asked, self.labels = [], []
        return out


def direction_sums(rule: Any, served: Any, x: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per direction ``a_j = sum_c w_cj v_cj`` and ``b_j = sum_c v_cj^2`` of the library statistic on these answers."""
    _, lo, hi = top_pairs(np.asarray(served.query(x).scores))
    a = np.asarray(answers, dtype=np.int64)
    s = np.where(a == lo, 1.0, np.where(a == hi, -1.0, 0.0))
    v = _pair_sums(rule.features(x), lo, hi, s, num_classes=rule.directions.shape[0], outside=_outside(a, lo, hi))
    return (rule.directions * v).sum(axis=0), (v ** 2).sum(axis=0)


def z_of(d: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.sqrt((d ** 2 * b).sum()))
    return float((d * a).sum()) / denominator if denominator > 0 else 0.0


def log10_p(z: float) -> float:
    return min(0.0, float(log_ndtr(-z) / np.log(10.0))) if z != 0.0 else 0.0


def weightings(rule: Any, x_owner: np.ndarray) -> dict[str, np.ndarray]:
    """The key-free direction weights (see the module docstring); columns of the rule run smallest first."""
    k = rule.components
    x = x_owner[:4000]
    psi = rule.features(x)
    corr = []
    for shift in image_shifts(1).transforms:
        moved = rule.features(shift(x))
        corr.append([np.corrcoef(psi[:, j], moved[:, j])[0, 1] for j in range(k)])
    shift_w = np.clip(np.mean(corr, axis=0), 0.0, None)
    std = 1.0 / np.linalg.norm(rule.projection, axis=0)
    top = np.zeros(k)
    top[k - 32:] = 1.0
    return {"uniform": np.ones(k), "shift": shift_w, "eigen": std / std.max(), "top32": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--first-key", type=int, default=0)
    parser.add_argument("--name", default="tiebreak_weighting")
    args = parser.parse_args()
    start = time.perf_counter()
    setting = tiebreak_setting()
    served = setting.served
    featurizer = penultimate_featurizer(setting.victim)
    references = cached_references(setting, {})
    subsets = {"cnn": [r for r in references if r[0] == "fmnist-cnn"],
               "mlp": [r for r in references if r[0] == "fmnist-mlp"]}
    nets = null_models(setting)
    print(f"{len(nets)} null models, {time.perf_counter() - start:.0f} s", flush=True)
    x_att = setting.attacker.x_train.numpy()
    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    weights: dict[str, np.ndarray] = {}
    commits: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="wmark-weighting-")
    lg = np.log10(ALPHA)

    def readings(com: tuple[np.ndarray, np.ndarray], log: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        out = {}
        for name, d in weights.items():
            zc, zl = z_of(d, *com), z_of(d, *log)
            out[name] = {"z_committed": zc, "z_log": zl, "verdict": verdict(log10_p(zc), log10_p(zl))}
        return out

    def write(done: str) -> dict[str, Any]:
        in_scope = [r for r in rows if r["within_5pp"]]
        fams = list(dict.fromkeys(r["family"] for r in rows))
        summary = {name: {"caught": {f: sum(r["family"] == f and r["readings"][name]["verdict"] <= lg
                                             for r in in_scope) for f in fams},
                          "in_scope": {f: sum(r["family"] == f for r in in_scope) for f in fams},
                          "z_log": {f: [round(r["readings"][name]["z_log"], 2) for r in in_scope if r["family"] == f]
                                    for f in fams},
                          "null_checks": len(nulls),
                          "null_accused": sum(n["readings"][name]["verdict"] <= lg for n in nulls),
                          "null_min_verdict": min((n["readings"][name]["verdict"] for n in nulls), default=0.0)}
                   for name in weights}
        doc = {"summary": summary, "rows": rows, "null_checks": nulls, "progress": done,
               "weights": {n: d.round(4).tolist() for n, d in weights.items()}, "first_key": args.first_key,
               "keys": args.keys, "victim_accuracy": setting.victim_accuracy, "scope_pp": SCOPE_PP,
               "null_models": [n for n, _ in nets], "seconds": time.perf_counter() - start, "machine": machine()}
        write_results(args.name, json.loads(json.dumps(doc, default=lambda o: o.tolist() if isinstance(o, np.ndarray)
                                                        else o.item())))
        return summary

    for k in range(args.first_key, args.first_key + args.keys):
        key = generate_key(owner=f"Weighting Owner {k}", num_classes=10, input_shape=SHAPE)
        base = build_tiebreak_rule(key=key, x=setting.x_owner, featurizer=featurizer, feature_space="served-penultimate")
        if not commits:  # the feature map and committed inputs depend on the served model and references only
            weights.update(weightings(base, setting.x_owner))
            commits.update({s: commit_verification_inputs(base, served=served, x=setting.x_owner, references=refs,
                                                          count=1000, how=f"{s} references")
                            for s, refs in subsets.items()})
        rules = {s: dataclasses.replace(base, verification_inputs=c.verification_inputs, verification=c.verification,
                                        references=c.references) for s, c in commits.items()}
        log = TieBreakLog(Path(tmp.name) / f"k{k}.sqlite", key=key)
        api = TieBreakAPI(key=key, backend=served, rule=base, beta=1.0, log=log, expose_scores=False)
        null_committed: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        for fam in THIEVES.values():
            t0 = time.perf_counter()
            net, epochs = fam.train(api.for_client(fam.name), x_att, 1 + k, setting.in_scope)
            suspect = Recording(LocalSuspect(net.eval(), input_shape=SHAPE, description=fam.name))
            acc = float((suspect.inner.query(setting.xt).labels == setting.yt).mean())
            s = LFO_SUBSET[fam.group]
            rule = rules[s]
            chosen = select_log_inputs(key=key, rule=rule, served=served, log=log, client=fam.name)
            com = tiebreak_test(key=key, rule=rule, served=served, suspect=suspect)
            com_sums = direction_sums(rule, served, *suspect.take())
            lib = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect, chosen=chosen)
            log_sums = direction_sums(rule, served, *suspect.take())
            assert abs(z_of(weights["uniform"], *log_sums) - lib.details["z"]) < 1e-6
            assert abs(z_of(weights["uniform"], *com_sums) - com.details["z"]) < 1e-6
            row = {"key": k, "family": fam.name, "epochs": epochs, "accuracy": acc, "lfo_subset": s,
                   "within_5pp": bool(acc >= setting.victim_accuracy - SCOPE_PP / 100),
                   "readings": readings(com_sums, log_sums), "a_log": log_sums[0], "b_log": log_sums[1],
                   "a_committed": com_sums[0], "b_committed": com_sums[1], "seconds": time.perf_counter() - t0}
            rows.append(row)
            for i, (null_name, null_net) in enumerate(nets):
                innocent = Recording(LocalSuspect(null_net, input_shape=SHAPE, description=null_name))
                if (i, s) not in null_committed:
                    tiebreak_test(key=key, rule=rule, served=served, suspect=innocent)
                    null_committed[(i, s)] = direction_sums(rule, served, *innocent.take())
                tiebreak_log_test(key=key, rule=rule, served=served, suspect=innocent, chosen=chosen)
                n_log = direction_sums(rule, served, *innocent.take())
                nulls.append({"key": k, "model": null_name, "log_of": fam.name, "subset": s,
                              "readings": readings(null_committed[(i, s)], n_log), "a_log": n_log[0],
                              "b_log": n_log[1]})
            print(table([{"key": k, "family": fam.name, "epochs": epochs, "acc": round(acc, 3),
                          **{n: round(v["z_log"], 2) for n, v in row["readings"].items()}}],
                        ["key", "family", "epochs", "acc", *weights]), flush=True)
        log.close()
        write(f"key {k}")
    summary = write("complete")
    tmp.cleanup()
    print(json.dumps(summary, indent=1, default=lambda o: o.item()))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
