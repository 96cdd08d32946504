"""The cost–power curve from ``extraction_families.py`` runs whose scales share their keys and thieves.

Usage: python benchmarks/research/compare_scales.py extraction_families_curve_b1 extraction_families_curve_b07_b04

Prints, per shift scale, the honest cost through the served API (by key), the answers changed, the in-scope
thieves caught leave-family-out (overall and by family) and the null panel's accusations; then, paired by thief
(same key, family and seed) against the largest scale, the change in LFO verdict log10 p (mean ± standard error
over the pairs in scope at both scales) and the ratio of the mean LFO log-test ``Z``, beside what the scaling fit
``Z ~ cost^0.36`` predicts from the two costs; and the best point as the pre-registered rule defines it (among
scales with mean cost at most 0.5 pp, the most LFO catches; without that cap, the most catches per pp). Writes
``benchmarks/results/extraction_curve_same_keys.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results"
BAR = -6.0
COST_BAR_PP = 0.5
SCALING_EXPONENT = 0.36  # Z ~ cost^0.36, benchmarks/tiebreak_scaling.py over the earlier families runs


def _caught(row: dict[str, Any]) -> bool:
    return bool(row["within_5pp"]) and row["verdict_lfo"] <= BAR


def _z_lfo(row: dict[str, Any]) -> float:
    return float(row["tests"][row["lfo_subset"]]["z_log"])


def summarise(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-scale points and thief pairs against the largest scale, from the runs' rows, costs and null checks."""
    rows = [r for d in docs for r in d["rows"]]
    costs = [c for d in docs for c in d["costs"]]
    betas = sorted({float(r["beta"]) for r in rows}, reverse=True)
    points: list[dict[str, Any]] = []
    for beta in betas:
        mine = [r for r in rows if float(r["beta"]) == beta]
        by_key = [c["accuracy_cost_pp"] for c in costs if float(c["beta"]) == beta]
        changed = [c["changed_fraction"] for c in costs if float(c["beta"]) == beta]
        families: dict[str, dict[str, int]] = {}
        for r in mine:
            fam = families.setdefault(r["family"], {"in_scope": 0, "caught_lfo": 0})
            fam["in_scope"] += int(r["within_5pp"])
            fam["caught_lfo"] += int(_caught(r))
        nulls = [d["summary"]["null_panel"] for d in docs if f"beta {beta:g}" in d["summary"]]
        points.append({
            "beta": beta, "keys": sorted({int(c["key"]) for c in costs if float(c["beta"]) == beta}),
            "cost_pp_by_key": by_key, "cost_pp_mean": statistics.fmean(by_key) if by_key else math.nan,
            "changed_fraction_mean": statistics.fmean(changed) if changed else math.nan,
            "in_scope": sum(int(r["within_5pp"]) for r in mine), "caught_lfo": sum(map(_caught, mine)),
            "families": families,
            # the null panel is reported per run, over all of that run's scales
            "null_verdicts_of_its_run": sum(n["verdict_checks"] for n in nulls),
            "null_accused_of_its_run": sum(n["false_accusations_verdict"] for n in nulls),
        })
    top = betas[0]
    base = {(r["key"], r["family"]): r for r in rows if float(r["beta"]) == top}
    pairs_out: list[dict[str, Any]] = []
    for point in points[1:]:
        beta = point["beta"]
        pairs = [(base[(r["key"], r["family"])], r) for r in rows
                 if float(r["beta"]) == beta and (r["key"], r["family"]) in base]
        both = [(a, b) for a, b in pairs if a["within_5pp"] and b["within_5pp"]]
        deltas = [b["verdict_lfo"] - a["verdict_lfo"] for a, b in both]
        z_top, z_low = [_z_lfo(a) for a, _ in both], [_z_lfo(b) for _, b in both]
        cost_ratio = point["cost_pp_mean"] / points[0]["cost_pp_mean"]
        pairs_out.append({
            "beta": beta, "against": top, "pairs_in_scope": len(both),
            "delta_log10_p_mean": statistics.fmean(deltas) if deltas else math.nan,
            "delta_log10_p_se": statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else math.nan,
            "z_ratio": statistics.fmean(z_low) / statistics.fmean(z_top) if both else math.nan,
            "z_ratio_predicted": cost_ratio ** SCALING_EXPONENT if cost_ratio > 0 else math.nan,
            "mean_epochs": statistics.fmean(r["epochs"] for _, r in pairs) if pairs else math.nan,
            "mean_epochs_against": statistics.fmean(a["epochs"] for a, _ in pairs) if pairs else math.nan,
        })
    capped = [p for p in points if p["cost_pp_mean"] <= COST_BAR_PP]
    best_capped = max(capped, key=lambda p: p["caught_lfo"], default=None)
    best_per_pp = max(points, key=lambda p: p["caught_lfo"] / p["cost_pp_mean"] if p["cost_pp_mean"] > 0 else 0.0,
                      default=None)
    return {"points": points, "pairs": pairs_out,
            "best_within_cost_bar": None if best_capped is None else best_capped["beta"],
            "best_catches_per_pp": None if best_per_pp is None else best_per_pp["beta"],
            "bar_log10_p": BAR, "cost_bar_pp": COST_BAR_PP, "scaling_exponent": SCALING_EXPONENT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--out", default="extraction_curve_same_keys")
    args = parser.parse_args()
    docs = [json.loads((RESULTS / f"{name}.json").read_text()) for name in args.names]
    result = summarise(docs)
    families = sorted({f for p in result["points"] for f in p["families"]})
    print("| beta | keys | cost pp (by key) | mean | answers changed | caught LFO | "
          + " | ".join(f"`{f}`" for f in families) + " |")
    print("|" + "---|" * (6 + len(families)))
    for p in result["points"]:
        by_fam = [f"{p['families'].get(f, {}).get('caught_lfo', 0)}/{p['families'].get(f, {}).get('in_scope', 0)}"
                  for f in families]
        print(f"| {p['beta']:g} | {p['keys']} | {', '.join(f'{c:.2f}' for c in p['cost_pp_by_key'])} | "
              f"{p['cost_pp_mean']:.2f} | {100 * p['changed_fraction_mean']:.1f} % | "
              f"{p['caught_lfo']}/{p['in_scope']} | " + " | ".join(by_fam) + " |")
    print()
    for q in result["pairs"]:
        print(f"beta {q['beta']:g} against {q['against']:g}: {q['pairs_in_scope']} pairs in scope, LFO log10 p "
              f"{q['delta_log10_p_mean']:+.2f} ± {q['delta_log10_p_se']:.2f}; Z ratio {q['z_ratio']:.2f} "
              f"(scaling fit predicts {q['z_ratio_predicted']:.2f}); epochs {q['mean_epochs']:.1f} against "
              f"{q['mean_epochs_against']:.1f}")
    for p in result["points"]:
        print(f"null panel of the run holding beta {p['beta']:g}: {p['null_accused_of_its_run']} of "
              f"{p['null_verdicts_of_its_run']} verdicts accused")
    print(f"best point within {COST_BAR_PP} pp: beta {result['best_within_cost_bar']}; most catches per pp: beta "
          f"{result['best_catches_per_pp']}")
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"runs": args.names, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
