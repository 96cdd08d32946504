"""The tie-break mark's feature map, principal vs shift-invariant, side by side on the same keys and thieves.

A surrogate trained with augmentation (random shifts) fits one label to every shifted copy of a query, so it can
learn the keyed shift only along feature directions a shift leaves in place. The library's principal map keeps
the 64 largest whitened directions of the served model's penultimate features; on the Fashion-MNIST victim a
1-pixel roll keeps only ~0.7 of the keyed shift's correlation, a (2, 2) roll ~0.2. The research map
(``research/invariant_map.py``: ``invariant_rule`` with ``image_shifts(2)``) keeps instead the directions that move
least under shifts of up to 2 pixels; ``conv1-global`` reads the served CNN's first conv layer, ReLU'd and
averaged over the image (``PooledFeaturizer``; its keyed difference near ties survives a 1-pixel shift with
correlation 0.98, ``research/pooled_invariance.py``); ``rank1`` / ``rank3`` keep the principal map and draw a
rank-1 or rank-3 keyed head (``research/rank_map.py``: the same shift energy in fewer feature directions, read by
its exact conditional ``Z``); ``shared32-mlp`` keeps the 32 directions of the principal space that the 16 MLP
references represent best (``research/shared_map.py``; leave-family-out only for the conv thieves). Measured
here, not adopted:
``docs/research/extraction-families.md``.

Per fresh key and map: one rule, its 1000 verification inputs committed with all 32 references, the 16 CNN ones
and the 16 MLP ones; one label-only marked API (beta 1) with a log; the honest cost on the attacker's 10k test
images; thieves trained through it with the same seeds under every map (paired), verified leave-family-out as in
``extraction_families.py`` (conv thieves with the MLP references, the MLP thief with the CNN ones) and in-sample.

Thieves: ``cnn-adam-hard`` and ``mlp-adam-hard`` (the reference panel's families), ``bn-cnn-sgd`` (rolls of up to
2 pixels: the augmentation the invariant map was built for) and, held out, ``cnn-affine``: the library CNN with
Adam and a random affine augmentation the map was not built for (rotation up to 12 degrees, scale 0.9-1.1,
fractional translation up to 1.5 pixels, horizontal flips).

Null panel (key-free): the unmarked victim, five extraction independents, ``bn-cnn-sgd`` and ``cnn-affine``
distilled from the unmarked victim (seed 1) and a true-label BatchNorm CNN; each asked the committed inputs of
every subset and every thief's log under its LFO and in-sample subsets, under every key and map.

Usage: nice -n 10 python benchmarks/tiebreak_invariance.py [--keys 2] [--first-key 0] [--maps principal64,conv1-global]
[--name tiebreak_invariance]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "research")]

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    SCOPE_PP,
    cached_references,
    extraction_independents,
    machine,
    table,
    tiebreak_setting,
    write_results,
)
from extraction_families import FAMILIES, LFO_SUBSET, SHAPE, Family, fit, query_pool, true_label_nulls
from invariant_map import PooledFeaturizer, image_shifts, invariant_rule
from rank_map import rank_rule, use_rank_statistic
from shared_map import shared_rule
from torch import nn

from wmark.distill import query_victim
from wmark.keys import generate_key
from wmark.models import build_model, load_model, penultimate_featurizer
from wmark.schemes.tiebreak import (
    LOG_TEST_WEIGHT,
    TieBreakAPI,
    TieBreakLog,
    accuracy_cost,
    build_tiebreak_rule,
    commit_verification_inputs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
)
from wmark.stats import holm
from wmark.suspects import LocalSuspect

ALPHA = 1e-6
WEIGHTS = [1.0, 1.0, LOG_TEST_WEIGHT]
SUBSETS = ("all", "cnn", "mlp")
MAPS = {"principal64": {"components": 64}, "invariant32": {"components": 32, "invariance": 2},
        "invariant16": {"components": 16, "invariance": 2}, "conv1-global": {"components": 15, "pooled": "conv1"},
        "rank1": {"components": 64, "rank": 1}, "rank3": {"components": 64, "rank": 3},
        "shared32-mlp": {"components": 32, "shared": "mlp"}}


def affine_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (±12°), scale (0.9–1.1), translation (±1.5 px) and horizontal flip, per image."""
    n, h = len(x), x.shape[-1]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1.5 * 2 / h)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def cnn_affine(api: Any, x: np.ndarray, seed: int, in_scope: Any) -> tuple[nn.Module, int]:
    """The library CNN with Adam on the marked labels of its 10k queries, each batch randomly affine-augmented."""
    xq = query_pool(x, seed)
    labels, _ = query_victim(api, xq)
    model = build_model("fmnist-cnn", num_classes=10, input_shape=SHAPE, seed=seed)
    return fit(model, xq, torch.as_tensor(labels), optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
               loss_fn=nn.CrossEntropyLoss(), seed=seed, in_scope=in_scope, augment=affine_batch)


