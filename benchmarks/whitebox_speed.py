"""Time white-box verification of a ~27M-parameter model file, alignment included.

Synthesises an MLP 784 → 2048 → 4096 → 4096 → 10 (26.8M parameters), marks its 4096×4096 layer with a
256-bit key by optimising the scheme's regularizer, then verifies (a) a stolen copy (every hidden neuron
permuted and rescaled, small noise, stored as float16, names scrambled) and (b) an independent model of
the same shape, whose alignment is the slow case (few mutual nearest neighbours, a full assignment).
Times are wall-clock seconds of ``verify_whitebox`` from the files (reading, canonical form, alignment,
projection, test), best of 3.

Run: ``nice -n 10 python benchmarks/whitebox_speed.py``; writes ``benchmarks/results/whitebox_speed.json``.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from wmark.attacks import permute_state_dict, rename_tensors
from wmark.io import save_model, save_tensors
from wmark.keys import generate_key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.verify import verify_whitebox

RESULTS = Path(__file__).resolve().parent / "results" / "whitebox_speed.json"
WIDTHS = (784, 2048, 4096, 4096, 10)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(WIDTHS) - 1):
        layers += [nn.Linear(WIDTHS[i], WIDTHS[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
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
    times: dict[str, list[float]] = {"stolen copy": [], "independent": []}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        ref = Path(d) / "ref.safetensors"
        save_model(model, ref, metadata={"weights": emb.metadata(), "commitment": key.commitment()})
        state = permute_state_dict(model.state_dict(), chain=chain, seed=1)
        gen = torch.Generator().manual_seed(2)
        state = {n: (t + 0.01 * t.std() * torch.randn(t.shape, generator=gen)).half() for n, t in state.items()}
        save_tensors(rename_tensors(state, seed=3), Path(d) / "stolen copy.safetensors")
        save_model(_mlp(1), Path(d) / "independent.safetensors")
        for name in times:
            for _ in range(3):
                start = time.perf_counter()
                verdict = verify_whitebox(key=key, reference=ref, suspect=Path(d) / f"{name}.safetensors")
                times[name].append(time.perf_counter() - start)
            results[name] = {"detected": verdict.detected, "log10_p": verdict.log10_p,
                             "bit_error_rate": verdict.tests[0].details["bit_error_rate"],
                             "best_seconds": min(times[name]), "all_seconds": times[name]}
    doc = {"benchmark": "whitebox_speed", "parameters": params, "widths": WIDTHS, "marking_steps": steps,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "target_seconds": 2.0, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"model: {params / 1e6:.1f}M parameters, marked layer {emb.layer} ({steps} marking steps)")
    print(f"{'suspect':14s} {'seconds':>8s} {'log10 p':>9s} {'BER':>6s} detected")
    for name, r in results.items():
        print(f"{name:14s} {r['best_seconds']:8.2f} {r['log10_p']:9.2f} {r['bit_error_rate']:6.3f} {r['detected']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
