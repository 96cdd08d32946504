"""Cost of embedding the trigger set: wall time and test accuracy vs the identical fine-tune without it.

Both fine-tunes start from the same base model with the same seed, data order, optimizer and epochs,
and run alternately in one process so machine load affects both alike.

Usage: python benchmarks/embed_overhead.py [--seeds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cached, table, write_results

from wmark import api
from wmark.keys import generate_key, save_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default="fashion-mnist@owner")
    args = parser.parse_args()

    base = cached({"name": "base-cnn", "data": args.data, "epochs": 2, "seed": 0},
                  lambda p: api.train(arch="fmnist-cnn", data=args.data, out=p, epochs=2, seed=0))
    work = Path(tempfile.mkdtemp(prefix="wmark-bench-"))
    key_path = work / "bench.key"
    save_key(generate_key(owner="Benchmark Owner"), key_path)
    rows = []
    for seed in range(args.seeds):
        runs = {}
        for label, schemes in (("plain", ()), ("marked", ("trigger",))):
            start = time.perf_counter()
            info = api.embed(key=key_path, arch="fmnist-cnn", weights=base, data=args.data, schemes=schemes,
                             epochs=args.epochs, seed=seed, out=work / f"{label}-{seed}.safetensors")
            runs[label] = dict(info, wall=time.perf_counter() - start)
        verdict = api.verify(key=key_path, arch="fmnist-cnn", suspect=work / f"marked-{seed}.safetensors")
        rows.append({
            "seed": seed,
            "plain_train_s": runs["plain"]["seconds"],
            "marked_train_s": runs["marked"]["seconds"],
            "time_ratio": runs["marked"]["seconds"] / runs["plain"]["seconds"],
            "wall_ratio": runs["marked"]["wall"] / runs["plain"]["wall"],
            "plain_acc": runs["plain"]["test_accuracy"],
            "marked_acc": runs["marked"]["test_accuracy"],
            "gap_pp": 100 * (runs["plain"]["test_accuracy"] - runs["marked"]["test_accuracy"]),
            "queries_to_detect": verdict.to_dict()["queries"],
            "log10_p": verdict.log10_p,
        })
        print(table(rows[-1:], list(rows[-1])), flush=True)
    summary = {
        "median_time_ratio": statistics.median(r["time_ratio"] for r in rows),
        "median_wall_ratio": statistics.median(r["wall_ratio"] for r in rows),
        "mean_gap_pp": statistics.mean(r["gap_pp"] for r in rows),
        "max_gap_pp": max(r["gap_pp"] for r in rows),
        "max_queries_to_detect": max(r["queries_to_detect"] for r in rows),
        "targets": {"time_ratio": "<= 1.25", "gap_pp": "<= 0.5", "queries": "<= 20"},
    }
    print()
    print(table(rows, ["seed", "plain_train_s", "marked_train_s", "time_ratio", "plain_acc", "marked_acc",
                       "gap_pp", "queries_to_detect"]))
    print("\n" + "  ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    path = write_results("embed_overhead", {"args": vars(args), "rows": rows, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
