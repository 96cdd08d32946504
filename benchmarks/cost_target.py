"""How well `wmark tiebreak build --max-cost` holds its target on inputs it did not choose the scale on.

The build picks, on the data's test split, the largest scale of the tie-break mark whose cost to honest clients
(and every smaller scale's) is at most the target with some confidence. A scale picked on a sample is optimistic
for that sample, so this measures the cost on inputs the choice never saw. Setting: the extraction victim of
``benchmarks/extraction_tiebreak.py`` (Fashion-MNIST CNN trained on the owner's half, the rule's feature map placed
there); for each of ``--keys`` fresh keys the scale is picked on the 10k test images (what the build reads) with
the library's ``accuracy_costs`` and ``largest_beta_within`` at each ``--confidences`` level, and its cost is
measured on the attacker's 30k training images (honest clients' inputs the victim never trained on; standard
error about 0.15 pp). Per target and confidence: the scales picked, how often the cost on the 30k exceeds the
target and by how much. The rule needs no reference surrogates: the cost depends only on the feature map and
the key.

Usage: python benchmarks/cost_target.py [--keys 20] [--targets 0.5,1,1.7,3] [--confidences 0.5,0.9,0.95]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table, tiebreak_setting, write_results

from wmark.keys import generate_key
from wmark.models import penultimate_featurizer
from wmark.schemes.tiebreak import (
    BETA_GRID,
    TieBreakAPI,
    accuracy_costs,
    build_tiebreak_rule,
    largest_beta_within,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20, help="Fresh keys (default 20).")
    parser.add_argument("--targets", default="0.5,1,1.7,3", help="Cost targets in accuracy points.")
    parser.add_argument("--confidences", default="0.5,0.9,0.95", help="Confidence levels of the pick.")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    levels = [float(c) for c in args.confidences.split(",")]
    start = time.perf_counter()
    setting = tiebreak_setting()
    x_new, y_new = setting.attacker.x_train.numpy(), setting.attacker.y_train.numpy()
    rows: list[dict[str, Any]] = []
    for k in range(args.keys):
        key = generate_key(owner=f"cost target {k}")
        rule = build_tiebreak_rule(key=key, x=setting.x_owner, featurizer=penultimate_featurizer(setting.victim),
                                   feature_space="served-penultimate")
        api = TieBreakAPI(key=key, backend=setting.served, rule=rule, expose_scores=False)
        on_test = accuracy_costs(api=api, x=setting.xt, y=setting.yt, betas=BETA_GRID)
        on_new = {c["beta"]: c for c in accuracy_costs(api=api, x=x_new, y=y_new, betas=BETA_GRID)}
        for target in targets:
            for level in levels:
                picked = largest_beta_within(on_test, target, confidence=level)
                rows.append({"key": k, "target_pp": target, "confidence": level,
                             "beta": picked["beta"] if picked else None,
                             "cost_test_pp": picked["accuracy_cost_pp"] if picked else None,
                             "se_test_pp": picked["cost_se_pp"] if picked else None,
                             "cost_new_pp": on_new[picked["beta"]]["accuracy_cost_pp"] if picked else None,
                             "se_new_pp": on_new[picked["beta"]]["cost_se_pp"] if picked else None,
                             "default_cost_new_pp": on_new[1.0]["accuracy_cost_pp"]})
        print(f"key {k}: the default scale costs {on_new[1.0]['accuracy_cost_pp']:.2f} pp on the 30k; picked "
              + ", ".join(f"{r['target_pp']:g}@{r['confidence']:g} -> {r['beta']}"
                          for r in rows if r["key"] == k), flush=True)
    summary = []
    for target in targets:
        for level in levels:
            group = [r for r in rows if r["target_pp"] == target and r["confidence"] == level]
            picked = [r for r in group if r["beta"] is not None]
            over = [r["cost_new_pp"] - target for r in picked]
            summary.append({
                "target_pp": target, "confidence": level, "keys": len(group), "refused": len(group) - len(picked),
                "beta_median": float(np.median([r["beta"] for r in picked])) if picked else None,
                "beta_range": f"{min(r['beta'] for r in picked):g}-{max(r['beta'] for r in picked):g}" if picked else "",
                "cost_test_mean": float(np.mean([r["cost_test_pp"] for r in picked])) if picked else None,
                "cost_new_mean": float(np.mean([r["cost_new_pp"] for r in picked])) if picked else None,
                "new_over_target": sum(o > 0 for o in over),
                "worst_excess_pp": float(max(over)) if over else None})
    print(table(summary, ["target_pp", "confidence", "keys", "refused", "beta_median", "beta_range", "cost_test_mean",
                          "cost_new_mean", "new_over_target", "worst_excess_pp"]))
    path = write_results("cost_target", {"keys": args.keys, "targets": targets, "confidences": levels,
                                         "images": {"picked_on": len(setting.yt), "measured_on": len(y_new)},
                                         "victim_accuracy": setting.victim_accuracy, "rows": rows,
                                         "summary": summary, "seconds": time.perf_counter() - start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
