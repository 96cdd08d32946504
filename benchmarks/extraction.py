"""Extraction through a marked API on Fashion-MNIST: surrogates caught as ``extracted``, innocents not.

Protocol: the training set is split once into the owner's and the attacker's halves. The owner trains a
CNN on its half and embeds the key's trigger set (so a copied model is ``copy``), then serves it behind
:class:`wmark.schemes.api_mark.MarkedAPI` (rate and candidate set below). Each thief queries 10k images
of the attacker's half through the API under its own client id (hard labels, soft labels, an MLP, all
trained to convergence, and an early-stopped surrogate) and trains a surrogate; the marked queries go to
one SQLite log. Verification = trigger-set test + API-mark test on the client's
first ``--api-queries`` logged inputs, Holm at alpha = 1e-6. Independent models (other seeds, two other
architectures, and one trained on the attacker's true labels) are tested against the thief's log and
must all come out ``none``; a fine-tuned copy of the victim must come out ``copy``. A boundary
fingerprint (IPGuard-style) is measured as a baseline, calibrated on the first four independents only.

Usage: nice -n 10 python benchmarks/extraction.py [--api-queries 300] [--rate 0.03] [--candidates all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "research")]

import numpy as np
import torch
from boundary_fingerprint import (
    craft_boundary_fingerprint,
    fingerprint_test,
    match_count,
)
from common import (
    CACHE,
    cached,
    extraction_copy,
    extraction_independents,
    extraction_victim,
    table,
    write_results,
)

from wmark import api
from wmark.data import load_dataset
from wmark.models import load_model
from wmark.schemes.api_mark import MarkedAPI, MarkLog, api_mark_test, parse_candidates
from wmark.suspects import LocalSuspect
from wmark.verify import decide, trigger_set_test

OWNER, ATTACKER = "fashion-mnist@owner", "fashion-mnist@attacker"
ALPHA = 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-queries", type=int, default=300, help="logged queries asked per suspect")
    parser.add_argument("--rate", type=float, default=0.03, help="API marking rate")
    parser.add_argument("--candidates", default="all", help="candidate-set size k or 'all'")
    parser.add_argument("--epochs", type=int, default=20, help="surrogate training epochs (converged thief)")
    args = parser.parse_args()
    start = time.perf_counter()
    key_path, key, victim_path = extraction_victim(OWNER)
    tag = key.fingerprint()
    attacker = load_dataset(ATTACKER)
    xt, yt = attacker.x_test, attacker.y_test
    victim, _ = load_model("fmnist-cnn", victim_path)
    served = LocalSuspect(victim, input_shape=(1, 28, 28), description="victim")
    k = parse_candidates(args.candidates, key.num_classes)

    # Cost for honest users: accuracy of the API's answers vs the model's own on the test set.
    t0 = time.perf_counter()
    plain_answers = served.query(xt.numpy()).labels
    plain_s = time.perf_counter() - t0
    probe = MarkedAPI(key=key, backend=served, rate=args.rate, candidates=args.candidates)
    t0 = time.perf_counter()
    marked_answers = probe.query(xt.numpy()).labels
    marked_s = time.perf_counter() - t0
    y = yt.numpy()
    cost = {"victim_accuracy": float((plain_answers == y).mean()), "api_accuracy": float((marked_answers == y).mean()),
            "marked_fraction": float((plain_answers != marked_answers).mean()),
            "serve_seconds_10k_plain": plain_s, "serve_seconds_10k_marked": marked_s}
    cost["accuracy_cost_pp"] = 100 * (cost["victim_accuracy"] - cost["api_accuracy"])
    print(json.dumps(cost, indent=1), flush=True)

    log_path = CACHE / f"extraction-{tag}-{args.rate}-{k}.sqlite"
    thieves = [
        ("hard", "fmnist-cnn", "hard", args.epochs),
        ("soft", "fmnist-cnn", "soft", args.epochs),
        ("mlp-hard", "fmnist-mlp", "hard", args.epochs),
        ("hard-early-stop", "fmnist-cnn", "hard", 6),
    ]
    # The log is written while the thieves query; rebuild it together with the surrogates.
    fresh = not log_path.exists()
    surrogates = {}
    for name, arch, labels, epochs in thieves:
        cfg = {"name": f"surrogate-{name}", "key": tag, "rate": args.rate, "k": k, "arch": arch, "labels": labels,
               "epochs": epochs, "log": str(log_path)}
        if fresh:
            for stale in CACHE.glob(f"surrogate-{name}-*.safetensors"):
                stale.unlink()
        info: dict = {}

        def make(p: Path, arch: str = arch, labels: str = labels, epochs: int = epochs, name: str = name,
                 info: dict = info) -> None:
            info.update(api.extract(victim_arch="fmnist-cnn", victim=victim_path, arch=arch, data=ATTACKER, out=p,
                                    labels=labels, queries=10_000, epochs=epochs, seed=1, key=key_path,
                                    mark="flip", log=log_path, client=f"thief-{name}", rate=args.rate,
                                    candidates=args.candidates))

        path = cached(cfg, make)
        surrogates[name] = (arch, path, labels, epochs)

    copy_path = extraction_copy(key, victim_path)

    rows = []
    with MarkLog(log_path, key=key, create=False) as log:
        clients = log.clients()

        def check(model: str, arch: str, path: Path, client: str, expect: str, role: str) -> None:
            net, _ = load_model(arch, path)
            suspect = LocalSuspect(net, input_shape=(1, 28, 28), description=model, expose_scores=False)
            trig = trigger_set_test(key=key, suspect=suspect, alpha=ALPHA, mode="fixed")
            ext = api_mark_test(key=key, suspect=suspect, log=log, client=client, max_queries=args.api_queries)
            verdict = decide(key=key, tests=[trig, ext], alpha=ALPHA, suspect=model)
            with torch.no_grad():
                pred = net(xt).argmax(1).numpy()
            rows.append({"role": role, "model": model, "accuracy": float((pred == y).mean()),
                         "agreement": float((pred == plain_answers).mean()), "client": client,
                         "trigger_log10_p": trig.log10_p, "api_queries": ext.queries,
                         "api_conditioned": ext.details["conditioned"], "api_matches": ext.matches,
                         "api_log10_p": ext.log10_p, "api_exact_log10_p": ext.details["exact_log10_p"],
                         "kind": verdict.kind, "expected": expect,
                         "ok": verdict.kind == expect})
            if role == "surrogate":  # evidence against the number of logged queries asked
                rows[-1]["api_log10_p_by_queries"] = {
                    n: api_mark_test(key=key, suspect=suspect, log=log, client=client, max_queries=n).log10_p
                    for n in (50, 100, 200, 300, 1000)}
            rows[-1]["_path"], rows[-1]["_arch"] = str(path), arch
            print(table(rows[-1:], [c for c in rows[-1] if not c.startswith("_")]), flush=True)

        for name, (arch, path, labels, epochs) in surrogates.items():
            expect = "extracted"
            check(f"surrogate {name} ({arch}, {labels}, {epochs} ep)", arch, path, f"thief-{name}", expect,
                  "surrogate")
        check("fine-tuned copy (2 ep, 10k attacker images)", "fmnist-cnn", copy_path, "thief-hard", "copy", "copy")
        for name, arch, path in extraction_independents():
            check(f"independent {name}", arch, path, "thief-hard", "none", "independent")

    fingerprint = boundary_fingerprint_baseline(key=key, victim=victim, rows=rows)
    for r in rows:
        del r["_path"], r["_arch"]
    indep = [r for r in rows if r["role"] == "independent"]
    summary = {
        "alpha": ALPHA, "rate": args.rate, "candidates": k, "api_queries": args.api_queries,
        "surrogate_epochs": args.epochs, "clients": clients, "cost": cost,
        "independent_min_log10_p": min(min(r["api_log10_p"], r["trigger_log10_p"]) for r in indep),
        "independent_min_api_log10_p": min(r["api_log10_p"] for r in indep),
        "independent_min_api_exact_log10_p": min(r["api_exact_log10_p"] for r in indep),
        "all_ok": all(r["ok"] for r in rows if "early" not in r["model"]),
        "fingerprint": fingerprint,
        "seconds": time.perf_counter() - start,
    }
    columns = ["model", "accuracy", "agreement", "api_queries", "api_conditioned", "api_matches", "api_log10_p",
               "trigger_log10_p", "kind", "expected", "ok"]
    print("\n" + table(rows, columns))
    print(table(fingerprint["rows"], ["model", "role", "matches", "log10_p", "rank_log10_p"]))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("clients", "fingerprint")}, indent=1))
    write_results("extraction", {"summary": summary, "rows": rows, "numpy": np.__version__})


def boundary_fingerprint_baseline(*, key: Any, victim: torch.nn.Module, rows: list[dict[str, Any]],
                                  n: int = 100, calibration: int = 4) -> dict[str, Any]:
    """IPGuard-style boundary fingerprint, calibrated on the first ``calibration`` independents (held out)."""
    owner = load_dataset(OWNER)
    t0 = time.perf_counter()
    fp = craft_boundary_fingerprint(model=victim, x=owner.x_train, key=key, n=n)
    craft_s = time.perf_counter() - t0
    indep = [r for r in rows if r["role"] == "independent"]
    calib, rest = indep[:calibration], [r for r in rows if r not in indep[:calibration]]
    ref = [match_count(load_model(r["_arch"], r["_path"])[0], fp) for r in calib]
    out = []
    for r in rest:
        test = fingerprint_test(suspect_matches=match_count(load_model(r["_arch"], r["_path"])[0], fp), n=n,
                                reference_matches=ref)
        out.append({"model": r["model"], "role": r["role"], **{k: test[k] for k in ("matches", "log10_p",
                                                                                   "rank_log10_p")}})
    return {"n": n, "craft_seconds": craft_s, "calibration_models": [r["model"] for r in calib],
            "reference_matches": ref, "reference_upper": test["reference_upper"], "assumption": test["assumption"],
            "rows": out}


if __name__ == "__main__":
    main()