THIEVES = {**{n: FAMILIES[n] for n in ("cnn-adam-hard", "mlp-adam-hard", "bn-cnn-sgd")},
           "cnn-affine": Family("cnn-affine", "conv", False, cnn_affine)}


def verdict(committed: float, logged: float) -> float:
    return min(holm([0.0, committed, logged], WEIGHTS))


def null_models(setting: Any) -> list[tuple[str, nn.Module]]:
    """The key-free innocent models (see the module docstring)."""
    out: list[tuple[str, nn.Module]] = [("unmarked victim", setting.victim)]
    out += [(f"independent {name}", load_model(arch, path)[0].eval())
            for name, arch, path in extraction_independents()[:5]]
    label_only = LocalSuspect(setting.victim, input_shape=SHAPE, description="unmarked victim, labels")
    x = setting.attacker.x_train.numpy()
    for name in ("bn-cnn-sgd", "cnn-affine"):
        net, epochs = THIEVES[name].train(label_only, x, 1, setting.in_scope)
        out.append((f"{name} distilled from the unmarked victim ({epochs} ep)", net.eval()))
    out += true_label_nulls(setting, quick=True)
    return out


def summarise(rows: list[dict[str, Any]], nulls: list[dict[str, Any]], costs: list[dict[str, Any]]) -> dict[str, Any]:
    lg = np.log10(ALPHA)
    out: dict[str, Any] = {}
    for m in dict.fromkeys(r["map"] for r in rows):
        mine = [r for r in rows if r["map"] == m]
        fams = {}
        for fam in dict.fromkeys(r["family"] for r in mine):
            sel = [r for r in mine if r["family"] == fam and r["within_5pp"]]
            fams[fam] = {"thieves": sum(r["family"] == fam for r in mine), "in_scope": len(sel),
                         "caught_lfo": sum(r["verdict_lfo"] <= lg for r in sel),
                         "caught_in_sample": sum(r["verdict_all"] <= lg for r in sel),
                         "median_log10_p_lfo": float(np.median([r["verdict_lfo"] for r in sel])) if sel else None,
                         "z_log_lfo": [round(r["z_log_lfo"], 2) for r in sel]}
        in_scope = [r for r in mine if r["within_5pp"]]
        c = [x["accuracy_cost_pp"] for x in costs if x["map"] == m]
        nm = [x for x in nulls if x["map"] == m]
        out[m] = {"families": fams, "in_scope": len(in_scope),
                  "caught_lfo": sum(r["verdict_lfo"] <= lg for r in in_scope),
                  "caught_in_sample": sum(r["verdict_all"] <= lg for r in in_scope),
                  "cost_pp_mean": float(np.mean(c)) if c else None,
                  "null_checks": len(nm), "null_accused": sum(x["verdict_log10_p"] <= lg for x in nm),
                  "null_min_verdict": float(min((x["verdict_log10_p"] for x in nm), default=0.0))}
    return out


