"""What the text trigger set costs a MiniLM fine-tune, and which embedding keeps it under 0.5 pp (#17).

Every run fine-tunes all-MiniLM-L6-v2 + a linear head on the owner's whole third of the fortunes (2 epochs,
AdamW 1e-4, batch 32, length-bucketed batches) and measures accuracy on the whole test third. For each seed
(head initialisation, data order and a fresh key of 100 text triggers) the variants share everything but the
trigger embedding:

* ``clean``: no triggers (the reference the cost is measured against);
* ``mixK``: K triggers mixed into every batch (the library's text default is 8);
* ``laK``: the library's lookahead step, K triggers per step (radius 0.05); ``laK-M`` with ``trigger_margin=M``;
* ``ownK-M``: the library's own trigger pass, ``Watermarker(trigger_lookahead=0, trigger_margin=M)``, the same as
  ``gateK-M``;
* ``gateK-M``: a separate trigger pass at the current weights, K triggers per step, whose cross-entropy counts
  only for triggers the model does not yet answer with a logit margin of at least M: once a trigger is
  learnt it stops pulling on the weights.

Every marked model is verified label-only at alpha = 1e-6 (sequential, at most 20 queries), and with
``--thief`` so is its copy after the thief's 3-epoch fine-tune on its own third (AdamW 5e-5).

Run: ``python benchmarks/research/text_cost.py --seeds 0 1 --variants clean mix2 gate4-3``; rows are appended to
``benchmarks/results/research_text_cost[_NAME].json`` as they finish (a rerun skips finished rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, machine, table
from benchmarks.text import BucketedBatches, trigger_accuracy, verdicts
from wmark.contract import call_model, logits_of
from wmark.data import Dataset, load_dataset
from wmark.embed import Watermarker
from wmark.integrations.common import trigger_batch
from wmark.keys import Key, generate_key
from wmark.models import build_model
from wmark.schemes.trigger_set import generate_triggers
from wmark.text import MINILM, load_tokenizer, text_modality
from wmark.training import accuracy, train_epochs


class GatedTriggerStep:
    """Optimizer pre-hook: ``per_batch / 32 ×`` the gradient of the unlearnt triggers' cross-entropy.

    The next ``per_batch`` triggers (round robin) are run at the current weights; a trigger whose logit margin
    (its label's logit minus the best other) is at least ``margin`` contributes nothing.
    """

    def __init__(self, model: torch.nn.Module, key: Key, *, per_batch: int, margin: float, batch_size: int = 32):
        self.model, self.per_batch, self.margin = model, per_batch, margin
        self.triggers = generate_triggers(key)
        self.weight = per_batch / batch_size
        self.input_key = Watermarker(key)._trigger_input_name(model)
        self.cursor = 0
        self.active_steps = 0
        self.steps = 0

    def hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        n = len(self.triggers)
        idx = [(self.cursor + i) % n for i in range(self.per_batch)]
        self.cursor = (self.cursor + self.per_batch) % n
        labels = self.triggers.labels[idx]
        logits = logits_of(call_model(self.model, trigger_batch(self.triggers, idx, input_key=self.input_key)))
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
        keep = (true - other).detach() < self.margin
        self.steps += 1
        if not bool(keep.any()):
            return
        self.active_steps += 1
        loss = F.cross_entropy(logits[keep], labels[keep], reduction="sum") / self.per_batch * self.weight
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)


def text_key(seed: int, num_classes: int) -> Key:
    tok = load_tokenizer(MINILM)
    key = generate_key(owner="ACME", num_classes=num_classes, num_triggers=100,
                       modality=text_modality(tokenizer=tok, name=MINILM, max_length=64))
    return dataclasses.replace(key, secret=hashlib.sha256(f"wmark/research/text_cost/{seed}".encode()).digest(),
                               created="2026-12-03T00:00:00+00:00")


def finetune(variant: str, model: torch.nn.Module, data: Dataset, key: Key, *, seed: int, epochs: int,
             lr: float) -> dict[str, Any]:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loader: Any = BucketedBatches(data.x_train, data.y_train, batch_size=32, seed=seed)
    info: dict[str, Any] = {}
    wm = handle = gate = None
    if variant.startswith("mix"):
        wm = Watermarker(key, schemes=("trigger",), trigger_mixing=True, trigger_per_batch=int(variant[3:]))
        model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)  # type: ignore[assignment]
    elif variant.startswith("la"):
        per_batch, _, margin = variant[2:].partition("-")
        wm = Watermarker(key, schemes=("trigger",), trigger_lookahead=0.05, trigger_per_batch=int(per_batch),
                         trigger_margin=float(margin) if margin else None)
        model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)  # type: ignore[assignment]
    elif variant.startswith("own"):
        per_batch, margin = variant[3:].split("-")
        wm = Watermarker(key, schemes=("trigger",), trigger_lookahead=0, trigger_per_batch=int(per_batch),
                         trigger_margin=float(margin))
        model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)  # type: ignore[assignment]
    elif variant.startswith("gate"):
        per_batch, margin = variant[4:].split("-")
        gate = GatedTriggerStep(model, key, per_batch=int(per_batch), margin=float(margin))
        handle = optimizer.register_step_pre_hook(gate.hook)
    elif variant != "clean":
        raise SystemExit(f"unknown variant {variant!r}")
    start = time.perf_counter()
    try:
        train_epochs(model, loader, epochs=epochs, optimizer=optimizer, device=torch.device("cpu"))
    finally:
        if wm is not None:
            wm.detach()
        if handle is not None:
            handle.remove()
    info["train_s"] = round(time.perf_counter() - start, 1)
    if gate is not None:
        info["trigger_steps_active"] = round(gate.active_steps / max(gate.steps, 1), 3)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["clean", "mix2", "gate4-3"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--thief", action="store_true", help="Also the thief's 3-epoch fine-tune of each marked model.")
    parser.add_argument("--name", default="")
    parser.add_argument("--combine", nargs="+", metavar="NAME",
                        help="Merge research_text_cost_NAME.json files (run side by side) into research_text_cost.json.")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine)
        return
    torch.set_num_threads(1)
    owner, thief = load_dataset("fortunes@owner"), load_dataset("fortunes@attacker")
    path = RESULTS / f"research_text_cost{'_' + args.name if args.name else ''}.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {
        "epochs": args.epochs, "lr": args.lr, "owner_train": len(owner.x_train), "test": len(owner.x_test),
        "rows": []}
    done = {(r["seed"], r["variant"]) for r in doc["rows"]}
    for seed in args.seeds:
        key = text_key(seed, owner.num_classes)
        for variant in args.variants:
            if (seed, variant) in done:
                continue
            model = build_model("minilm-classifier", num_classes=owner.num_classes, input_shape=(64,), seed=seed)
            info = finetune(variant, model, owner, key, seed=seed, epochs=args.epochs, lr=args.lr)
            row = {"seed": seed, "variant": variant, **info,
                   "test_acc": round(accuracy(model, owner.x_test, owner.y_test), 4),
                   "trigger_acc": round(trigger_accuracy(model, key), 3), **verdicts(model, key)}
            if args.thief and variant != "clean":
                t0 = time.perf_counter()
                finetune("clean", model, thief, key, seed=100 + seed, epochs=3, lr=5e-5)
                stolen = verdicts(model, key)
                row.update({"thief_s": round(time.perf_counter() - t0, 1),
                            "thief_acc": round(accuracy(model, owner.x_test, owner.y_test), 4),
                            "thief_trigger_acc": round(trigger_accuracy(model, key), 3),
                            **{f"thief_{k}": v for k, v in stolen.items()}})
            doc["rows"].append(row)
            print(row, flush=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(summarise(doc["rows"]), SUMMARY))


SUMMARY = ["variant", "seeds", "cost_pp_mean", "cost_pp_sd", "cost_pp", "triggers_learnt", "queries_max",
           "thief_detected", "thief_queries_max"]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the accuracy cost against the same seed's clean fine-tune, detection, the thief's copy."""
    clean = {r["seed"]: r["test_acc"] for r in rows if r["variant"] == "clean"}
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "clean"):
        mine = [r for r in rows if r["variant"] == variant and r["seed"] in clean]
        if not mine:
            continue
        costs = [100 * (clean[r["seed"]] - r["test_acc"]) for r in mine]
        thieves = [r for r in mine if "thief_seq_detected" in r]
        out.append({"variant": variant, "seeds": len(mine), "cost_pp_mean": round(statistics.mean(costs), 2),
                    "cost_pp_sd": round(statistics.stdev(costs), 2) if len(costs) > 1 else None,
                    "cost_pp": " ".join(f"{c:+.2f}" for c in costs),
                    "triggers_learnt": " ".join(f"{r['trigger_acc']:.2f}" for r in mine),
                    "queries_max": max(r["seq_queries"] for r in mine) if all(r["seq_detected"] for r in mine)
                    else "missed",
                    "thief_detected": f"{sum(r['thief_seq_detected'] for r in thieves)}/{len(thieves)}",
                    "thief_queries_max": max((r["thief_seq_queries"] for r in thieves), default=None)})
    return out


def combine(names: list[str]) -> None:
    rows: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    for name in names:
        part = json.loads((RESULTS / f"research_text_cost_{name}.json").read_text())
        first = first or part
        rows += [r for r in part["rows"] if (r["seed"], r["variant"]) not in {(q["seed"], q["variant"]) for q in rows}]
    rows.sort(key=lambda r: (r["variant"] != "clean", r["variant"], r["seed"]))
    doc = {k: v for k, v in first.items() if k != "rows"}
    doc.update({"machine": machine(), "summary": summarise(rows), "rows": rows})
    path = RESULTS / "research_text_cost.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc["summary"], SUMMARY))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
