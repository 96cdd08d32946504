"""MiniLM on Debian fortunes, end to end through the Python API: embedding cost, detection, theft, null panel.

What it measures, side by side on the same machine:

* the owner fine-tunes MiniLM (all-MiniLM-L6-v2 + a linear head) on its third of the fortunes, once without
  and once with the key's text triggers (identical seed, data order and optimizer): the accuracy cost;
* the marked model verified black-box, label-only, at alpha = 1e-6 (sequential, at most 20 queries);
* a thief's full fine-tune of the marked model on its own third (3 epochs): verified again;
* independent text models (the unmarked fine-tune, linear probes on frozen MiniLM features with other seeds and
  data, tiny BERTs trained from scratch, bag-of-words models) verified on every trigger (fixed mode) and
  sequentially: none may be detected.

Run ``python benchmarks/text.py --part owner`` and ``--part panel`` side by side, then ``--combine`` (about 45
minutes on 2 shared cores at the default 1,600 training and 1,000 test texts), or ``--quick`` (a few minutes,
subsets: the numbers show the plumbing, not the full-size result). Results: ``benchmarks/results/text.json``
(``text_quick.json`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import table, write_results
from wmark.data import Dataset, load_dataset
from wmark.embed import Watermarker
from wmark.keys import Key, generate_key
from wmark.models import build_model
from wmark.suspects import LocalSuspect
from wmark.text import MINILM, TextInputs, load_tokenizer, text_modality
from wmark.training import accuracy, train_epochs
from wmark.verify import verify_blackbox

ALPHA = 1e-6


class BucketedBatches:
    """Batches of texts of similar length (shuffled within and across buckets each epoch, seeded).

    The text models trim a batch to its longest text, so grouping by length halves the cost of a fortunes
    epoch on a CPU; the owner's runs with and without triggers see identical batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Any:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        lengths = (self.x != 0).sum(1) + torch.rand(len(self.x), generator=gen) * 8  # jitter mixes neighbours
        order = torch.argsort(lengths)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            idx = batches[b]
            yield self.x[idx], self.y[idx]


