"""How often does the trigger set survive the attacker's fine-tune? Miss rate over fresh keys.

The end-to-end test embeds a trigger set with the CLI defaults (on a 1-epoch base, 2 embedding epochs)
and expects the copy an attacker fine-tuned for 5 epochs (all layers, Adam lr 1e-3, 10k own images) to be
detected at alpha = 1e-6. Whether it is depends on the key; this measures how often it is, per embedding
setting, with everything else fixed: for each fresh key, embed, fine-tune (seeded per key), then verify
(sequential, as `wmark verify` does) and count matches on all triggers.

Usage: python benchmarks/trigger_retention.py [--keys 8] [--per-batch 8,16,32] [--embed-epochs 2,3]
       [--base-epochs 1] [--name trigger_retention]  (about 20 s per key and setting)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cached, table, write_results

from wmark import api
from wmark.keys import generate_key, load_key, save_key
from wmark.models import load_model
from wmark.schemes.trigger_set import generate_triggers

OWNER, ATTACKER = "fashion-mnist@owner", "fashion-mnist@attacker"


def retained(key_path: Path, model_path: Path) -> tuple[int, int]:
    """Matches of the model's answers with the secret labels over the whole trigger set."""
    triggers = generate_triggers(load_key(key_path))
    model, _ = load_model("fmnist-cnn", model_path)
    with torch.no_grad():
        answers = model.eval()(triggers.inputs).argmax(1)
    return int((answers == triggers.labels).sum()), len(triggers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=8, help="fresh keys per setting")
    parser.add_argument("--per-batch", default="8", help="comma-separated trigger samples per batch to compare")
    parser.add_argument("--embed-epochs", default="2", help="comma-separated embedding epochs to compare")
    parser.add_argument("--base-epochs", type=int, default=1, help="epochs of the unmarked base (the demo uses 2)")
    parser.add_argument("--name", default="trigger_retention", help="results file name")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="wmark-bench-"))
    base = cached({"name": "base-cnn", "data": OWNER, "epochs": args.base_epochs, "seed": 0},
                  lambda p: api.train(arch="fmnist-cnn", data=OWNER, out=p, epochs=args.base_epochs, seed=0))
    settings = [(int(e), int(b)) for e in args.embed_epochs.split(",") for b in args.per_batch.split(",")]
    rows = []
    for k in range(args.keys):
        key_path = work / f"k{k}.key"
        save_key(generate_key(owner=f"Retention Owner {k}"), key_path)
        for epochs, per_batch in settings:
            marked, stolen = work / f"m{k}-{epochs}-{per_batch}.safetensors", work / f"s{k}-{epochs}-{per_batch}.safetensors"
            m = api.embed(key=key_path, arch="fmnist-cnn", weights=base, data=OWNER, out=marked,
                          epochs=epochs, trigger_per_batch=per_batch)
            s = api.attack(kind="finetune", arch="fmnist-cnn", weights=marked, out=stolen, data=ATTACKER,
                           epochs=5, max_samples=10_000, seed=k)
            v = api.verify(key=key_path, arch="fmnist-cnn", suspect=stolen).to_dict()
            kept, n = retained(key_path, stolen)
            rows.append({"key": k, "embed_epochs": epochs, "per_batch": per_batch, "marked_acc": m["test_accuracy"],
                         "embed_s": m["seconds"], "copy_acc": s["test_accuracy"],
                         "marked_kept": retained(key_path, marked)[0] / n, "copy_kept": kept / n,
                         "decision": v["decision"], "log10_p": v["log10_p"], "queries": v["queries"]})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    summary = []
    for epochs, per_batch in settings:
        rs = [r for r in rows if (r["embed_epochs"], r["per_batch"]) == (epochs, per_batch)]
        kept = np.array([r["copy_kept"] for r in rs])
        summary.append({"embed_epochs": epochs, "per_batch": per_batch, "keys": len(rs),
                        "missed": sum(r["decision"] != "detected" for r in rs),
                        "copy_kept_mean": float(kept.mean()), "copy_kept_min": float(kept.min()),
                        "marked_acc_mean": float(np.mean([r["marked_acc"] for r in rs])),
                        "embed_s_mean": float(np.mean([r["embed_s"] for r in rs]))})
    print()
    print(table(rows, list(rows[0])))
    print()
    print(table(summary, list(summary[0])))
    path = write_results(args.name, {"base_epochs": args.base_epochs, "rows": rows, "summary": summary,
                                               "wall_s": time.perf_counter() - start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
