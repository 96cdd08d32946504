"""Paired comparison of ``tiebreak_invariance.py`` runs: each map against a baseline on the same keys and thieves.

Usage: python benchmarks/research/compare_maps.py tiebreak_rank_k24 tiebreak_rank_k26 [--baseline principal64]

Prints, per map, the leave-family-out verdicts by family and key, the in-scope thieves caught at alpha = 1e-6,
the paired change in verdict log10 p (map minus baseline; mean ± standard error over the pairs), the mean
honest cost and epochs, and the null panel's accusations.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
BAR = -6.0


def _scope(row: dict) -> str:
    return "" if row["within_5pp"] else " (out)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--baseline", default="principal64")
    args = parser.parse_args()
    rows, costs, nulls = [], [], []
    for name in args.names:
        doc = json.loads((RESULTS / f"{name}.json").read_text())
        rows += doc["rows"]
        costs += doc["costs"]
        nulls += doc["null_checks"]
    base = {(r["key"], r["family"]): r for r in rows if r["map"] == args.baseline}
    for m in dict.fromkeys(r["map"] for r in rows):
        if m == args.baseline:
            continue
        pairs = [(base[(r["key"], r["family"])], r) for r in rows if r["map"] == m and (r["key"], r["family"]) in base]
        diffs = [o["verdict_lfo"] - b["verdict_lfo"] for b, o in pairs]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
        print(f"\n{m} against {args.baseline} ({len(pairs)} pairs)")
        print("| family | key | epochs | verdict LFO | epochs (base) | verdict LFO (base) |")
        print("|---|---|---|---|---|---|")
        for b, o in sorted(pairs, key=lambda p: (p[1]["family"], p[1]["key"])):
            print(f"| {o['family']} | {o['key']} | {o['epochs']} | {o['verdict_lfo']:.1f}{_scope(o)} | {b['epochs']} | "
                  f"{b['verdict_lfo']:.1f}{_scope(b)} |")
        for label, sel in (("map", [o for _, o in pairs]), ("base", [b for b, _ in pairs])):
            scoped = [r for r in sel if r["within_5pp"]]
            name = m if label == "map" else args.baseline
            cost = [c["accuracy_cost_pp"] for c in costs if c["map"] == name]
            accused = [n for n in nulls if n["map"] == name and n["verdict_log10_p"] <= BAR]
            print(f"{name}: caught {sum(r['verdict_lfo'] <= BAR for r in scoped)} of {len(scoped)} in scope; "
                  f"cost {sum(cost) / len(cost):.2f} pp ({', '.join(f'{c:.2f}' for c in cost)}); "
                  f"mean epochs {sum(r['epochs'] for r in sel) / len(sel):.1f}; null {len(accused)} accused of "
                  f"{sum(n['map'] == name for n in nulls)} (smallest "
                  f"{min(n['verdict_log10_p'] for n in nulls if n['map'] == name):.2f})")
        print(f"paired {m} − {args.baseline}: {mean:+.2f} ± {se:.2f} (mean ± s.e.; negative is stronger)")


if __name__ == "__main__":
    main()
