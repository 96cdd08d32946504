"""Honest clients' cost of the tie-break mark on the MiniLM text victim, by feature directions kept and shift scale.

Trains no thief: the cost of any (directions, beta) is the marked API's (:func:`accuracy_cost` of a
``TieBreakAPI``), read off the served model's memoised scores and features on the test texts. Also prints the shift's root-mean-square per class on the owner's texts (where the whitening was fitted)
and on the test texts: whitening the smaller principal directions from 2,019 texts underestimates their
variance, so on new texts the shift is larger than on the owner's, the more so the more directions are kept.

    python benchmarks/research/text_components_cost.py --keys-dir DIR [--components 64,128,256] [--betas ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table, write_results
from benchmarks.text_extraction import fortunes_minilm_victim, text_key
from wmark.schemes.tiebreak import TieBreakAPI, accuracy_cost, build_tiebreak_rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys-dir", type=Path, action="append", required=True,
                        help="Keys k0.key, k1.key, ... (as text_extraction.py --keys-dir); repeat for more.")
    parser.add_argument("--keys", type=int, default=3, help="Keys per directory.")
    parser.add_argument("--components", default="64,128,256")
    parser.add_argument("--betas", default="0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--name", default="research_text_components_cost")
    args = parser.parse_args()
    start = time.perf_counter()
    v = fortunes_minilm_victim()
    text, modality, xo, xe, ye, victim = v["text"], v["modality"], v["xo"], v["xe"], v["ye"], v["victim"]
    served_acc = float((np.asarray(victim.query(xe).labels) == ye).mean())
    feats_o, feats_e = victim.features(xo), victim.features(xe)
    print(f"victim {served_acc:.4f}; features of {len(xo)} + {len(xe)} texts ({time.perf_counter() - start:.0f} s)",
          flush=True)
    rows = []
    keys = [(str(d), k, text_key(k, d, modality)) for d in args.keys_dir for k in range(args.keys)]
    for where, k, key in keys:
        for comps in (int(c) for c in args.components.split(",")):
            rule = build_tiebreak_rule(key=key, x=xo, featurizer=victim.features, feature_space="served-penultimate",
                                       components=comps, text=text)
            shift_o, shift_e = rule.shifts_of(rule.whiten(feats_o)), rule.shifts_of(rule.whiten(feats_e))
            for beta in (float(b) for b in args.betas.split(",")):
                cost = accuracy_cost(api=TieBreakAPI(key=key, backend=victim, rule=rule, beta=beta), x=xe, y=ye)
                rows.append({"keys": where, "key": k, "components": comps, "beta": beta,
                             "cost_pp": round(cost["accuracy_cost_pp"], 2),
                             "changed": round(cost["changed_fraction"], 4),
                             "shift_rms_owner": round(float(np.sqrt((shift_o ** 2).mean())), 3),
                             "shift_rms_test": round(float(np.sqrt((shift_e ** 2).mean())), 3)})
    print(table(rows, list(rows[0])))
    summary = []
    for comps in sorted({r["components"] for r in rows}):
        for beta in sorted({r["beta"] for r in rows}):
            sel = [r for r in rows if r["components"] == comps and r["beta"] == beta]
            summary.append({"components": comps, "beta": beta,
                            "mean_cost_pp": round(float(np.mean([r["cost_pp"] for r in sel])), 2),
                            "mean_changed": round(float(np.mean([r["changed"] for r in sel])), 4),
                            "shift_rms_test": round(float(np.mean([r["shift_rms_test"] for r in sel])), 3)})
    print()
    print(table(summary, list(summary[0])))
    path = write_results(args.name, {"served_accuracy": served_acc, "rows": rows, "summary": summary,
                                     "keys": len(keys), "seconds": round(time.perf_counter() - start, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
