"""Keyed tie-breaking vs extraction on Fashion-MNIST, over several keys: surrogates caught, innocents not.

Protocol (same split, victim and independent models as ``benchmarks/extraction.py``, shared via the
cache): the owner distils reference surrogates from its *unmarked* served model once (key-independent,
:func:`~wmark.schemes.tiebreak.train_reference_surrogates`); for each of ``--keys`` fresh keys it builds
a tie-break rule (:mod:`wmark.schemes.tiebreak`) from its own half, commits the ``--queries``
verification inputs the references leave most open, and serves the victim behind
:class:`~wmark.schemes.tiebreak.TieBreakAPI`. Each thief queries 10k images of the attacker's half and
trains a surrogate: hard-label CNN, soft-label CNN, hard-label MLP, each twice — for ``--epochs`` epochs
(early-stopped: 6) and *minimal in scope*: stopped after the first epoch whose accuracy is within 5 pp of
the victim's (at most 40 epochs; the weakest thief the issue's bar admits); with ``--converged`` also
20-epoch thieves under the first key. Every suspect answers the committed inputs with labels only (exact
Gaussian p-value) and, side by side, the served model's own nearest ties among the same owner inputs (the
selection without references) and the committed inputs with its probabilities (a leaked file, an API that
returns them: the test then reads the clipped lean ``log(p_lo / p_hi)``). Independent models (CNN seeds, MLPs, a wide CNN, one trained on the attacker's true
labels, one on the owner's data), the unmarked victim itself and a fine-tuned copy of it must stay above
alpha = 1e-6 under every key (the mark lives in the API's answers, so a copied checkpoint carries the
trigger set, not this mark).

The API also logs each thief's near-tie queries (:class:`~wmark.schemes.tiebreak.TieBreakLog`, one
client per thief), and every thief is tested on its own logged inputs
(:func:`~wmark.schemes.tiebreak.tiebreak_log_test`) with 300, 500 and 1000 queries, side by side in
rounds (the library's default: the later rounds chosen from the suspect's own earlier answers) and in one
round (the first inputs of the references' ranking), and in the previous release's schedule
(``PREVIOUS_SCHEDULE``: four rounds from a 40 % start, following four of the first 16 references, ranked by
those 16; the library's default is 21 rounds from a 5 % start with 32 references). Every independent model
is tested on each key's log (1000 queries, all three ways; the thieves under a key ask the same queries):
the null of that test assumes only that the client's queries did not depend on the answers, which holds
for these fixed query sets.

Side by side on the same keys, logs and suspects, the sequential log test
(:func:`~wmark.schemes.tiebreak.sequential.tiebreak_log_sequential`): it asks the client's logged inputs in
rounds of 50 until its e-process reaches 1 / (0.8 alpha) (the log test's share of alpha in the verdict) or
the log runs out, and reports the queries it used. Blended suspects (``surrogate-blend``), made without
training, stand in for thieves that inherited less of the mark: each answers like an in-scope thief on a
key-free half of the inputs (a hash of the input) and like an independent CNN on the other half.

The summary's ``verify`` section counts what ``wmark verify`` decides from these p-values: the trigger set,
the committed inputs and the log test combined with Holm, with equal weights and with the library's weights
(the log test 8, the others 1: :func:`wmark.verify.decide`). The trigger set is not run here (these suspects
never saw it) and enters at p = 1, the least favourable value for detection. ``--rescore FILE`` recomputes
that section of a saved run without rerunning it.

Usage: nice -n 10 python benchmarks/extraction_tiebreak.py [--quick] [--keys 10] [--beta 1.0] [--components N] [--skip N] [--converged]
       python benchmarks/extraction_tiebreak.py --rescore benchmarks/results/extraction_tiebreak.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hashlib

import numpy as np
import torch
from common import (
    SCOPE_CAP,
    SCOPE_PP,
    TIEBREAK_REFERENCE_ARCHS,
    TIEBREAK_THIEVES,
    cached_references,
    extraction_copy,
    extraction_independents,
    table,
    tiebreak_setting,
    write_results,
)

from wmark.attacks.extract import extract
from wmark.evidence import alpha_share
from wmark.keys import generate_key
from wmark.models import load_model, penultimate_featurizer
from wmark.schemes.tiebreak import (
    LOG_TEST_WEIGHT,
    LogInputs,
    TieBreakAPI,
    TieBreakLog,
    accuracy_cost,
    build_tiebreak_rule,
    commit_verification_inputs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
)
from wmark.schemes.tiebreak.sequential import tiebreak_log_sequential
from wmark.stats import holm
from wmark.suspects import Answers, LocalSuspect

ALPHA = 1e-6
LOG_BUDGETS = (300, 500)
PREVIOUS_SCHEDULE = {"rounds": 4, "first_share": 0.4}
PREVIOUS_REFERENCES = 16
LOG_SHARE = alpha_share(LOG_TEST_WEIGHT, [1.0, 1.0, LOG_TEST_WEIGHT])
BLEND_SHARE = 0.5


class Blend:
    """A suspect that answers like ``thief`` on a key-free share of the inputs (by a hash of each input) and like
    ``other`` elsewhere: a thief that inherited only part of the mark, made without training."""

    def __init__(self, thief: LocalSuspect, other: LocalSuspect, share: float, description: str) -> None:
        self.thief, self.other, self.share, self.description = thief, other, share, description
        self.num_classes, self.input_shape = thief.num_classes, thief.input_shape

    def query(self, x: np.ndarray) -> Answers:
        pick = np.array([int.from_bytes(hashlib.sha256(np.ascontiguousarray(row).tobytes()).digest()[:8], "big")
                         / 2.0 ** 64 < self.share for row in np.asarray(x, dtype=np.float32)])
        return Answers(labels=np.where(pick, self.thief.query(x).labels, self.other.query(x).labels))


def previous_inputs(chosen: LogInputs) -> LogInputs:
    """The same client's inputs as the previous release ranked them: by its 16 references only."""
    per = chosen.reference_leans[:PREVIOUS_REFERENCES]
    leans = per.mean(axis=0)
    order = np.argsort(np.abs(leans), kind="stable")
    return dataclasses.replace(chosen, x=chosen.x[order], scores=chosen.scores[order], leans=leans[order],
                               reference_leans=per[:, order])


