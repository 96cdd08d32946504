"""Trigger-set watermark on Fashion-MNIST: detection, robustness to an attacker's fine-tune, and the null.

Protocol: the training set is split once into the owner's and the attacker's halves (``@owner`` /
``@attacker``). The owner trains a base CNN, embeds the trigger set; the attacker fine-tunes the stolen
copy on 10k of their own images for 5 epochs. Independent models (other seeds, two other architectures)
are trained on the attacker's half and must all come out ``not_detected``, as must the marked model
checked with a different key.

Usage: python benchmarks/trigger_set.py [--independent 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cached, table, write_results

from wmark import api
from wmark.keys import generate_key, save_key

OWNER, ATTACKER = "fashion-mnist@owner", "fashion-mnist@attacker"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--independent", type=int, default=10, help="independent CNN seeds (plus 2 other archs)")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="wmark-bench-"))
    key_path, other_key = work / "owner.key", work / "other.key"
    save_key(generate_key(owner="Benchmark Owner"), key_path)
    save_key(generate_key(owner="Someone Else"), other_key)

    base = cached({"name": "base-cnn", "data": OWNER, "epochs": 2, "seed": 0},
                  lambda p: api.train(arch="fmnist-cnn", data=OWNER, out=p, epochs=2, seed=0))
    marked, plain = work / "marked.safetensors", work / "plain.safetensors"
    m = api.embed(key=key_path, arch="fmnist-cnn", weights=base, data=OWNER, out=marked, epochs=2)
    p = api.embed(key=key_path, arch="fmnist-cnn", weights=base, data=OWNER, out=plain, epochs=2, schemes=())
    stolen = work / "stolen.safetensors"
    s = api.attack(kind="finetune", arch="fmnist-cnn", weights=marked, out=stolen, data=ATTACKER, epochs=5,
                   max_samples=10_000)

    rows = []

    def check(name: str, arch: str, path: Path, accuracy: float | None, key: Path = key_path,
              expect: str = "detected") -> None:
        verdict = api.verify(key=key, arch=arch, suspect=path).to_dict()
        rows.append({"model": name, "arch": arch, "accuracy": accuracy, "decision": verdict["decision"],
                     "log10_p": verdict["log10_p"], "queries": verdict["queries"], "matches": verdict["matches"],
                     "expected": expect, "ok": verdict["decision"] == expect})
        print(table(rows[-1:], list(rows[-1])), flush=True)

    check("marked", "fmnist-cnn", marked, m["test_accuracy"])
    check("stolen (fine-tuned 5 ep, 10k attacker images)", "fmnist-cnn", stolen, s["test_accuracy"])
    check("marked, checked with another key", "fmnist-cnn", marked, m["test_accuracy"], key=other_key,
          expect="not_detected")
    check("unmarked fine-tune of the same base", "fmnist-cnn", plain, p["test_accuracy"], expect="not_detected")
    independents = [("fmnist-cnn", seed) for seed in range(1, args.independent + 1)]
    independents += [("fmnist-mlp", 1), ("fmnist-cnn-wide", 1)]
    for arch, seed in independents:
        path = cached({"name": f"indep-{arch}", "data": ATTACKER, "epochs": 2, "seed": seed},
                      lambda q, a=arch, sd=seed: api.train(arch=a, data=ATTACKER, out=q, epochs=2, seed=sd))
        acc = float(api.inspect(path=path)["test_accuracy"])
        check(f"independent seed {seed}", arch, path, acc, expect="not_detected")

    null_rows = [r for r in rows if r["expected"] == "not_detected"]
    summary = {
        "fidelity_gap_pp": 100 * (p["test_accuracy"] - m["test_accuracy"]),
        "queries_to_detect_marked": rows[0]["queries"],
        "stolen_detected": rows[1]["decision"] == "detected",
        "stolen_accuracy": s["test_accuracy"],
        "null_models": len(null_rows),
        "false_accusations": sum(r["decision"] == "detected" for r in null_rows),
        "min_null_log10_p": min(r["log10_p"] for r in null_rows),
        "all_as_expected": all(r["ok"] for r in rows),
        "wall_s": time.perf_counter() - start,
    }
    print()
    print(table(rows, ["model", "arch", "accuracy", "decision", "log10_p", "queries", "matches", "ok"]))
    print("\n" + "  ".join(f"{k}={v}" for k, v in summary.items()))
    path = write_results("trigger_set", {"rows": rows, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
