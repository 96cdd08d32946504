"""Eight or sixteen reference surrogates for the tie-break tests: the same keys and thieves, side by side.

The reference surrogates (distilled from the *unmarked* served model, key-independent) rank the inputs the
tie-break tests ask: the owner's committed inputs and a client's logged queries. This benchmark measures, paired
by key and thief, whether a second seed per recipe (``repeats=2``: sixteen references, the library's default)
ranks better than one (eight; the first eight of the sixteen are exactly those). For each of ``--keys`` fresh
keys the marked API (beta 1) logs the queries of three *minimal in-scope* thieves (CNN hard labels, CNN soft
labels, MLP hard labels; 10k attacker queries; stopped after the first epoch within 5 pp of the victim, the
weakest surrogate the issue's bar admits). Each thief is tested with labels on 300, 500 and 1000 of its own
logged queries (in one round: the ranking's first n, so that only the ranking differs) and on the 1000
committed inputs under both rankings; every independent model (and the
unmarked victim) is tested on each key's log (the three thieves ask the same queries) and on the committed
inputs under both rankings too.

Usage: nice -n 10 python benchmarks/tiebreak_references.py [--keys 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import (
    SCOPE_CAP,
    TIEBREAK_REFERENCE_ARCHS,
    TIEBREAK_THIEVES,
    extraction_independents,
    table,
    tiebreak_setting,
    write_results,
)

from wmark.attacks.extract import extract
from wmark.keys import generate_key
from wmark.models import load_model, penultimate_featurizer
from wmark.schemes.tiebreak import (
    TieBreakAPI,
    TieBreakLog,
    build_tiebreak_rule,
    commit_verification_inputs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
    train_reference_surrogates,
)
from wmark.suspects import LocalSuspect
from wmark.training import accuracy

ALPHA = 1e-6
BUDGETS = (300, 500, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10, help="number of fresh keys")
    args = parser.parse_args()
    start = time.perf_counter()
    setting = tiebreak_setting()
    victim, served, x_owner, attacker = setting.victim, setting.served, setting.x_owner, setting.attacker
    in_scope = setting.in_scope
    references = train_reference_surrogates(served=served, x=x_owner, archs=TIEBREAK_REFERENCE_ARCHS, repeats=2)
    rankings = {"8 references": references[:len(references) // 2], "16 references": references}
    innocents = [("unmarked victim", victim)] + [(f"independent {name}", load_model(arch, path)[0])
                                                 for name, arch, path in extraction_independents()]
    rows: list[dict[str, Any]] = []
    innocent_rows: list[dict[str, Any]] = []
    logs_dir = tempfile.TemporaryDirectory(prefix="wmark-tiebreak-refs-")
    for k in range(args.keys):
        key = generate_key(owner=f"Benchmark Owner {k}", num_classes=10, input_shape=(1, 28, 28))
        base = build_tiebreak_rule(key=key, x=x_owner, featurizer=penultimate_featurizer(victim),
                                   feature_space="served-penultimate")
        rules = {name: commit_verification_inputs(base, served=served, x=x_owner, references=refs, how=name)
                 for name, refs in rankings.items()}
        log = TieBreakLog(Path(logs_dir.name) / f"key{k}.sqlite", key=key)
        api = TieBreakAPI(key=key, backend=served, rule=base, log=log)
        for name, arch, labels in TIEBREAK_THIEVES:
            result = extract(api.for_client(name), x=attacker.x_train, arch=arch,  # type: ignore[arg-type]
                             labels=labels, queries=10_000, epochs=SCOPE_CAP, seed=1 + k, stop=in_scope)
            suspect = LocalSuspect(result.model, input_shape=(1, 28, 28), expose_scores=False)
            row: dict[str, Any] = {"key": k, "thief": name, "epochs": result.epochs,
                                   "accuracy": accuracy(result.model, attacker.x_test, attacker.y_test)}
            for ranking, rule in rules.items():
                chosen = select_log_inputs(key=key, rule=rule, served=served, log=log, client=name, count=max(BUDGETS))
                for n in BUDGETS:
                    row[f"{ranking}: log {n}"] = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect,
                                                                   chosen=chosen, queries=n, rounds=1).log10_p
                row[f"{ranking}: committed 1000"] = tiebreak_test(key=key, rule=rule, served=served,
                                                                  suspect=suspect).log10_p
                if name == TIEBREAK_THIEVES[0][0]:  # the thieves share their queries (seed 1 + k), hence one log per key
                    for model, net in innocents:
                        innocent = LocalSuspect(net, input_shape=(1, 28, 28), expose_scores=False)
                        innocent_rows.append({"key": k, "model": model, "ranking": ranking,
                                              "log10_p_log": tiebreak_log_test(key=key, rule=rule, served=served,
                                                                               suspect=innocent, chosen=chosen,
                                                                               rounds=1).log10_p})
            rows.append(row)
            print(table([row], list(row)), f"({time.perf_counter() - start:.0f} s)", flush=True)
        for ranking, rule in rules.items():
            for model, net in innocents:
                innocent = LocalSuspect(net, input_shape=(1, 28, 28), expose_scores=False)
                innocent_rows.append({"key": k, "model": model, "ranking": ranking,
                                      "log10_p_committed": tiebreak_test(key=key, rule=rule, served=served,
                                                                         suspect=innocent).log10_p})
        log.close()

    def summary(column: str) -> dict[str, Any]:
        v = np.array([r[column] for r in rows])
        return {"detected": int((v <= np.log10(ALPHA)).sum()), "count": len(v), "median": float(np.median(v)),
                "worst": float(v.max())}

    columns = [c for c in rows[0] if ":" in c]
    summaries = {c: summary(c) for c in columns}
    paired = {}
    for c in columns:
        if c.startswith("16"):
            d = np.array([r[c] - r[c.replace("16", "8", 1)] for r in rows])
            paired[c.split(": ")[1]] = {"mean_change": float(d.mean()), "standard_error": float(d.std(ddof=1) / np.sqrt(len(d))),
                                        "better": int((d < 0).sum()), "count": len(d)}
    innocent_p = [r.get("log10_p_log", r.get("log10_p_committed")) for r in innocent_rows]
    print(table([{"test": c, **s} for c, s in summaries.items()], ["test", "detected", "count", "median", "worst"]))
    print(table([{"test": c, **s} for c, s in paired.items()], ["test", "mean_change", "standard_error", "better",
                                                                 "count"]))
    print(f"innocent checks: {len(innocent_p)}, smallest log10 p {min(innocent_p):.2f}, "
          f"false accusations {sum(p <= np.log10(ALPHA) for p in innocent_p)}")
    write_results("tiebreak_references", {
        "summary": {"alpha": ALPHA, "keys": args.keys, "thieves": "minimal in scope (first epoch within 5 pp)",
                    "detected": summaries, "paired_16_minus_8": paired,
                    "innocent_checks": len(innocent_p), "innocent_min_log10_p": float(min(innocent_p)),
                    "innocent_false_accusations": int(sum(p <= np.log10(ALPHA) for p in innocent_p)),
                    "seconds": time.perf_counter() - start},
        "rows": rows, "innocents": innocent_rows})


if __name__ == "__main__":
    main()
