"""Reference surrogates trained with augmentation: do they rank a conv thief's logged near-ties better, leave-family-out?

The log test asks a client's logged inputs where reference surrogates (distilled from the *unmarked* served
model) leave the call most open. Scored leave-family-out, a conv thief is ranked by MLP references only, and the
thieves the mark misses (``bn-cnn-sgd``) train with random shifts. This benchmark adds a reference subset that
stays in the MLP family but is distilled the way an augmenting thief trains: the library's four recipes (hard
labels for 3, 6 and 10 epochs, soft for 4), four seeds each, every batch shifted by a random offset of up to 2
pixels (zero fill). Side by side on the same keys, served API (beta 1, the library's principal map), thieves and
logs, each conv thief's verdict is read with the plain MLP references, the augmented ones, both, and (the
control for having twice as many references) the plain ones with 16 more from the same loop unshifted.

Thieves (``tiebreak_invariance.THIEVES``): ``cnn-adam-hard`` (no augmentation), ``bn-cnn-sgd`` (rolls of up to
2 pixels: what the augmented references were made like) and ``cnn-affine`` (rotation, scale, fractional
translation and flips: held out). Null panel: ``tiebreak_invariance.null_models`` under every subset.

Usage: nice -n 10 python benchmarks/tiebreak_aug_references.py [--keys 2] [--first-key 0]
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
import torch
from common import SCOPE_PP, cached_references, machine, table, tiebreak_setting, write_results
from extraction_families import SHAPE
from invariant_map import image_shifts
from tiebreak_invariance import THIEVES, null_models, verdict
from torch import nn

from wmark.distill import REFERENCE_QUERIES, REFERENCE_RECIPES, REFERENCE_REPEATS
from wmark.keys import generate_key
from wmark.models import build_model, penultimate_featurizer
from wmark.schemes.tiebreak import (
    TieBreakAPI,
    TieBreakLog,
    accuracy_cost,
    build_tiebreak_rule,
    commit_verification_inputs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
)
from wmark.suspects import LocalSuspect

SUBSETS = ("mlp", "mlp-aug", "mlp+aug", "mlp+plain")
FAMILIES = ("cnn-adam-hard", "bn-cnn-sgd", "cnn-affine")


def augmented_references(setting: Any, *, shift: bool = True) -> list[tuple[str, nn.Module]]:
    """``fmnist-mlp`` references distilled from the unmarked served model with random shifts of up to 2 pixels
    (``shift=False``: the same loop, seeds and batches unshifted, the control for having more references)."""
    shifts = image_shifts(2).transforms
    x = np.asarray(setting.x_owner, dtype=np.float32)
    probs = np.asarray(setting.served.query(x).scores, dtype=np.float32)
    out = []
    for r in range(REFERENCE_REPEATS):
        for j, (labels, epochs) in enumerate(REFERENCE_RECIPES):
            seed = 5000 + 1000 * r + j
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(x), generator=gen)[:REFERENCE_QUERIES].numpy()
            xs, ps = x[order], torch.from_numpy(probs[order])
            target = ps if labels == "soft" else ps.argmax(dim=1)
            model = build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=seed)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(epochs):
                model.train()
                perm = torch.randperm(len(xs), generator=gen).numpy()
                for i in range(0, len(xs), 64):
                    idx = perm[i:i + 64]
                    offset = int(torch.randint(len(shifts) + 1, (1,), generator=gen))  # the last: unshifted
                    batch = torch.from_numpy(np.ascontiguousarray(
                        shifts[offset](xs[idx]) if shift and offset < len(shifts) else xs[idx]))
                    opt.zero_grad()
                    logp = torch.log_softmax(model(batch), dim=1)
                    loss = -(target[idx] * logp).sum(1).mean() if labels == "soft" else \
                        nn.functional.nll_loss(logp, target[idx])
                    loss.backward()
                    opt.step()
            out.append(("fmnist-mlp", model.eval()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--first-key", type=int, default=0)
    parser.add_argument("--name", default="tiebreak_aug_references")
    args = parser.parse_args()
    start = time.perf_counter()
    setting = tiebreak_setting()
    served = setting.served
    featurizer = penultimate_featurizer(setting.victim)
    plain = [r for r in cached_references(setting, {}) if r[0] == "fmnist-mlp"]
    aug = augmented_references(setting)
    more = augmented_references(setting, shift=False)
    subsets = {"mlp": plain, "mlp-aug": aug, "mlp+aug": plain + aug, "mlp+plain": plain + more}
    nets = null_models(setting)
    print(f"{len(plain)} + {len(aug)} + {len(more)} references, {len(nets)} null models, {time.perf_counter() - start:.0f} s",
          flush=True)
    x_att = setting.attacker.x_train.numpy()
    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    commits: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="wmark-augrefs-")
    lg = np.log10(1e-6)

    def write(done: str) -> dict[str, Any]:
        in_scope = [r for r in rows if r["within_5pp"]]
        summary = {s: {f: {"in_scope": sum(r["family"] == f for r in in_scope),
                           "caught": sum(r["family"] == f and r["verdicts"][s] <= lg for r in in_scope),
                           "verdicts": [round(r["verdicts"][s], 2) for r in in_scope if r["family"] == f]}
                       for f in FAMILIES}
                   | {"null_checks": sum(n["subset"] == s for n in nulls),
                      "null_accused": sum(n["subset"] == s and n["verdict_log10_p"] <= lg for n in nulls),
                      "null_min_verdict": min((n["verdict_log10_p"] for n in nulls if n["subset"] == s), default=0.0)}
                   for s in SUBSETS}
        doc = {"summary": summary, "rows": rows, "null_checks": nulls, "costs": costs, "progress": done,
               "first_key": args.first_key, "keys": args.keys, "victim_accuracy": setting.victim_accuracy,
               "scope_pp": SCOPE_PP, "null_models": [n for n, _ in nets], "seconds": time.perf_counter() - start,
               "machine": machine()}
        write_results(args.name, json.loads(json.dumps(doc, default=lambda o: o.item())))
        return summary

    for k in range(args.first_key, args.first_key + args.keys):
        key = generate_key(owner=f"Augmented References Owner {k}", num_classes=10, input_shape=SHAPE)
        base = build_tiebreak_rule(key=key, x=setting.x_owner, featurizer=featurizer, feature_space="served-penultimate")
        if not commits:  # the committed inputs depend on the served model and references only
            commits.update({s: commit_verification_inputs(base, served=served, x=setting.x_owner, references=refs,
                                                          count=1000, how=f"{s} references")
                            for s, refs in subsets.items()})
        rules = {s: dataclasses.replace(base, verification_inputs=c.verification_inputs,
                                        verification=c.verification, references=c.references)
                 for s, c in commits.items()}
        log = TieBreakLog(Path(tmp.name) / f"k{k}.sqlite", key=key)
        api = TieBreakAPI(key=key, backend=served, rule=base, beta=1.0, log=log, expose_scores=False)
        costs.append({"key": k, **accuracy_cost(api=api, x=setting.xt, y=setting.yt)})
        committed_null: dict[tuple[int, str], float] = {}
        for name in FAMILIES:
            t0 = time.perf_counter()
            net, epochs = THIEVES[name].train(api.for_client(name), x_att, 1 + k, setting.in_scope)
            suspect = LocalSuspect(net.eval(), input_shape=SHAPE, description=name)
            acc = float((suspect.query(setting.xt).labels == setting.yt).mean())
            tests, verdicts = {}, {}
            for s in SUBSETS:
                chosen = select_log_inputs(key=key, rule=rules[s], served=served, log=log, client=name)
                com = tiebreak_test(key=key, rule=rules[s], served=served, suspect=suspect)
                lt = tiebreak_log_test(key=key, rule=rules[s], served=served, suspect=suspect, chosen=chosen)
                tests[s] = {"committed": com.log10_p, "log": lt.log10_p, "z_log": lt.details["z"],
                            "z_committed": com.details["z"]}
                verdicts[s] = verdict(com.log10_p, lt.log10_p)
                for i, (null_name, null_net) in enumerate(nets):
                    innocent = LocalSuspect(null_net, input_shape=SHAPE, description=null_name)
                    if (i, s) not in committed_null:
                        committed_null[(i, s)] = tiebreak_test(key=key, rule=rules[s], served=served,
                                                               suspect=innocent).log10_p
                    res = tiebreak_log_test(key=key, rule=rules[s], served=served, suspect=innocent, chosen=chosen)
                    nulls.append({"key": k, "model": null_name, "subset": s, "log_of": name,
                                  "committed": committed_null[(i, s)], "log": res.log10_p,
                                  "verdict_log10_p": verdict(committed_null[(i, s)], res.log10_p)})
            row = {"key": k, "family": name, "epochs": epochs, "accuracy": acc,
                   "within_5pp": bool(acc >= setting.victim_accuracy - SCOPE_PP / 100), "tests": tests,
                   "verdicts": verdicts, "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(table([{"key": k, "family": name, "epochs": epochs, "accuracy": acc,
                          **{s: verdicts[s] for s in SUBSETS}}], ["key", "family", "epochs", "accuracy", *SUBSETS]),
                  flush=True)
        log.close()
        write(f"key {k}")
    summary = write("complete")
    tmp.cleanup()
    print(json.dumps(summary, indent=1, default=lambda o: o.item()))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