def finetune(model: torch.nn.Module, ds: Dataset, *, epochs: int, lr: float, seed: int, key: Key | None = None,
             per_batch: int = 8, batch_size: int = 32, params: Any = None) -> float:
    """AdamW fine-tune (optionally with the key's triggers mixed in); returns seconds."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr)
    loader: Any = BucketedBatches(ds.x_train, ds.y_train, batch_size=batch_size, seed=seed)
    wm = None
    if key is not None:
        wm = Watermarker(key, schemes=("trigger",), trigger_per_batch=per_batch, trigger_mixing=True)
        model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)  # type: ignore[assignment]
    start = time.perf_counter()
    try:
        train_epochs(model, loader, epochs=epochs, optimizer=optimizer, device=torch.device("cpu"))
    finally:
        if wm is not None:
            wm.detach()
    return time.perf_counter() - start


def trigger_accuracy(model: torch.nn.Module, key: Key) -> float:
    from wmark.schemes.trigger_set import generate_triggers

    triggers = generate_triggers(key)
    answers = LocalSuspect(model, input_shape=(64,), text=TextInputs.from_key(key)).query(triggers.queries(range(len(triggers))))
    return float((torch.as_tensor(answers.labels) == triggers.labels).float().mean())


def verdicts(model: torch.nn.Module, key: Key) -> dict[str, Any]:
    """Label-only verification: sequential within 20 queries, and fixed over every trigger."""
    suspect = LocalSuspect(model, input_shape=(64,), text=TextInputs.from_key(key), expose_scores=False)
    seq = verify_blackbox(key=key, suspect=suspect, alpha=ALPHA, mode="sequential", max_queries=20)
    fixed = verify_blackbox(key=key, suspect=suspect, alpha=ALPHA, mode="fixed")
    return {"seq_detected": seq.detected, "seq_queries": seq.tests[0].queries, "seq_log10_p": round(seq.log10_p, 2),
            "fixed_detected": fixed.detected, "fixed_matches": fixed.tests[0].matches,
            "fixed_log10_p": round(fixed.log10_p, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Subsets and one epoch: minutes, not the full numbers.")
    parser.add_argument("--epochs", type=int, default=2, help="Owner fine-tune epochs (full mode).")
    parser.add_argument("--triggers", type=int, default=40, help="Trigger-set size of the key.")
    parser.add_argument("--train", type=int, default=1600,
                        help="Texts of each third to train on (full mode; 0: the whole third, ~2.4k).")
    parser.add_argument("--test", type=int, default=1000, help="Test texts (full mode; 0: the whole third, ~2.3k).")
    parser.add_argument("--part", choices=("all", "owner", "panel"), default="all",
                        help="owner: the clean/marked fine-tunes and the theft; panel: the other independent "
                             "models (run the two in parallel, then --combine).")
    parser.add_argument("--combine", action="store_true", help="Merge the owner and panel results into one file.")
    parser.add_argument("--variant", default="",
                        help="Name of a variant of the owner part (e.g. fewer triggers per batch): skips the unmarked "
                             "fine-tune, which the default owner run measures, and writes text_owner_<variant>.json.")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--per-batch", type=int, default=8, help="Triggers mixed into each batch of 32.")
    parser.add_argument("--thief-lr", type=float, default=5e-5, help="The thief's AdamW learning rate.")
    parser.add_argument("--clean-seed", type=int, default=None,
                        help="Only the unmarked fine-tune, with this seed (head and data order): the run-to-run "
                             "spread the embedding cost is compared with. Writes text_clean_seed<N>.json.")
    args = parser.parse_args()
    if args.combine:
        combine(quick=args.quick)
        return
    # One thread: on a shared, oversubscribed CPU two OpenMP threads per process ran 6x slower than one.
    torch.set_num_threads(1)
    quick = args.quick
    owner, thief_data = load_dataset("fortunes@owner"), load_dataset("fortunes@attacker")
    n_train, n_test = (96, 96) if quick else (args.train or None, args.test or None)
    owner = owner.subset(max_samples=n_train)
    thief_data = thief_data.subset(max_samples=n_train)
    if n_test is not None:
        owner = Dataset(owner.name, owner.x_train, owner.y_train, owner.x_test[:n_test], owner.y_test[:n_test],
                        owner.num_classes)
    x_test, y_test = owner.x_test, owner.y_test
    epochs = 1 if quick else args.epochs
    thief_epochs = 1 if quick else 3
    tok = load_tokenizer(MINILM)
    # A fixed secret: the owner and panel parts (separate processes) must test against the same key.
    key = dataclasses.replace(
        generate_key(owner="ACME", num_classes=owner.num_classes, num_triggers=args.triggers,
                     modality=text_modality(tokenizer=tok, name=MINILM, max_length=64)),
        secret=hashlib.sha256(b"wmark/benchmarks/text").digest(), created="2026-12-03T00:00:00+00:00")
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"quick": quick, "alpha": ALPHA, "owner_train": len(owner.x_train), "test": len(x_test),
                           "epochs": epochs, "lr": args.lr, "per_batch": args.per_batch, "thief_epochs": thief_epochs,
                           "triggers": args.triggers, "thief_lr": args.thief_lr, "rows": rows}
    name = ("text_quick" if quick else "text") + ("" if args.part == "all" else f"_{args.part}")
    name += f"_{args.variant}" if args.variant else ""
    if args.clean_seed is not None:
        name = f"text_clean_seed{args.clean_seed}"
        plain = build_model("minilm-classifier", num_classes=owner.num_classes, input_shape=(64,), seed=args.clean_seed)
        seconds = finetune(plain, owner, epochs=epochs, lr=args.lr, seed=args.clean_seed)

    def record(label: str, role: str, model: torch.nn.Module, seconds: float) -> None:
        row = {"model": label, "role": role, "test_acc": round(accuracy(model, x_test, y_test), 4),
               "trigger_acc": round(trigger_accuracy(model, key), 3), "train_s": round(seconds, 1),
               **verdicts(model, key)}
        rows.append(row)
        print(row, flush=True)
        write_results(name, dict(doc, partial=True))

    if args.clean_seed is not None:
        record(f"minilm fine-tune, no triggers, seed {args.clean_seed}", "independent", plain, seconds)
    elif args.part in ("all", "owner"):
        owner_part(key=key, owner=owner, thief_data=thief_data, epochs=epochs, thief_epochs=thief_epochs, args=args,
                   record=record, doc=doc, clean=not args.variant)
    if args.part in ("all", "panel") and args.clean_seed is None:
        panel_part(owner=owner, thief_data=thief_data, quick=quick, record=record)
    summarise(doc)
    print(table(rows, COLUMNS))
    doc["partial"] = False
    path = write_results(name, doc)
    print(f"wrote {path}")


COLUMNS = ["model", "role", "test_acc", "trigger_acc", "seq_detected", "seq_queries", "seq_log10_p", "fixed_matches",
           "fixed_log10_p", "train_s"]


def owner_part(*, key: Key, owner: Dataset, thief_data: Dataset, epochs: int, thief_epochs: int, args: Any,
               record: Any, doc: dict[str, Any], clean: bool = True) -> None:
    """The owner's paired fine-tunes (without and with triggers) and the thief's fine-tune of the marked model."""
    if clean:
        plain = build_model("minilm-classifier", num_classes=owner.num_classes, input_shape=(64,), seed=0)
        s_clean = finetune(plain, owner, epochs=epochs, lr=args.lr, seed=0)
        record("minilm fine-tune, no triggers", "independent", plain, s_clean)
        del plain
    marked = build_model("minilm-classifier", num_classes=owner.num_classes, input_shape=(64,), seed=0)
    s_marked = finetune(marked, owner, epochs=epochs, lr=args.lr, seed=0, key=key, per_batch=args.per_batch)
    record("minilm fine-tune + triggers", "marked", marked, s_marked)
    s_thief = finetune(marked, thief_data, epochs=thief_epochs, lr=args.thief_lr, seed=7)
    record(f"thief: {thief_epochs}-epoch full fine-tune on own third, lr {args.thief_lr:g}", "stolen", marked, s_thief)


def panel_part(*, owner: Dataset, thief_data: Dataset, quick: bool, record: Any) -> None:
    """Independent models besides the owner's unmarked fine-tune: probes, scratch BERTs, bags of words."""
    encoder = build_model("minilm-classifier", num_classes=owner.num_classes, input_shape=(64,), seed=0)
    probe_data = [d.subset(max_samples=96 if quick else 800) for d in (owner, thief_data)]
    for seed, part in ((1, probe_data[0]), (2, probe_data[1]), (3, probe_data[0]), (4, probe_data[1])):
        probe = build_model("minilm-classifier", num_classes=owner.num_classes, input_shape=(64,), seed=seed)
        probe.load_state_dict(encoder.state_dict())
        torch.nn.init.normal_(probe.head.weight, std=0.02)  # type: ignore[union-attr, arg-type]
        for p in probe.encoder.parameters():  # type: ignore[union-attr]
            p.requires_grad_(False)
        s = finetune(probe, part, epochs=1, lr=1e-3, seed=seed, params=probe.head.parameters())  # type: ignore[union-attr]
        record(f"minilm linear probe seed {seed} ({'owner' if part is probe_data[0] else 'attacker'} third)", "independent",
               probe, s)
    for arch, lr, count in (("tiny-bert", 1e-3, 3), ("text-bow", 3e-3, 3)):
        for seed in range(count):
            part = owner if seed % 2 == 0 else thief_data
            model = build_model(arch, num_classes=owner.num_classes, input_shape=(64,), seed=100 + seed)
            s = finetune(model, part, epochs=1 if quick else 4, lr=lr, seed=100 + seed)
            record(f"{arch} from scratch seed {100 + seed}", "independent", model, s)


