"""How the tie-break mark's evidence grows with what it costs honest users, from the families runs.

Reads the leave-family-out families runs at three shift scales (``extraction_families.json``: beta 1 on three
keys and 0.5 on one; ``extraction_families_b05.json``: 0.5 on two more; ``extraction_families_b04.json``: 0.4
on three more) and fits two power laws on log scales:

* the honest cost against beta (every key's measured cost through the marked API);
* each in-scope thief's log-test ``Z`` under its leave-family-out references against beta, one exponent shared
  by the families (a separate level per family).

Their ratio says how ``Z`` grows with the cost, ``Z ~ cost ** gamma``. With it, per family: the ``Z`` a thief of
that family would reach at a cost of 0.5 pp (projected from its beta 1 thieves), the ``Z`` the log test needs
to reach alpha = 1e-6 in ``wmark verify``'s weighted Holm (its share 0.8 alpha, one-sided normal), the factor
by which the mark would have to be more efficient at equal cost, and the cost the mark would need at its
present efficiency. Confidence intervals: bootstrap over keys (the thieves and costs of a key stay together).
Nothing is trained; it reads the result files only.

Usage: python benchmarks/tiebreak_scaling.py [--boot 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, table, write_results

RUNS = ("extraction_families", "extraction_families_b05", "extraction_families_b04")
ALPHA_SHARE = 0.8e-6
TARGET_PP = 0.5


def observations() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (run, key, beta) cost and every in-scope thief's leave-family-out log-test Z."""
    costs, thieves = [], []
    for run in RUNS:
        doc = json.loads((RESULTS / f"{run}.json").read_text())
        for c in doc["costs"]:
            costs.append({"group": f"{run}/{c['key']}", "beta": float(c["beta"]), "cost_pp": float(c["accuracy_cost_pp"])})
        for r in doc["rows"]:
            if r["within_5pp"]:
                thieves.append({"group": f"{run}/{r['key']}", "beta": float(r["beta"]), "family": r["family"],
                                "z": float(r["tests"][r["lfo_subset"]]["z_log"]), "verdict": float(r["verdict_lfo"])})
    return costs, thieves


def fit(costs: list[dict[str, Any]], thieves: list[dict[str, Any]]) -> dict[str, float]:
    """Exponents of cost and of Z in beta (least squares on logs; Z with one intercept per family)."""
    b = np.log([c["beta"] for c in costs])
    cost_slope = float(np.polyfit(b, np.log([c["cost_pp"] for c in costs]), 1)[0])
    families = sorted({t["family"] for t in thieves})
    design = np.zeros((len(thieves), len(families) + 1))
    for i, t in enumerate(thieves):
        design[i, families.index(t["family"])] = 1.0
        design[i, -1] = np.log(t["beta"])
    coef = np.linalg.lstsq(design, np.log([max(t["z"], 1e-3) for t in thieves]), rcond=None)[0]
    return {"cost_exponent": cost_slope, "z_exponent": float(coef[-1]), "gamma": float(coef[-1]) / cost_slope}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boot", type=int, default=2000, help="Bootstrap resamples of keys (default 2000).")
    args = parser.parse_args()
    costs, thieves = observations()
    point = fit(costs, thieves)
    groups = sorted({c["group"] for c in costs})
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(args.boot):
        picked = rng.choice(groups, size=len(groups), replace=True)
        c = [x for g in picked for x in costs if x["group"] == g]
        t = [x for g in picked for x in thieves if x["group"] == g]
        if len({x["beta"] for x in c}) > 1 and len({x["beta"] for x in t}) > 1:
            boots.append(fit(c, t))
    ci = {name: [round(float(np.percentile([f[name] for f in boots], q)), 3) for q in (2.5, 97.5)] for name in point}
    z_needed = float(norm.isf(ALPHA_SHARE))
    cost1 = float(np.mean([c["cost_pp"] for c in costs if c["beta"] == 1.0]))
    gamma = point["gamma"]
    scale = (TARGET_PP / cost1) ** gamma
    by_family: dict[str, list[float]] = defaultdict(list)
    for t in thieves:
        if t["beta"] == 1.0:
            by_family[t["family"]].append(t["z"])
    rows = []
    for family, zs in sorted(by_family.items(), key=lambda kv: float(np.median(kv[1]))):
        median, weakest = float(np.median(zs)), float(min(zs))
        rows.append({"family": family, "thieves": len(zs), "z_median_beta1": round(median, 2),
                     "z_weakest_beta1": round(weakest, 2),
                     "z_median_at_0.5pp": round(median * scale, 2), "z_weakest_at_0.5pp": round(weakest * scale, 2),
                     "efficiency_needed": round(z_needed / (weakest * scale), 2),
                     "cost_pp_needed": round(cost1 * (z_needed / weakest) ** (1.0 / gamma), 1)})
    print(f"cost ~ beta^{point['cost_exponent']:.2f} (95% CI {ci['cost_exponent']}), "
          f"Z ~ beta^{point['z_exponent']:.2f} ({ci['z_exponent']}): Z ~ cost^{gamma:.2f} ({ci['gamma']})")
    print(f"beta 1 costs {cost1:.2f} pp (mean of {sum(c['beta'] == 1.0 for c in costs)} keys); at {TARGET_PP} pp the "
          f"same thief's Z is x{scale:.2f}; the log test needs Z >= {z_needed:.2f}")
    columns = list(rows[0])
    print(table(rows, columns))
    path = write_results("tiebreak_scaling", {
        "runs": list(RUNS), "costs": costs, "thieves": thieves, "fit": point, "ci95": ci, "bootstraps": len(boots),
        "beta1_cost_pp": cost1, "target_pp": TARGET_PP, "z_needed": z_needed, "z_scale_at_target": scale,
        "families": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