def main() -> None:
    with use_rank_statistic():  # a rank map's rule is read by its conditional Z; every other rule as before
        run()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--first-key", type=int, default=0)
    parser.add_argument("--maps", default=",".join(MAPS))
    parser.add_argument("--families", default=",".join(THIEVES))
    parser.add_argument("--name", default="tiebreak_invariance")
    args = parser.parse_args()
    maps = [m.strip() for m in args.maps.split(",")]
    families = [THIEVES[f.strip()] for f in args.families.split(",")]
    start = time.perf_counter()
    setting = tiebreak_setting()
    served = setting.served
    featurizer = penultimate_featurizer(setting.victim)
    references = cached_references(setting, {})
    subsets = {"all": references, "cnn": [r for r in references if r[0] == "fmnist-cnn"],
               "mlp": [r for r in references if r[0] == "fmnist-mlp"]}
    nets = null_models(setting)
    print(f"{len(references)} references, {len(nets)} null models, {time.perf_counter() - start:.0f} s", flush=True)
    x_att = setting.attacker.x_train.numpy()
    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="wmark-invariance-")
    commits: dict[str, Any] = {}

    def write(done: str) -> None:
        plain = {"summary": summarise(rows, nulls, costs), "rows": rows, "null_checks": nulls,
                 "costs": costs, "progress": done, "maps": {m: MAPS[m] for m in maps},
                 "families": [f.name for f in families], "first_key": args.first_key, "keys": args.keys,
                 "victim_accuracy": setting.victim_accuracy, "scope_pp": SCOPE_PP,
                 "null_models": [n for n, _ in nets], "seconds": time.perf_counter() - start, "machine": machine()}
        write_results(args.name, json.loads(json.dumps(plain, default=lambda o: o.item())))  # numpy scalars

    for k in range(args.first_key, args.first_key + args.keys):
        key = generate_key(owner=f"Invariance Owner {k}", num_classes=10, input_shape=SHAPE)
        for m in maps:
            t0 = time.perf_counter()
            spec = MAPS[m]
            build = {"key": key, "x": setting.x_owner, "components": spec["components"],
                     "featurizer": (PooledFeaturizer(setting.victim, spec["pooled"], quadrants=False) if "pooled" in spec
                                    else featurizer),
                     "feature_space": f"served-{spec['pooled']}-global" if "pooled" in spec else "served-penultimate"}
            r2 = None
            if "shared" in spec:
                base, r2 = shared_rule(references=subsets[spec["shared"]], **build)
            else:
                base = (invariant_rule(invariance=image_shifts(spec["invariance"]), **build) if "invariance" in spec
                        else build_tiebreak_rule(**build))
            if "rank" in spec:
                base = rank_rule(base, key=key, rank=spec["rank"])
            if not commits:  # the committed inputs depend on the served model and references only
                commits.update({s: commit_verification_inputs(base, served=served, x=setting.x_owner, references=refs,
                                                              count=1000, how=f"{s} references")
                                for s, refs in subsets.items()})
            rules = {s: dataclasses.replace(base, verification_inputs=c.verification_inputs,
                                            verification=c.verification, references=c.references)
                     for s, c in commits.items()}
            log = TieBreakLog(Path(tmp.name) / f"k{k}-{m}.sqlite", key=key)
            api = TieBreakAPI(key=key, backend=served, rule=rules["all"], beta=1.0, log=log, expose_scores=False)
            cost = accuracy_cost(api=api, x=setting.xt, y=setting.yt)
            costs.append({"key": k, "map": m, **cost,
                          **({} if r2 is None else {"shared_r2": [round(float(v), 4) for v in r2]})})
            print(f"key {k} {m}: rule in {time.perf_counter() - t0:.0f} s, cost {cost['accuracy_cost_pp']:.2f} pp",
                  flush=True)
            committed_null: dict[tuple[int, str], float] = {}
            for fam in families:
                t0 = time.perf_counter()
                net, epochs = fam.train(api.for_client(fam.name), x_att, 1 + k, setting.in_scope)
                suspect = LocalSuspect(net.eval(), input_shape=SHAPE, description=fam.name)
                acc = float((suspect.query(setting.xt).labels == setting.yt).mean())
                lfo = LFO_SUBSET[fam.group]
                tests = {}
                for s in dict.fromkeys((lfo, "all")):
                    chosen = select_log_inputs(key=key, rule=rules[s], served=served, log=log, client=fam.name)
                    com = tiebreak_test(key=key, rule=rules[s], served=served, suspect=suspect)
                    lt = tiebreak_log_test(key=key, rule=rules[s], served=served, suspect=suspect, chosen=chosen)
                    tests[s] = {"committed": com.log10_p, "log": lt.log10_p, "z_log": lt.details["z"],
                                "z_committed": com.details["z"]}
                    for i, (name, null_net) in enumerate(nets):
                        innocent = LocalSuspect(null_net, input_shape=SHAPE, description=name)
                        if (i, s) not in committed_null:
                            committed_null[(i, s)] = tiebreak_test(key=key, rule=rules[s], served=served,
                                                                   suspect=innocent).log10_p
                        res = tiebreak_log_test(key=key, rule=rules[s], served=served, suspect=innocent,
                                                chosen=chosen)
                        nulls.append({"key": k, "map": m, "model": name, "subset": s, "log_of": fam.name,
                                      "committed": committed_null[(i, s)], "log": res.log10_p,
                                      "verdict_log10_p": verdict(committed_null[(i, s)], res.log10_p)})
                row = {"key": k, "map": m, "family": fam.name, "epochs": epochs, "accuracy": acc,
                       "within_5pp": bool(acc >= setting.victim_accuracy - SCOPE_PP / 100), "lfo_subset": lfo,
                       "tests": tests, "verdict_lfo": verdict(tests[lfo]["committed"], tests[lfo]["log"]),
                       "verdict_all": verdict(tests["all"]["committed"], tests["all"]["log"]),
                       "z_log_lfo": tests[lfo]["z_log"], "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(table([row], ["key", "map", "family", "epochs", "accuracy", "verdict_lfo", "verdict_all",
                                    "z_log_lfo", "seconds"]), flush=True)
            log.close()
            write(f"key {k}, {m}")
    write("complete")
    tmp.cleanup()
    summary = summarise(rows, nulls, costs)
    for m, v in summary.items():
        print(f"\n{m}: cost {v['cost_pp_mean']:.2f} pp, caught LFO {v['caught_lfo']} / in-sample "
              f"{v['caught_in_sample']} of {v['in_scope']}; null {v['null_accused']} of {v['null_checks']} accused "
              f"(smallest {v['null_min_verdict']:.2f})")
        print(table([{"family": f, **d} for f, d in v["families"].items()],
                    ["family", "in_scope", "caught_lfo", "caught_in_sample", "median_log10_p_lfo", "z_log_lfo"]))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