def accuracy(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, plain: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        pred = net.eval()(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean()), float((pred == plain).mean())


def verify_counts(rows: list[dict[str, Any]], innocent_log_checks: list[dict[str, Any]]) -> dict[str, Any]:
    """How many suspects per role ``wmark verify`` calls ``extracted`` over trigger set (p = 1), committed
    inputs and log test, with Holm's equal weights and with the library's (1, 1, ``LOG_TEST_WEIGHT``)."""
    log_p = {(c["key"], c["model"]): c["log10_p"] for c in innocent_log_checks}
    out: dict[str, Any] = {"alpha": ALPHA, "weights": {"trigger-set": 1.0, "api-tiebreak": 1.0,
                                                       "api-tiebreak-log": LOG_TEST_WEIGHT}}
    for role in ("surrogate", "surrogate-in-scope", "surrogate-converged", "independent"):
        sel = [r for r in rows if r["role"] == role]
        pairs = [(r["log10_p"], r["log10_p_log"] if "log10_p_log" in r else log_p.get((r["key"], r["model"])))
                 for r in sel]
        pairs = [(c, lg) for c, lg in pairs if lg is not None]
        if not pairs:
            continue
        counts = {}
        for name, weights in (("holm", [1.0, 1.0, 1.0]), ("weighted holm", [1.0, 1.0, LOG_TEST_WEIGHT])):
            smallest = [min(holm([0.0, c, lg], weights)) for c, lg in pairs]
            counts[name] = int(sum(v <= np.log10(ALPHA) for v in smallest))
        out[role] = {"count": len(pairs), "extracted": counts}
    return out


def rescore(path: Path) -> None:
    """Recompute the ``verify`` section of a saved run from its per-suspect p-values."""
    doc = json.loads(path.read_text())
    doc["summary"]["verify"] = verify_counts(doc["rows"], doc["innocent_log_checks"])
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc["summary"]["verify"], indent=1))


