"""How well `wmark tiebreak build --max-cost` holds its target on inputs it did not choose the scale on.

The build picks, on the data's test split, the largest scale of the tie-break mark whose cost to honest clients
(and every smaller scale's) is at most the target with some confidence. A scale picked on a sample is optimistic
for that sample, so this measures the cost on inputs the pick never saw. Setting: the extraction victim of
``benchmarks/extraction_tiebreak.py`` (Fashion-MNIST CNN trained on the owner's half, the rule's feature map placed
there). For each of ``--keys`` fresh keys the 10k test images are split at random into two halves, and on each
half in turn the scale is picked (the library's ``accuracy_costs`` and ``largest_beta_within`` at each
``--confidences`` level) and its cost measured on the other half (the same distribution; standard error about
0.3 pp) and on the attacker's 30k training images (inputs the victim never trained on; standard error about
0.15 pp, though a little cheaper than the test images at every scale). Per target and confidence: the scales
picked, the mean cost on each held-out set, how often it exceeds the target and by how much. The rule needs no
reference surrogates: the cost depends only on the feature map and the key.

With ``--text``: the MiniLM victim of ``benchmarks/text_extraction.py`` (fine-tuned on the owner's third of the
Debian fortunes, 8 categories, texts of at most 64 tokens); its test texts are split in halves the same way, and
the held-out measure is the other half only (the fortunes have no spare honest texts the victim never saw).

Usage: python benchmarks/cost_target.py [--keys 20] [--targets 0.5,1,1.7,3] [--confidences 0.5,0.9,0.95] [--text]
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


def image_owner() -> dict[str, Any]:
    """The Fashion-MNIST extraction victim: owner inputs, test images, 30k attacker training images, fresh keys."""
    setting = tiebreak_setting()
    return {"victim": "fmnist-cnn (extraction victim)", "served": setting.served, "x_owner": setting.x_owner,
            "featurizer": penultimate_featurizer(setting.victim), "text": None, "x_test": setting.xt,
            "y_test": setting.yt, "x_new": setting.attacker.x_train.numpy(), "y_new": setting.attacker.y_train.numpy(),
            "accuracy": setting.victim_accuracy, "key": lambda k: generate_key(owner=f"cost target {k}")}


def text_owner() -> dict[str, Any]:
    """The MiniLM fortunes victim of ``benchmarks/text_extraction.py`` (cached), its texts and fresh text keys."""
    from text_extraction import fortunes_minilm_victim

    v = fortunes_minilm_victim()
    return {"victim": "MiniLM fine-tuned on the owner's fortunes", "served": v["victim"], "x_owner": v["xo"],
            "featurizer": v["victim"].features, "text": v["text"], "x_test": v["xe"], "y_test": v["ye"],
            "x_new": None, "y_new": None, "accuracy": v["victim"].accuracy(v["xe"], v["ye"]),
            "key": lambda k: generate_key(owner=f"cost target text {k}", num_classes=8, modality=v["modality"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20, help="Fresh keys (default 20).")
    parser.add_argument("--targets", default="0.5,1,1.7,3", help="Cost targets in accuracy points.")
    parser.add_argument("--confidences", default="0.5,0.9,0.95", help="Confidence levels of the pick.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the test images' split into halves.")
    parser.add_argument("--text", action="store_true", help="The MiniLM text victim on the fortunes instead.")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    levels = [float(c) for c in args.confidences.split(",")]
    start = time.perf_counter()
    owner = text_owner() if args.text else image_owner()
    order = np.random.default_rng(args.seed).permutation(len(owner["y_test"]))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    rows: list[dict[str, Any]] = []
    for k in range(args.keys):
        key = owner["key"](k)
        rule = build_tiebreak_rule(key=key, x=owner["x_owner"], featurizer=owner["featurizer"],
                                   feature_space="served-penultimate", text=owner["text"])
        api = TieBreakAPI(key=key, backend=owner["served"], rule=rule, expose_scores=False)
        on_half = [accuracy_costs(api=api, x=owner["x_test"][h], y=owner["y_test"][h], betas=BETA_GRID)
                   for h in halves]
        x_new, y_new = owner["x_new"], owner["y_new"]
        on_new = (None if x_new is None else
                  {c["beta"]: c for c in accuracy_costs(api=api, x=x_new, y=y_new, betas=BETA_GRID)})
        for side in (0, 1):
            other = {c["beta"]: c for c in on_half[1 - side]}
            for target in targets:
                for level in levels:
                    picked = largest_beta_within(on_half[side], target, confidence=level)
                    beta = picked["beta"] if picked else None
                    rows.append({"key": k, "half": side, "target_pp": target, "confidence": level, "beta": beta,
                                 "cost_pick_pp": picked["accuracy_cost_pp"] if picked else None,
                                 "cost_other_half_pp": other[beta]["accuracy_cost_pp"] if picked else None,
                                 "cost_new_pp": on_new[beta]["accuracy_cost_pp"] if picked and on_new else None,
                                 "default_cost_other_half_pp": other[1.0]["accuracy_cost_pp"]})
        print(f"key {k}: the default scale costs {rows[-1]['default_cost_other_half_pp']:.2f} pp on a half; picked "
              + ", ".join(f"{r['target_pp']:g}@{r['confidence']:g} -> {r['beta']}"
                          for r in rows if r["key"] == k and r["half"] == 0), flush=True)
    summary = []
    for target in targets:
        for level in levels:
            group = [r for r in rows if r["target_pp"] == target and r["confidence"] == level]
            picked = [r for r in group if r["beta"] is not None]
            half_over = [r["cost_other_half_pp"] - target for r in picked]
            new_over = [r["cost_new_pp"] - target for r in picked if r["cost_new_pp"] is not None]
            summary.append({
                "target_pp": target, "confidence": level, "picks": len(group), "refused": len(group) - len(picked),
                "beta_median": float(np.median([r["beta"] for r in picked])) if picked else None,
                "beta_range": f"{min(r['beta'] for r in picked):g}-{max(r['beta'] for r in picked):g}" if picked else "",
                "cost_pick_mean": float(np.mean([r["cost_pick_pp"] for r in picked])) if picked else None,
                "cost_other_half_mean": float(np.mean([r["cost_other_half_pp"] for r in picked])) if picked else None,
                "other_half_over": sum(o > 0 for o in half_over),
                "other_half_worst_excess": float(max(half_over)) if half_over else None,
                "cost_new_mean": float(np.mean([r["cost_new_pp"] for r in picked])) if new_over else None,
                "new_over": sum(o > 0 for o in new_over),
                "new_worst_excess": float(max(new_over)) if new_over else None})
    print(table(summary, ["target_pp", "confidence", "picks", "refused", "beta_median", "beta_range", "cost_pick_mean",
                          "cost_other_half_mean", "other_half_over", "other_half_worst_excess", "cost_new_mean",
                          "new_over", "new_worst_excess"]))
    path = write_results("cost_target_text" if args.text else "cost_target", {"victim": owner["victim"],"keys": args.keys, "targets": targets, "confidences": levels,
                                         "split_seed": args.seed,
                                         "inputs": {"picked_on": len(halves[0]), "other_half": len(halves[1]),
                                                    "new": None if owner["y_new"] is None else len(owner["y_new"])},
                                         "victim_accuracy": owner["accuracy"], "rows": rows,
                                         "summary": summary, "seconds": time.perf_counter() - start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