def summarise(doc: dict[str, Any]) -> None:
    """Headline numbers from the rows: embedding cost, detection of the marked and stolen copies, the null panel."""
    rows = doc["rows"]
    by_role = {r["role"]: r for r in rows if r["role"] in ("marked", "stolen")}
    clean = next((r for r in rows if r["model"].startswith("minilm fine-tune, no")), None)
    if clean is not None and "marked" in by_role:
        doc["embed_cost_pp"] = round(100 * (clean["test_acc"] - by_role["marked"]["test_acc"]), 2)
    for role in ("marked", "stolen"):
        if role in by_role:
            doc[f"{role}_detected_within_20"] = by_role[role]["seq_detected"]
    indep = [r for r in rows if r["role"] == "independent"]
    doc["independent"] = len(indep)
    doc["independent_detected"] = sum(bool(r["seq_detected"] or r["fixed_detected"]) for r in indep)
    print(f"embedding cost: {doc.get('embed_cost_pp')} pp; independent detected: {doc['independent_detected']}"
          f"/{doc['independent']}")


def combine(*, quick: bool) -> None:
    """Merge ``text_owner.json`` and ``text_panel.json`` (run in parallel) into ``text.json``."""
    import json

    from benchmarks.common import RESULTS

    base = "text_quick" if quick else "text"
    parts = [json.loads((RESULTS / f"{base}_{p}.json").read_text()) for p in ("owner", "panel")]
    doc = {k: v for k, v in parts[0].items() if k not in ("machine", "rows", "partial")}
    doc["rows"] = parts[0]["rows"] + parts[1]["rows"]
    doc["partial"] = any(p.get("partial", True) for p in parts)
    doc["parts_machine"] = [p["machine"] for p in parts]
    summarise(doc)
    print(table(doc["rows"], COLUMNS))
    print(f"wrote {write_results(base, doc)}")


if __name__ == "__main__":
    main()
