"""The tie-break mark on a served model trained with shift augmentation, against thieves that augment.

Why: the keyed shift is linear in the served model's penultimate features. The library's Fashion-MNIST victim
was trained without augmentation, and its features move when the image moves by a pixel, while a thief that
trains on shifted copies learns functions that do not. If that mismatch is why augmenting thieves inherit
little of the mark, an owner whose served model was itself trained with the thieves' augmentation would
close the gap without changing the mark.

The served model here: the library's ``fmnist-cnn`` trained on the owner's labelled images with the
``bn-cnn-sgd`` thief's augmentation (each batch rolled by up to 2 pixels), Adam, ``--victim-epochs`` epochs,
cached. Everything else as ``tiebreak_weighting.py``'s uniform reading: per fresh key one rule (principal 64
directions of this model's penultimate features), 32 reference surrogates distilled from it unmarked, the
label-only API at beta 1 (``--beta``) with a log, its honest cost on the attacker's 10k test images, and the
thieves of
``tiebreak_invariance.THIEVES`` (``cnn-adam-hard``, ``mlp-adam-hard``, ``bn-cnn-sgd``, ``cnn-affine``; others of
``extraction_families`` with ``--families``) verified
leave-family-out (conv thieves with the 16 MLP references, the MLP thief with the 16 CNN ones): the
committed-input and log tests combined by weighted Holm. A thief is in scope within 5 pp of this victim.
Null panel: ``tiebreak_invariance.null_models`` of this victim (its unmarked self, five extraction
independents, the two augmenting families distilled from it unmarked, a true-label BatchNorm CNN).

Usage: nice -n 10 python benchmarks/tiebreak_aug_victim.py [--keys 4] [--first-key 0] [--victim-epochs 6] [--families ...] [--beta 1]
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
from common import (
    SCOPE_PP,
    TieBreakSetting,
    cached,
    cached_references,
    machine,
    table,
    tiebreak_setting,
    write_results,
)
from extraction_families import FAMILIES, LFO_SUBSET, SHAPE, fit
from tiebreak_invariance import THIEVES, null_models, verdict

from wmark.attacks.extract import accuracy_reached
from wmark.data import load_dataset
from wmark.io import save_model
from wmark.keys import generate_key
from wmark.models import build_model, load_model, model_metadata, penultimate_featurizer
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

ALPHA = 1e-6


def rolled(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch rolled by one random offset of up to 2 pixels per axis (the ``bn-cnn-sgd`` thief's augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def augmented_setting(epochs: int) -> TieBreakSetting:
    """The library's tie-break setting with its served model replaced by one trained with shifted copies."""
    base = tiebreak_setting()
    owner = load_dataset("fashion-mnist@owner")

    def make(path: Path) -> None:
        torch.manual_seed(0)
        model = build_model("fmnist-cnn", num_classes=10, input_shape=SHAPE, seed=0)
        fit(model, owner.x_train.numpy(), owner.y_train.long(), optimizer=torch.optim.Adam(model.parameters(), 1e-3),
            loss_fn=torch.nn.CrossEntropyLoss(), seed=0, in_scope=lambda _m: False, epochs=epochs, augment=rolled)
        save_model(model, path, metadata=model_metadata(arch="fmnist-cnn", num_classes=10, input_shape=SHAPE))

    path = cached({"name": "tiebreak-aug-victim", "epochs": epochs, "augment": "roll2"}, make)
    victim, _ = load_model("fmnist-cnn", path)
    served = LocalSuspect(victim, input_shape=SHAPE, description="victim trained with shifts", expose_scores=True)
    accuracy = float((served.query(base.xt).labels == base.yt).mean())
    return dataclasses.replace(base, victim_path=path, victim=victim, served=served, victim_accuracy=accuracy,
                               in_scope=accuracy_reached(base.xt, base.yt, accuracy - SCOPE_PP / 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--first-key", type=int, default=0)
    parser.add_argument("--victim-epochs", type=int, default=6)
    parser.add_argument("--families", default=",".join(THIEVES),
                        help="Comma-separated thief families (those of tiebreak_invariance and extraction_families).")
    parser.add_argument("--beta", type=float, default=1.0, help="Scale of the keyed shift (default 1, the library's).")
    parser.add_argument("--name", default="tiebreak_aug_victim")
    args = parser.parse_args()
    families = [{**FAMILIES, **THIEVES}[f.strip()] for f in args.families.split(",")]
    start = time.perf_counter()
    setting = augmented_setting(args.victim_epochs)
    served = setting.served
    print(f"victim trained with shifts: {setting.victim_accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    featurizer = penultimate_featurizer(setting.victim)
    references = cached_references(setting, {})
    subsets = {"cnn": [r for r in references if r[0] == "fmnist-cnn"],
               "mlp": [r for r in references if r[0] == "fmnist-mlp"]}
    nets = null_models(setting)
    print(f"{len(references)} references, {len(nets)} null models ({time.perf_counter() - start:.0f} s)", flush=True)
    x_att = setting.attacker.x_train.numpy()
    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    commits: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="wmark-aug-victim-")
    lg = np.log10(ALPHA)

    def write(done: str) -> dict[str, Any]:
        in_scope = [r for r in rows if r["within_5pp"]]
        fams = list(dict.fromkeys(r["family"] for r in rows))
        summary = {"caught_lfo": {f: sum(r["family"] == f and r["verdict_lfo"] <= lg for r in in_scope) for f in fams},
                   "in_scope": {f: sum(r["family"] == f for r in in_scope) for f in fams},
                   "verdicts_lfo": {f: [round(r["verdict_lfo"], 2) for r in in_scope if r["family"] == f]
                                    for f in fams},
                   "cost_pp_mean": float(np.mean([c["accuracy_cost_pp"] for c in costs])) if costs else None,
                   "null_checks": len(nulls), "null_accused": sum(n["verdict_log10_p"] <= lg for n in nulls),
                   "null_min_verdict": min((n["verdict_log10_p"] for n in nulls), default=0.0)}
        doc = {"summary": summary, "rows": rows, "null_checks": nulls, "costs": costs, "progress": done,
               "victim": {"training": f"fmnist-cnn, owner's images rolled by up to 2 px, Adam, {args.victim_epochs} "
                                      "epochs", "accuracy": setting.victim_accuracy},
               "first_key": args.first_key, "keys": args.keys, "beta": args.beta, "scope_pp": SCOPE_PP,
               "null_models": [n for n, _ in nets], "seconds": time.perf_counter() - start, "machine": machine()}
        write_results(args.name, json.loads(json.dumps(doc, default=lambda o: o.item())))
        return summary

    for k in range(args.first_key, args.first_key + args.keys):
        key = generate_key(owner=f"Augmented victim owner {k}", num_classes=10, input_shape=SHAPE)
        base = build_tiebreak_rule(key=key, x=setting.x_owner, featurizer=featurizer, feature_space="served-penultimate")
        if not commits:  # the committed inputs depend on the served model and references only
            commits.update({s: commit_verification_inputs(base, served=served, x=setting.x_owner, references=refs,
                                                          count=1000, how=f"{s} references")
                            for s, refs in subsets.items()})
        rules = {s: dataclasses.replace(base, verification_inputs=c.verification_inputs, verification=c.verification,
                                        references=c.references) for s, c in commits.items()}
        log = TieBreakLog(Path(tmp.name) / f"k{k}.sqlite", key=key)
        api = TieBreakAPI(key=key, backend=served, rule=base, beta=args.beta, log=log, expose_scores=False)
        cost = accuracy_cost(api=api, x=setting.xt, y=setting.yt)
        costs.append({"key": k, **cost})
        print(f"key {k}: cost {cost['accuracy_cost_pp']:.2f} pp", flush=True)
        null_committed: dict[tuple[int, str], float] = {}
        for fam in families:
            t0 = time.perf_counter()
            net, epochs = fam.train(api.for_client(fam.name), x_att, 1 + k, setting.in_scope)
            suspect = LocalSuspect(net.eval(), input_shape=SHAPE, description=fam.name)
            acc = float((suspect.query(setting.xt).labels == setting.yt).mean())
            s = LFO_SUBSET[fam.group]
            if s not in rules:
                raise SystemExit(f"{fam.name}: leave-family-out subset {s!r} is not committed here.")
            chosen = select_log_inputs(key=key, rule=rules[s], served=served, log=log, client=fam.name)
            com = tiebreak_test(key=key, rule=rules[s], served=served, suspect=suspect)
            lt = tiebreak_log_test(key=key, rule=rules[s], served=served, suspect=suspect, chosen=chosen)
            row = {"key": k, "family": fam.name, "epochs": epochs, "accuracy": acc, "lfo_subset": s,
                   "within_5pp": bool(acc >= setting.victim_accuracy - SCOPE_PP / 100),
                   "committed": com.log10_p, "log": lt.log10_p, "z_log": lt.details["z"],
                   "verdict_lfo": verdict(com.log10_p, lt.log10_p), "seconds": time.perf_counter() - t0}
            rows.append(row)
            for i, (null_name, null_net) in enumerate(nets):
                innocent = LocalSuspect(null_net, input_shape=SHAPE, description=null_name)
                if (i, s) not in null_committed:
                    null_committed[(i, s)] = tiebreak_test(key=key, rule=rules[s], served=served,
                                                           suspect=innocent).log10_p
                res = tiebreak_log_test(key=key, rule=rules[s], served=served, suspect=innocent, chosen=chosen)
                nulls.append({"key": k, "model": null_name, "log_of": fam.name, "subset": s,
                              "committed": null_committed[(i, s)], "log": res.log10_p,
                              "verdict_log10_p": verdict(null_committed[(i, s)], res.log10_p)})
            print(table([row], ["key", "family", "epochs", "accuracy", "z_log", "verdict_lfo", "seconds"]), flush=True)
        log.close()
        write(f"key {k}")
    summary = write("complete")
    tmp.cleanup()
    print(json.dumps(summary, indent=1, default=lambda o: o.item()))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