def sequential_fields(res: Any) -> dict[str, Any]:
    """The sequential log test's result as row fields."""
    return {"log10_p_seq": res.log10_p, "seq_queries": res.queries, "seq_rounds": res.details["rounds"],
            "seq_stopped": res.details["stopped"], "seq_log_inputs": res.details["log_inputs"],
            "seq_z": res.details["z"], "seq_weight_total": res.details["weight_total"]}


def verify_weighted(sel: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of ``sel`` the library's verdict (weighted Holm over trigger set at p = 1, committed inputs and log
    test, weights 1, 1, ``LOG_TEST_WEIGHT``) calls extracted, with the fixed and with the sequential log test."""
    sel = [r for r in sel if "log10_p" in r]
    if not sel:
        return {}
    weights = [1.0, 1.0, LOG_TEST_WEIGHT]
    return {f"verify_extracted_{name}": int(sum(min(holm([0.0, r["log10_p"], r[field]], weights)) <= np.log10(ALPHA)
                                                for r in sel))
            for name, field in (("fixed", "log10_p_log"), ("sequential", "log10_p_seq"))}


def sequential_summary(rows: list[dict[str, Any]], innocent: list[dict[str, Any]]) -> dict[str, Any]:
    """Per role: detections at alpha = 1e-6 of the fixed (1000 queries) and sequential log tests on the same
    suspects, the sequential test's queries used (median, worst; all, and the detected ones), and the
    innocents' smallest log10 p."""
    out: dict[str, Any] = {"alpha": ALPHA, "share": LOG_SHARE,
                           "stops_at_log10_p": float(np.log10(ALPHA * LOG_SHARE))}
    for role in ("surrogate", "surrogate-in-scope", "surrogate-converged", "surrogate-blend"):
        sel = [r for r in rows if r["role"] == role and "log10_p_seq" in r]
        if not sel:
            continue
        used = [r["seq_queries"] for r in sel]
        caught = [r["seq_queries"] for r in sel if r["log10_p_seq"] <= np.log10(ALPHA)]
        out[role] = {"count": len(sel),
                     "detected_fixed_1000": int(sum(r["log10_p_log"] <= np.log10(ALPHA) for r in sel)),
                     "detected_fixed_1000_at_share": int(sum(r["log10_p_log"] <= np.log10(ALPHA * LOG_SHARE)
                                                             for r in sel)),
                     "detected_sequential": int(sum(r["log10_p_seq"] <= np.log10(ALPHA) for r in sel)),
                     "detected_sequential_at_share": int(sum(r["log10_p_seq"] <= np.log10(ALPHA * LOG_SHARE)
                                                             for r in sel)),
                     **verify_weighted(sel),
                     "queries_median": float(np.median(used)), "queries_worst": int(max(used)),
                     "queries_median_detected": float(np.median(caught)) if caught else None,
                     "queries_worst_detected": int(max(caught)) if caught else None,
                     "log_inputs_median": float(np.median([r["seq_log_inputs"] for r in sel])),
                     "log_inputs_min": int(min(r["seq_log_inputs"] for r in sel)),
                     "median_log10_p_fixed": float(np.median([r["log10_p_log"] for r in sel])),
                     "max_log10_p_fixed": float(max(r["log10_p_log"] for r in sel)),
                     "median_log10_p_sequential": float(np.median([r["log10_p_seq"] for r in sel])),
                     "max_log10_p_sequential": float(max(r["log10_p_seq"] for r in sel))}
    seq = [c["log10_p_seq"] for c in innocent if "log10_p_seq" in c]
    if seq:
        out["independent"] = {"checks": len(seq), "false_accusations": int(sum(v <= np.log10(ALPHA) for v in seq)),
                              "min_log10_p_sequential": float(min(seq)),
                              "min_log10_p_fixed": float(min(c["log10_p"] for c in innocent)),
                              "queries_median": float(np.median([c["seq_queries"] for c in innocent])),
                              "queries_worst": int(max(c["seq_queries"] for c in innocent))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=None, help="number of fresh keys (default 10, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="two keys, in-scope thieves only, and the log tests only "
                        "at --queries (no 300 and 500 budgets)")
    parser.add_argument("--beta", type=float, default=1.0, help="scale of the keyed log-probability shift")
    parser.add_argument("--components", type=int, default=None, help="principal directions of the feature map "
                        "(default: the library's)")
    parser.add_argument("--skip", type=int, default=0, help="leading principal directions left out")
    parser.add_argument("--queries", type=int, default=1000, help="verification queries per suspect")
    parser.add_argument("--epochs", type=int, default=6, help="surrogate epochs (early-stopped thief)")
    parser.add_argument("--converged", action="store_true", help="also 20-epoch thieves under the first key")
    parser.add_argument("--reference-repeats", type=int, default=None,
                        help="reference surrogates per architecture and recipe (default: the library's)")
    parser.add_argument("--name", default="extraction_tiebreak", help="results file name")
    parser.add_argument("--rescore", type=Path, default=None, help="recompute the verify counts of a saved run")
    args = parser.parse_args()
    if args.rescore is not None:
        rescore(args.rescore)
        return
    if args.keys is None:
        args.keys = 2 if args.quick else 10
    budgets = () if args.quick else LOG_BUDGETS
    start = time.perf_counter()
    setting = tiebreak_setting()
    owner_key, victim_path, victim, served = setting.owner_key, setting.victim_path, setting.victim, setting.served
    featurizer = penultimate_featurizer(victim)
    x_owner, attacker, xt, yt = setting.x_owner, setting.attacker, setting.xt, setting.yt
    plain = served.query(xt).labels
    victim_accuracy, in_scope = setting.victim_accuracy, setting.in_scope
    t0 = time.perf_counter()
    repeats = {} if args.reference_repeats is None else {"repeats": args.reference_repeats}
    references = cached_references(setting, repeats)
    reference_seconds = time.perf_counter() - t0
    print(f"{len(references)} reference surrogates in {reference_seconds:.0f} s", flush=True)

    fixed: list[tuple[str, str, Path, str]] = [("unmarked victim", "fmnist-cnn", victim_path, "independent")]
    fixed.append(("fine-tuned copy of the victim", "fmnist-cnn", extraction_copy(owner_key, victim_path),
                  "independent"))
    for name, arch, path in extraction_independents():
        fixed.append((f"independent {name}", arch, path, "independent"))

    rows: list[dict[str, Any]] = []
    innocent_log_checks: list[dict[str, Any]] = []
    blend_rows: list[dict[str, Any]] = []
    costs = []
    logs_dir = tempfile.TemporaryDirectory(prefix="wmark-tiebreak-logs-")

    def report(done: int) -> None:
        """Summarise the keys done so far and write the results (after every key: a long run keeps its part)."""
        def stats(role: str, field: str = "log10_p") -> dict[str, Any]:
            sel = [r for r in rows if r["role"] == role]
            if not sel:
                return {}
            lp = [r[field] for r in sel]
            return {"count": len(sel), "detected": int(sum(v <= np.log10(ALPHA) for v in lp)),
                    "median_log10_p": float(np.median(lp)), "max_log10_p": float(max(lp)), "min_log10_p": float(min(lp))}

        per_thief = {}
        for role in ("surrogate", "surrogate-in-scope"):
            for name, _, _ in TIEBREAK_THIEVES:
                sel = [r for r in rows if r["role"] == role and r["model"].startswith(f"surrogate {name} (")]
                per_thief[f"{role} {name}"] = {
                    "log10_p": [round(r["log10_p"], 2) for r in sel],
                    "log10_p_served_ties": [round(r["log10_p_served_ties"], 2) for r in sel],
                    "accuracy": [round(r["accuracy"], 4) for r in sel],
                    "epochs": [int(r["model"].rsplit(", ", 1)[1].split()[0]) for r in sel],
                    "detected": int(sum(r["verdict"] == "extracted" for r in sel)),
                    "detected_served_ties": int(sum(r["log10_p_served_ties"] <= np.log10(ALPHA) for r in sel)),
                    "log10_p_scores": [round(r["log10_p_scores"], 2) for r in sel],
                    "detected_scores": int(sum(r["log10_p_scores"] <= np.log10(ALPHA) for r in sel)),
                    "log10_p_log": [round(r["log10_p_log"], 2) for r in sel],
                    **{f"detected_log_{n}": int(sum(r[f"log10_p_log_{n}"] <= np.log10(ALPHA) for r in sel))
                       for n in budgets},
                    "detected_log": int(sum(r["log10_p_log"] <= np.log10(ALPHA) for r in sel)),
                    "log10_p_log_previous": [round(r["log10_p_log_previous"], 2) for r in sel],
                    "detected_log_previous": int(sum(r["log10_p_log_previous"] <= np.log10(ALPHA) for r in sel)),
                    **{f"detected_log_previous_{n}": int(sum(r[f"log10_p_log_previous_{n}"] <= np.log10(ALPHA)
                                                             for r in sel)) for n in budgets},
                    "log10_p_log_static": [round(r["log10_p_log_static"], 2) for r in sel],
                    "detected_log_static": int(sum(r["log10_p_log_static"] <= np.log10(ALPHA) for r in sel)),
                    **{f"detected_log_static_{n}": int(sum(r[f"log10_p_log_static_{n}"] <= np.log10(ALPHA) for r in sel))
                       for n in budgets},
                    "detected_log_holm3": int(sum(r["log10_p_log"] <= np.log10(ALPHA / 3) for r in sel))}
        innocent_log = [c[f] for c in innocent_log_checks for f in ("log10_p", "log10_p_static", "log10_p_previous")]

        def paired(role: str, n: int | None, other: str = "static") -> dict[str, Any]:
            # the library's rounds minus another schedule, the same thieves and logs: negative = the library's
            # rounds give stronger evidence
            tail = "" if n is None else f"_{n}"
            d = [r[f"log10_p_log{tail}"] - r[f"log10_p_log_{other}{tail}"] for r in rows if r["role"] == role]
            if not d:
                return {}
            return {"count": len(d), "mean": float(np.mean(d)), "standard_error": float(np.std(d, ddof=1) / np.sqrt(len(d)))
                    if len(d) > 1 else None, "better": int(sum(v < 0 for v in d))}
        roles = ("surrogate", "surrogate-in-scope", "surrogate-converged", "independent")
        summary = {"alpha": ALPHA, "keys": done, "beta": args.beta, "components": rule.components,
                   "skipped_leading": rule.skipped,
                   "queries": args.queries, "epochs": args.epochs, "victim_accuracy": victim_accuracy,
                   "in_scope": f"first epoch with accuracy >= victim - {SCOPE_PP} pp (cap {SCOPE_CAP})",
                   "verification_inputs": "committed: the owner inputs the reference surrogates leave most open "
                                          f"({len(references)} references: {', '.join(TIEBREAK_REFERENCE_ARCHS)})",
                   "reference_seconds": reference_seconds,
                   "mean_accuracy_cost_pp": float(np.mean([c["accuracy_cost_pp"] for c in costs])),
                   "mean_changed_fraction": float(np.mean([c["changed_fraction"] for c in costs])),
                   "mean_build_seconds": float(np.mean([c["build_seconds"] for c in costs])),
                   **{role: stats(role) for role in roles},
                   "served_ties": {role: stats(role, "log10_p_served_ties") for role in roles},
                   "scores": {role: stats(role, "log10_p_scores") for role in roles},
                   "client_log": {**{role: stats(role, "log10_p_log") for role in roles[:3]},
                                  **{f"{role} at {n}": stats(role, f"log10_p_log_{n}") for role in roles[:3]
                                     for n in budgets},
                                  "one round": {**{role: stats(role, "log10_p_log_static") for role in roles[:3]},
                                                **{f"{role} at {n}": stats(role, f"log10_p_log_static_{n}")
                                                   for role in roles[:3] for n in budgets}},
                                  "rounds minus one round": {f"{role} at {n or args.queries}": paired(role, n)
                                                             for role in roles[:2] for n in (*budgets, None)},
                                  "previous schedule": {
                                      **{role: stats(role, "log10_p_log_previous") for role in roles[:3]},
                                      **{f"{role} at {n}": stats(role, f"log10_p_log_previous_{n}") for role in roles[:3]
                                         for n in budgets},
                                      "schedule": {**PREVIOUS_SCHEDULE, "references": PREVIOUS_REFERENCES}},
                                  "rounds minus previous schedule": {
                                      f"{role} at {n or args.queries}": paired(role, n, "previous")
                                      for role in roles[:2] for n in (*budgets, None)},
                                  "holm3_threshold": f"log10 p <= {np.log10(ALPHA / 3):.2f} (alpha / 3: trigger set, "
                                                     "committed and log tests together)",
                                  "innocent_checks": len(innocent_log),
                                  "innocent_false_accusations": int(sum(v <= np.log10(ALPHA) for v in innocent_log)),
                                  "innocent_min_log10_p": float(min(innocent_log)) if innocent_log else None},
                   "per_thief": per_thief,
                   "verify": verify_counts(rows, innocent_log_checks),
                   "sequential_log": sequential_summary(rows + blend_rows, innocent_log_checks),
                   "false_accusations": int(sum(r["role"] == "independent" and not r["ok"] for r in rows)),
                   "false_accusations_served_ties": int(sum(r["role"] == "independent"
                                                            and r["log10_p_served_ties"] <= np.log10(ALPHA) for r in rows)),
                   "false_accusations_scores": int(sum(r["role"] == "independent"
                                                       and r["log10_p_scores"] <= np.log10(ALPHA) for r in rows)),
                   "seconds": time.perf_counter() - start}
        columns = ["key", "model", "accuracy", "agreement", "follow_rate", "z", "log10_p", "log10_p_served_ties",
                   "log10_p_scores", "log10_p_log_300", "log10_p_log_500", "log10_p_log", "log10_p_log_previous",
                   "log10_p_log_static", "verdict", "ok"]
        print("\n" + table([r for r in rows if r["role"] != "independent"], columns))
        print(json.dumps(summary, indent=1))
        write_results(args.name, {"summary": summary, "costs": costs, "rows": rows, "blend_rows": blend_rows,
                                  "innocent_log_checks": innocent_log_checks})

    for k in range(args.keys):
        key = generate_key(owner=f"Benchmark Owner {k}", num_classes=10, input_shape=(1, 28, 28))
        t0 = time.perf_counter()
        rule = build_tiebreak_rule(key=key, x=x_owner, featurizer=featurizer, feature_space="served-penultimate",
                                   components=args.components, skip=args.skip)
        rule = commit_verification_inputs(rule, served=served, x=x_owner, references=references, count=args.queries,
                                          how="benchmark")
        build_s = time.perf_counter() - t0
        log = TieBreakLog(Path(logs_dir.name) / f"key{k}.sqlite", key=key)
        marked_api = TieBreakAPI(key=key, backend=served, rule=rule, beta=args.beta, log=log)
        t0 = time.perf_counter()
        cost = accuracy_cost(api=marked_api, x=xt, y=yt)
        cost.update(key=k, build_seconds=build_s, serve_seconds_10k_marked_and_plain=time.perf_counter() - t0)
        costs.append(cost)
        print(json.dumps(cost), flush=True)
        thieves = [] if args.quick else [(name, arch, labels, args.epochs, "surrogate")
                                         for name, arch, labels in TIEBREAK_THIEVES]
        thieves += [(name, arch, labels, SCOPE_CAP, "surrogate-in-scope") for name, arch, labels in TIEBREAK_THIEVES]
        if args.converged and k == 0:
            thieves += [(name, arch, labels, 20, "surrogate-converged") for name, arch, labels in TIEBREAK_THIEVES]
        suspects: list[tuple[str, str, torch.nn.Module, str, str | None]] = []
        for name, arch, labels, epochs, role in thieves:
            t0 = time.perf_counter()
            client = f"{role}/{name}"
            result = extract(marked_api.for_client(client), x=attacker.x_train, arch=arch,  # type: ignore[arg-type]
                             labels=labels, queries=10_000, epochs=epochs, seed=1 + k,
                             stop=in_scope if role == "surrogate-in-scope" else None)
            suspects.append((f"surrogate {name} ({arch}, {labels}, {result.epochs} ep)", arch, result.model, role,
                             client))
            print(f"  trained {name} {result.epochs} ep in {time.perf_counter() - t0:.0f} s", flush=True)
        for model, arch, path, role in fixed:
            suspects.append((model, arch, load_model(arch, path)[0], role, None))
        clients = [client for *_, client in suspects if client is not None]
        t0 = time.perf_counter()
        # ranked once per client (key-free), then asked of every suspect
        ranked = {c: select_log_inputs(key=key, rule=rule, served=served, log=log, client=c) for c in clients}
        costs[-1]["log_rank_seconds_per_client"] = (time.perf_counter() - t0) / len(clients)
        previous = {c: previous_inputs(ranked[c]) for c in clients}
        for model, arch, net, role, client in suspects:
            suspect = LocalSuspect(net, input_shape=(1, 28, 28), description=model, expose_scores=False)
            res = tiebreak_test(key=key, rule=rule, served=served, suspect=suspect, queries=args.queries)
            ties = tiebreak_test(key=key, rule=rule, served=served, suspect=suspect, inputs=x_owner,
                                 queries=args.queries)
            scored = tiebreak_test(key=key, rule=rule, served=served, queries=args.queries,
                                   suspect=LocalSuspect(net, input_shape=(1, 28, 28), expose_scores=True))
            acc, agree = accuracy(net, xt, yt, plain)
            expect = "none" if role == "independent" else "extracted"
            found = "extracted" if res.log10_p <= np.log10(ALPHA) else "none"
            rows.append({"key": k, "role": role, "model": model, "accuracy": acc, "agreement": agree,
                         "queries": res.queries, "in_pair": res.details["in_pair"],
                         "follow_rate": res.matches / max(res.details["in_pair"], 1), "z": res.details["z"],
                         "log10_p": res.log10_p, "verdict": found, "expected": expect, "ok": found == expect,
                         "log10_p_served_ties": ties.log10_p, "log10_p_scores": scored.log10_p})
            if client is not None:
                t0 = time.perf_counter()
                logged = {n: tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect,
                                               chosen=ranked[client], queries=n) for n in (*budgets, args.queries)}
                seconds = time.perf_counter() - t0
                static = {n: tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect,
                                               chosen=ranked[client], queries=n, rounds=1)
                          for n in (*budgets, args.queries)}
                before = {n: tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect,
                                               chosen=previous[client], queries=n, **PREVIOUS_SCHEDULE)
                          for n in (*budgets, args.queries)}
                t0 = time.perf_counter()
                seq = tiebreak_log_sequential(key=key, rule=rule, served=served, suspect=suspect,
                                              chosen=ranked[client], alpha=ALPHA, share=LOG_SHARE)
                rows[-1].update(sequential_fields(seq), seq_seconds=time.perf_counter() - t0)
                rows[-1].update({"log10_p_log_previous": before[args.queries].log10_p,
                                 **{f"log10_p_log_previous_{n}": before[n].log10_p for n in budgets}})
                rows[-1].update({"client": client, "log10_p_log": logged[args.queries].log10_p,
                                 "log_queries": logged[args.queries].queries, "log_seconds": seconds,
                                 **{f"log10_p_log_{n}": logged[n].log10_p for n in budgets},
                                 "log10_p_log_static": static[args.queries].log10_p,
                                 **{f"log10_p_log_static_{n}": static[n].log10_p for n in budgets}})
            else:
                # every thief under a key asks the same 10k queries (seed 1 + k), so their logs are identical:
                # one check per key and model, not one per thief
                res = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect, chosen=ranked[clients[0]],
                                        queries=args.queries)
                one = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect, chosen=ranked[clients[0]],
                                        queries=args.queries, rounds=1)
                before = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect,
                                           chosen=previous[clients[0]], queries=args.queries,
                                           **PREVIOUS_SCHEDULE)
                seq = tiebreak_log_sequential(key=key, rule=rule, served=served, suspect=suspect,
                                              chosen=ranked[clients[0]], alpha=ALPHA, share=LOG_SHARE)
                innocent_log_checks.append({"key": k, "model": model, "client": clients[0], "log10_p": res.log10_p,
                                            "log10_p_static": one.log10_p, "log10_p_previous": before.log10_p,
                                            "queries": res.queries, **sequential_fields(seq)})
            if role != "independent":
                print(table(rows[-1:], ["model", "accuracy", "agreement", "follow_rate", "log10_p",
                                        "log10_p_served_ties", "log10_p_scores", "log10_p_log_300",
                                        "log10_p_log", "log10_p_log_previous", "log10_p_seq", "seq_queries",
                                        "verdict"]), flush=True)
        other = next(LocalSuspect(net, input_shape=(1, 28, 28)) for model, arch, net, role, _ in suspects
                     if role == "independent" and model.startswith("independent cnn"))
        for model, arch, net, role, client in suspects:
            if role != "surrogate-in-scope" or client is None:
                continue
            blend = Blend(LocalSuspect(net, input_shape=(1, 28, 28)), other, BLEND_SHARE,
                          f"{model}, blended half and half with an independent CNN")
            fixed_log = tiebreak_log_test(key=key, rule=rule, served=served, suspect=blend, chosen=ranked[client],
                                          queries=args.queries)
            seq = tiebreak_log_sequential(key=key, rule=rule, served=served, suspect=blend, chosen=ranked[client],
                                          alpha=ALPHA, share=LOG_SHARE)
            blend_rows.append({"key": k, "role": "surrogate-blend", "model": blend.description, "client": client,
                               "log10_p_log": fixed_log.log10_p, "z_log": fixed_log.details["z"],
                               **sequential_fields(seq)})
            print(table(blend_rows[-1:], ["model", "log10_p_log", "z_log", "log10_p_seq", "seq_queries",
                                          "seq_stopped"]), flush=True)
        log.close()
        try:
            report(k + 1)
        except (KeyError, IndexError, TypeError, ValueError):  # keep the measured rows of a long run even if summarising them fails
            traceback.print_exc()
            write_results(f"{args.name}_raw", {"costs": costs, "rows": rows, "blend_rows": blend_rows,
                                               "innocent_log_checks": innocent_log_checks})
    logs_dir.cleanup()



if __name__ == "__main__":
    main()
