"""Keyed region marks vs early-stopped extraction on Fashion-MNIST: surrogates caught, innocents not.

Protocol (same split, victim and independent models as ``benchmarks/extraction.py``, shared via the
cache): the owner builds a keyed region map (``benchmarks/research/api_regions.py``) from its own half and
serves the victim behind :class:`~wmark.schemes.api_regions.RegionMarkedAPI`. Each thief queries 10k
images of the attacker's half and trains a surrogate for only 6 epochs (hard-label CNN, soft-label CNN,
hard-label MLP). Verification asks each suspect the owner's own inputs (its training half, never queried
by a client) that fall in marked cells, and reports the exact p-value of the count statistic (answers equal
to their cell's target; convolution over cells) with the plurality-per-cell binomial beside it. Independent
models (CNN seeds, MLPs, a wide CNN, one trained on the attacker's true labels, one on the owner's data)
must stay above alpha = 1e-6. The accuracy cost for honest users is measured on the test set.

Usage: nice -n 10 python benchmarks/research/extraction_regions.py [--space victim|pixels] [--regions 600] [--marked 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import numpy as np
import torch
from api_regions import (
    RegionMarkedAPI,
    accuracy_cost,
    build_region_map,
    region_test,
)
from common import cached, extraction_independents, extraction_victim, table, write_results

from wmark.attacks.extract import extract
from wmark.data import load_dataset
from wmark.io import save_model
from wmark.models import load_model, model_metadata, penultimate_featurizer
from wmark.suspects import LocalSuspect

OWNER, ATTACKER = "fashion-mnist@owner", "fashion-mnist@attacker"
ALPHA = 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=600, help="number of cells K")
    parser.add_argument("--marked", type=int, default=12, help="number of marked cells M")
    parser.add_argument("--space", choices=["victim", "pixels"], default="victim",
                        help="cells in the victim's penultimate features or in average-pooled pixels")
    parser.add_argument("--pool", type=int, default=4, help="average-pooling factor of the pixel space")
    parser.add_argument("--min-inputs", type=int, default=5, help="held inputs a cell needs to be counted")
    parser.add_argument("--epochs", type=int, default=6, help="surrogate training epochs (early-stopped thief)")
    parser.add_argument("--name", default="extraction_regions", help="results file name")
    args = parser.parse_args()
    start = time.perf_counter()
    _key_path, key, victim_path = extraction_victim(OWNER)
    tag = key.fingerprint()
    owner, attacker = load_dataset(OWNER), load_dataset(ATTACKER)
    victim, _ = load_model("fmnist-cnn", victim_path)
    served = LocalSuspect(victim, input_shape=(1, 28, 28), description="victim", expose_scores=True)
    x_owner = owner.x_train.numpy()
    t0 = time.perf_counter()
    owner_labels = served.query(x_owner).labels
    rmap = build_region_map(key=key, x=x_owner, served_labels=owner_labels, num_regions=args.regions,
                            num_marked=args.marked, pool=args.pool,
                            featurizer=penultimate_featurizer(victim) if args.space == "victim" else None,
                            feature_space="victim-penultimate" if args.space == "victim" else None)
    build_s = time.perf_counter() - t0
    xt, yt = attacker.x_test.numpy(), attacker.y_test.numpy()
    plain = served.query(xt).labels
    cost = accuracy_cost(regions=rmap, x=xt, y=yt, served_labels=plain)
    cost["build_seconds"] = build_s
    marked_api = RegionMarkedAPI(key=key, backend=served, regions=rmap)
    t0 = time.perf_counter()
    marked_api.query(xt)
    cost["serve_seconds_10k_marked"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    served.query(xt)
    cost["serve_seconds_10k_plain"] = time.perf_counter() - t0
    print(json.dumps(cost, indent=1), flush=True)

    config = {"key": tag, "space": args.space, "regions": args.regions, "marked": args.marked, "pool": args.pool, "epochs": args.epochs}
    thieves = [("hard", "fmnist-cnn", "hard"), ("soft", "fmnist-cnn", "soft"), ("mlp-hard", "fmnist-mlp", "hard")]
    suspects = []
    for name, arch, labels in thieves:
        def make(p: Path, arch: str = arch, labels: str = labels) -> None:
            result = extract(marked_api, x=attacker.x_train, arch=arch, labels=labels,  # type: ignore[arg-type]
                             queries=10_000, epochs=args.epochs, seed=1)
            save_model(result.model, p, metadata=model_metadata(arch=arch, num_classes=10, input_shape=(1, 28, 28)))

        path = cached({"name": f"regions-surrogate-{name}", "arch": arch, "labels": labels, **config}, make)
        suspects.append((f"surrogate {name} ({arch}, {labels}, {args.epochs} ep)", arch, path, "surrogate"))
    for name, arch, path in extraction_independents():
        suspects.append((f"independent {name}", arch, path, "independent"))

    rows = []
    for model, arch, path, role in suspects:
        net, _ = load_model(arch, path)
        suspect = LocalSuspect(net, input_shape=(1, 28, 28), description=model, expose_scores=False)
        res = region_test(key=key, regions=rmap, suspect=suspect, inputs=x_owner, min_inputs=args.min_inputs)
        with torch.no_grad():
            pred = net(torch.from_numpy(xt)).argmax(1).numpy()
        expect = "extracted" if role == "surrogate" else "none"
        found = "extracted" if res.log10_p <= np.log10(ALPHA) else "none"
        rows.append({"role": role, "model": model, "accuracy": float((pred == yt).mean()),
                     "agreement": float((pred == plain).mean()), "queries": res.queries,
                     "cells": res.details["cells_counted"], "cell_matches": res.details["cell_matches"],
                     "input_matches": res.details["input_matches"],
                     "input_match_rate": res.details["input_matches"] / max(res.queries, 1),
                     "log10_p": res.log10_p, "plurality_log10_p": res.details["plurality_log10_p"], "verdict": found, "expected": expect, "ok": found == expect})
        print(table(rows[-1:], list(rows[-1])), flush=True)

    indep = [r for r in rows if r["role"] == "independent"]
    summary = {"alpha": ALPHA, **{k: v for k, v in config.items() if k != "key"}, "min_inputs": args.min_inputs,
               "verification_inputs": "owner's training half (30k, never queried by a client)", "cost": cost,
               "statistic": "count (exact convolution over cells); plurality (binomial over cells) beside it",
               "independent_min_log10_p": min(r["log10_p"] for r in indep),
               "independent_min_plurality_log10_p": min(r["plurality_log10_p"] for r in indep),
               "surrogate_max_log10_p": max(r["log10_p"] for r in rows if r["role"] == "surrogate"),
               "all_ok": all(r["ok"] for r in rows), "seconds": time.perf_counter() - start}
    columns = ["model", "accuracy", "agreement", "queries", "cells", "cell_matches", "input_matches", "log10_p",
               "plurality_log10_p", "verdict", "ok"]
    print("\n" + table(rows, columns))
    print(json.dumps(summary, indent=1))
    write_results(args.name, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
