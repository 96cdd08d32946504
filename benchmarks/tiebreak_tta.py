"""Reading a suspect on shifted copies of the logged inputs (test-time augmentation) in the tie-break log test.

A thief that trains with random shifts fits the label the API gave ``x`` to every shifted copy of ``x``, so the
keyed part of that label is in its answers on all the copies, while its own fit varies from copy to copy.
Averaging its lean ``log(p_lo / p_hi)`` (clipped, as :func:`wmark.schemes.tiebreak.probability_leans`) over the
copies is a function of the suspect's own answers, so the statistic keeps its exact N(0, 1) null; it spends one
query per copy. Side by side on the same keys, thieves and logs (beta 1, the library's principal map, the
leave-family-out ranking by the 16 MLP references), each reading asks the first inputs of the client's ranked
log in one round:

* ``plain1000`` / ``plain400``: the first 1000 / 400, read once (the library's fixed test with ``rounds=1``);
* ``tta9x1000``: the first 1000, each read on itself and its 8 shifts by up to 1 pixel (9000 queries);
* ``tta25x400``: the first 400, each read on itself and its 24 shifts by up to 2 pixels (10,000 queries);
* ``library``: the library's default log test (1000 queries in 21 rounds), for reference.

Thieves: ``cnn-adam-hard`` (no augmentation), ``bn-cnn-sgd`` (rolls of up to 2 pixels), ``cnn-affine`` (random
affine transforms: not shifts alone). Every thief sent 10,000 queries. Null panel: ``tiebreak_invariance.null_models``
under every reading. A reading's verdict is weighted Holm over the committed inputs (weight 1) and the reading
(weight 8), as the library's.

Usage: nice -n 10 python benchmarks/tiebreak_tta.py [--keys 2] [--first-key 0]
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
from extraction_families import SHAPE
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
    probability_leans,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_statistic,
    tiebreak_test,
    top_pairs,
)
from wmark.suspects import LocalSuspect

FAMILIES = ("cnn-adam-hard", "bn-cnn-sgd", "cnn-affine")
READINGS = {"plain1000": (1000, 0), "plain400": (400, 0), "tta9x1000": (1000, 1), "tta25x400": (400, 2)}


def tta_log10_p(*, rule: Any, chosen: Any, suspect: LocalSuspect, count: int, max_shift: int) -> tuple[float, float]:
    """(log10 p, Z) of the statistic on the first ``count`` ranked logged inputs, the suspect's lean averaged
    over each input and its shifts by up to ``max_shift`` pixels (0: the input alone)."""
    x = chosen.x[:count]
    _, lo, hi = top_pairs(chosen.scores[:count])
    copies = [x] + ([t(x) for t in image_shifts(max_shift).transforms] if max_shift else [])
    said = [suspect.query(c) for c in copies]
    leans = np.mean([probability_leans(a.scores, lo, hi) for a in said], axis=0)
    answers = np.asarray(said[0].labels)
    z, _ = tiebreak_statistic(rule=rule, psi=rule.features(x), lo=lo, hi=hi, answers=answers, leans=leans)
    return (float(log_ndtr(-z) / np.log(10.0)) if z != 0.0 else 0.0), z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--first-key", type=int, default=0)
    parser.add_argument("--name", default="tiebreak_tta")
    args = parser.parse_args()
    start = time.perf_counter()
    setting = tiebreak_setting()
    served = setting.served
    featurizer = penultimate_featurizer(setting.victim)
    mlp = [r for r in cached_references(setting, {}) if r[0] == "fmnist-mlp"]
    nets = null_models(setting)
    print(f"{len(nets)} null models, {time.perf_counter() - start:.0f} s", flush=True)
    x_att = setting.attacker.x_train.numpy()
    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    committed: Any = None
    tmp = tempfile.TemporaryDirectory(prefix="wmark-tta-")
    lg = np.log10(1e-6)
    names = [*READINGS, "library"]

    def write(done: str) -> dict[str, Any]:
        in_scope = [r for r in rows if r["within_5pp"]]
        summary = {name: {"caught": {f: sum(r["family"] == f and r["verdicts"][name] <= lg for r in in_scope)
                                     for f in FAMILIES},
                          "in_scope": {f: sum(r["family"] == f for r in in_scope) for f in FAMILIES},
                          "z": {f: [round(r["z"][name], 2) for r in in_scope if r["family"] == f] for f in FAMILIES},
                          "null_checks": sum(n["reading"] == name for n in nulls),
                          "null_accused": sum(n["reading"] == name and n["verdict_log10_p"] <= lg for n in nulls),
                          "null_min_verdict": min((n["verdict_log10_p"] for n in nulls if n["reading"] == name),
                                                  default=0.0)}
                   for name in names}
        doc = {"summary": summary, "rows": rows, "null_checks": nulls, "progress": done, "readings": READINGS,
               "first_key": args.first_key, "keys": args.keys, "victim_accuracy": setting.victim_accuracy,
               "scope_pp": SCOPE_PP, "null_models": [n for n, _ in nets], "seconds": time.perf_counter() - start,
               "machine": machine()}
        write_results(args.name, json.loads(json.dumps(doc, default=lambda o: o.item())))
        return summary

    for k in range(args.first_key, args.first_key + args.keys):
        key = generate_key(owner=f"TTA Owner {k}", num_classes=10, input_shape=SHAPE)
        base = build_tiebreak_rule(key=key, x=setting.x_owner, featurizer=featurizer, feature_space="served-penultimate")
        if committed is None:  # depends on the served model and references only
            committed = commit_verification_inputs(base, served=served, x=setting.x_owner, references=mlp,
                                                   count=1000, how="mlp references")
        rule = dataclasses.replace(base, verification_inputs=committed.verification_inputs,
                                   verification=committed.verification, references=committed.references)
        log = TieBreakLog(Path(tmp.name) / f"k{k}.sqlite", key=key)
        api = TieBreakAPI(key=key, backend=served, rule=base, beta=1.0, log=log, expose_scores=False)
        null_committed: dict[int, float] = {}
        for name in FAMILIES:
            t0 = time.perf_counter()
            net, epochs = THIEVES[name].train(api.for_client(name), x_att, 1 + k, setting.in_scope)
            suspect = LocalSuspect(net.eval(), input_shape=SHAPE, description=name)
            acc = float((suspect.query(setting.xt).labels == setting.yt).mean())
            chosen = select_log_inputs(key=key, rule=rule, served=served, log=log, client=name)
            com = tiebreak_test(key=key, rule=rule, served=served, suspect=suspect).log10_p
            z, verdicts = {}, {}
            for reading, (count, shift) in READINGS.items():
                p, z[reading] = tta_log10_p(rule=rule, chosen=chosen, suspect=suspect, count=count, max_shift=shift)
                verdicts[reading] = verdict(com, p)
            lib = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect, chosen=chosen)
            z["library"], verdicts["library"] = lib.details["z"], verdict(com, lib.log10_p)
            for i, (null_name, null_net) in enumerate(nets):
                innocent = LocalSuspect(null_net, input_shape=SHAPE, description=null_name)
                if i not in null_committed:
                    null_committed[i] = tiebreak_test(key=key, rule=rule, served=served, suspect=innocent).log10_p
                for reading, (count, shift) in READINGS.items():
                    p, _ = tta_log10_p(rule=rule, chosen=chosen, suspect=innocent, count=count, max_shift=shift)
                    nulls.append({"key": k, "model": null_name, "log_of": name, "reading": reading, "log": p,
                                  "verdict_log10_p": verdict(null_committed[i], p)})
                res = tiebreak_log_test(key=key, rule=rule, served=served, suspect=innocent, chosen=chosen)
                nulls.append({"key": k, "model": null_name, "log_of": name, "reading": "library", "log": res.log10_p,
                              "verdict_log10_p": verdict(null_committed[i], res.log10_p)})
            rows.append({"key": k, "family": name, "epochs": epochs, "accuracy": acc, "committed": com,
                         "within_5pp": bool(acc >= setting.victim_accuracy - SCOPE_PP / 100), "z": z,
                         "verdicts": verdicts, "seconds": time.perf_counter() - t0})
            print(table([{"key": k, "family": name, "epochs": epochs, **{n: round(z[n], 2) for n in names}}],
                        ["key", "family", "epochs", *names]), flush=True)
        log.close()
        write(f"key {k}")
    summary = write("complete")
    tmp.cleanup()
    print(json.dumps(summary, indent=1, default=lambda o: o.item()))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
