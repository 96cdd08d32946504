"""Does the margin's own trigger pass learn the triggers of a text model trained from scratch?

The margin's own pass (``trigger_margin=3``, 4 triggers per optimizer step in a pass of their own) was measured
on MiniLM fine-tuned on the fortunes. This checks it on the two from-scratch text models of ``--arch``
(``tiny-bert``, ``text-bow``): each is trained on the owner's whole third of the fortunes for ``--base-epochs``
(``text_cost.finetune``: AdamW, length-bucketed batches of 32), then the same base is embedded for ``--epochs`` three ways per seed, side by side: no triggers,
the margin's own pass, and 8 triggers mixed into every batch (the text default). Reported per run: test accuracy,
triggers learnt, and label-only detection at alpha = 1e-6 (sequential, at most 20 queries; fixed over all).

Run: ``python benchmarks/research/text_default_scratch.py --seeds 0 1``; writes
``benchmarks/results/research_text_default_scratch.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, machine, table
from benchmarks.research.text_cost import finetune, text_key
from benchmarks.text import trigger_accuracy, verdicts
from wmark.data import load_dataset
from wmark.models import build_model
from wmark.training import accuracy

LR = {"tiny-bert": 1e-3, "text-bow": 3e-3}
VARIANTS = ("clean", "own4-3", "mix8")  # text_cost's variants: no triggers, the margin's own pass, mixing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--archs", nargs="+", default=["tiny-bert", "text-bow"])
    parser.add_argument("--base-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    owner = load_dataset("fortunes@owner")
    rows: list[dict[str, Any]] = []
    for arch in args.archs:
        for seed in args.seeds:
            key = text_key(seed, owner.num_classes)
            base = build_model(arch, num_classes=owner.num_classes, input_shape=(64,), seed=seed)
            finetune("clean", base, owner, key, seed=seed, epochs=args.base_epochs, lr=LR[arch])
            for variant in VARIANTS:
                model = copy.deepcopy(base)
                info = finetune(variant, model, owner, key, seed=100 + seed, epochs=args.epochs, lr=LR[arch])
                row = {"arch": arch, "seed": seed, "variant": variant, **info,
                       "test_acc": round(accuracy(model, owner.x_test, owner.y_test), 4),
                       "trigger_acc": round(trigger_accuracy(model, key), 3), **verdicts(model, key)}
                rows.append(row)
                print(row, flush=True)
    summary = []
    for arch in args.archs:
        clean = {r["seed"]: r["test_acc"] for r in rows if r["arch"] == arch and r["variant"] == "clean"}
        for variant in VARIANTS[1:]:
            mine = [r for r in rows if r["arch"] == arch and r["variant"] == variant]
            costs = [100 * (clean[r["seed"]] - r["test_acc"]) for r in mine]
            summary.append({"arch": arch, "variant": variant, "seeds": len(mine),
                            "cost_pp_mean": round(statistics.mean(costs), 2),
                            "cost_pp": " ".join(f"{c:+.2f}" for c in costs),
                            "triggers_learnt": " ".join(f"{r['trigger_acc']:.2f}" for r in mine),
                            "detected_20": f"{sum(r['seq_detected'] for r in mine)}/{len(mine)}",
                            "queries_max": max(r["seq_queries"] for r in mine)})
    print(table(summary, list(summary[0])))
    doc = {"base_epochs": args.base_epochs, "epochs": args.epochs, "lr": LR, "owner_train": len(owner.x_train),
           "test": len(owner.x_test), "machine": machine(), "summary": summary, "rows": rows}
    path = RESULTS / "research_text_default_scratch.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
