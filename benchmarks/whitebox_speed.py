"""Time white-box verification of a ~27M-parameter model file, alignment included.

Synthesises an MLP 784 → 2048 → 4096 → 4096 → 10 (26.8M parameters), marks its 4096×4096 layer with a
256-bit key by optimising the scheme's regularizer, then verifies (a) a stolen copy (every hidden neuron
permuted and rescaled, small noise, stored as float16, names scrambled) and (b) an independent model of
the same shape, whose alignment is the slow case (few mutual nearest neighbours, a full assignment).
Times are wall-clock and process-CPU seconds of ``verify_whitebox`` from the files (reading, canonical
form, alignment, projection, test), best of 3. The machine's cores are shared, so the load average is
recorded with the numbers; CPU seconds are the steadier figure under contention.

``--baseline REV`` also times the verifier as it was at git revision ``REV`` (loaded from ``git show``),
interleaved with the current one in the same process, for a side-by-side ratio.

Run: ``nice -n 10 python benchmarks/whitebox_speed.py [--baseline REV]``; writes
``benchmarks/results/whitebox_speed.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from wmark.attacks import permute_state_dict, rename_tensors
from wmark.io import save_model, save_tensors
from wmark.keys import generate_key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox import verify as current

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "whitebox_speed.json"
WIDTHS = (784, 2048, 4096, 4096, 10)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(WIDTHS) - 1):
        layers += [nn.Linear(WIDTHS[i], WIDTHS[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _baseline(rev: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:wmark/whitebox/verify.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "wmark_whitebox_verify_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("wmark_whitebox_verify_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _time(module: ModuleType, **kwargs: Any) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    verdict = module.verify_whitebox(**kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="git revision whose verifier to time side by side")
    args = parser.parse_args()
    versions = {"current": current}
    if args.baseline:
        versions[f"baseline {args.baseline}"] = _baseline(args.baseline)
    torch.set_num_threads(2)
    key = generate_key(owner="Speed")
    model = _mlp(0)
    params = sum(p.numel() for p in model.parameters())
    emb = WeightsEmbedder(key, model)
    marked_weight = dict(model.named_parameters())[emb.layer]
    optimizer = torch.optim.Adam([marked_weight], lr=1e-4)
    steps = 0
    while emb.loss().item() > 0 and steps < 200:
        optimizer.zero_grad()
        (emb.loss() * emb.strength).backward()
        optimizer.step()
        steps += 1
    chain = [n for n in model.state_dict() if n.endswith("weight")]
    suspects = ("stolen copy", "independent")
    results: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        ref = Path(d) / "ref.safetensors"
        save_model(model, ref, metadata={"weights": emb.metadata(), "commitment": key.commitment()})
        state = permute_state_dict(model.state_dict(), chain=chain, seed=1)
        gen = torch.Generator().manual_seed(2)
        state = {n: (t + 0.01 * t.std() * torch.randn(t.shape, generator=gen)).half() for n, t in state.items()}
        save_tensors(rename_tensors(state, seed=3), Path(d) / "stolen copy.safetensors")
        save_model(_mlp(1), Path(d) / "independent.safetensors")
        for name in suspects:
            runs: dict[str, list[tuple[float, float]]] = {v: [] for v in versions}
            for _ in range(3):
                for version, module in versions.items():
                    wall, cpu, verdict = _time(module, key=key, reference=ref, suspect=Path(d) / f"{name}.safetensors")
                    runs[version].append((wall, cpu))
                    results[f"{name} | {version}"] = {
                        "suspect": name, "verifier": version, "detected": verdict.detected,
                        "log10_p": verdict.log10_p, "bit_error_rate": verdict.tests[0].details["bit_error_rate"]}
            for version in versions:
                row = results[f"{name} | {version}"]
                row["best_seconds"] = min(w for w, _ in runs[version])
                row["best_cpu_seconds"] = min(c for _, c in runs[version])
                row["all_seconds"] = [w for w, _ in runs[version]]
    doc = {"benchmark": "whitebox_speed", "parameters": params, "widths": WIDTHS, "marking_steps": steps,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                       "load_average_before": load_before, "load_average_after": os.getloadavg()},
           "target_seconds": 2.0, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"model: {params / 1e6:.1f}M parameters, marked layer {emb.layer} ({steps} marking steps)")
    print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    print(f"{'suspect':14s} {'verifier':18s} {'wall s':>7s} {'cpu s':>7s} {'log10 p':>9s} {'BER':>6s} detected")
    for r in results.values():
        print(f"{r['suspect']:14s} {r['verifier']:18s} {r['best_seconds']:7.2f} {r['best_cpu_seconds']:7.2f} "
              f"{r['log10_p']:9.2f} {r['bit_error_rate']:6.3f} {r['detected']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
