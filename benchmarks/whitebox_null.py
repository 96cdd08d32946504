"""Calibration of the white-box test under the null: is P(p <= t) <= t for models that never saw the key?

Each pair is one fresh 64-bit key and a small CNN (conv 4 → conv 16 → fc 32 → fc 10 on 1×16×16 inputs, a
synthetic task) marked with it: an unmarked *base* is trained a few steps, then fine-tuned with the weight
watermark into the *reference*. The suspect never saw the key and is one of two kinds, alternating:

- ``independent``: its own initialisation and data order;
- ``same base``: a fine-tune of the reference's own base model (without the key), then every hidden neuron
  permuted and rescaled. This is the hardest honest case: its layers sit right next to the reference's.

Every suspect is verified twice: aligned to the reference's earlier layers (trained together with the
marked layer, so exactness is an empirical question) and aligned to the unmarked base passed as
``anchor`` (key-independent, so the null is exact by construction). For each threshold t the table gives
the fraction of pairs with uncorrected p <= t, its one-sided 95 % Clopper-Pearson upper bound, and
P(Binomial(n, t) >= count), the probability of seeing that many under a calibrated test (small = too many).

Run: ``nice -n 10 python benchmarks/whitebox_null.py [--pairs 400]``; writes
``benchmarks/results/whitebox_null.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from wmark.attacks import permute_state_dict
from wmark.io import save_model
from wmark.keys import default_schemes, generate_key
from wmark.schemes.weights import WeightsEmbedder
from wmark.stats import clopper_pearson_upper
from wmark.whitebox.verify import verify_whitebox

RESULTS = Path(__file__).resolve().parent / "results" / "whitebox_null.json"
THRESHOLDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
CHAIN = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
BITS = 64


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _model(seed: int, state: dict[str, torch.Tensor] | None = None) -> _TinyCNN:
    torch.manual_seed(seed)
    model = _TinyCNN()
    if state is not None:
        model.load_state_dict(state)
    return model


def _train(model: nn.Module, *, steps: int, seed: int, embedder: WeightsEmbedder | None = None) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 16, 16, generator=gen)
    teacher = torch.randn(16, 10, generator=torch.Generator().manual_seed(1234))
    y = ((nn.functional.avg_pool2d(x, 4).flatten(1) - 0.5) @ teacher).argmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    handle = optimizer.register_step_pre_hook(embedder.hook) if embedder is not None else None
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    if handle is not None:
        handle.remove()
    return model


def _pair(i: int, d: Path, *, mark_steps: int) -> dict[str, Any]:
    schemes = default_schemes(10)
    schemes["weights"] = dict(schemes["weights"], bits=BITS)
    key = generate_key(owner=f"Null {i}", input_shape=(1, 16, 16), num_triggers=10, schemes=schemes)
    base = _train(_model(1000 + i), steps=5, seed=i)
    save_model(base, d / "base.safetensors")
    marked = _model(0, base.state_dict())
    emb = WeightsEmbedder(key, marked)
    _train(marked, steps=mark_steps, seed=i, embedder=emb)
    save_model(marked, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    kind = "independent" if i % 2 else "same base"
    if kind == "independent":
        suspect = _train(_model(5000 + i), steps=10, seed=7 * i + 1)
    else:
        suspect = _train(_model(0, base.state_dict()), steps=10, seed=9 * i + 2)
        suspect.load_state_dict(permute_state_dict(suspect.state_dict(), chain=CHAIN, seed=i))
    save_model(suspect, d / "sus.safetensors")
    row: dict[str, Any] = {"pair": i, "kind": kind, "reference_bit_errors": emb.bit_errors()}
    for aligned, anchor in (("reference", None), ("anchor", d / "base.safetensors")):
        verdict = verify_whitebox(key=key, reference=d / "ref.safetensors", suspect=d / "sus.safetensors",
                                  anchor=anchor)
        row[aligned] = verdict.tests[0].details["log10_p_uncorrected"]
    return row


def _table(log10_ps: list[float]) -> list[dict[str, float]]:
    p = 10.0 ** np.asarray(log10_ps)
    n = len(p)
    rows = []
    for t in THRESHOLDS:
        k = int(np.sum(p <= t))
        rows.append({"t": t, "count": k, "n": n, "fraction": k / n,
                     "upper_95": clopper_pearson_upper(k, n, 0.95),
                     "p_excess": float(stats.binom.sf(k - 1, n, t))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--mark-steps", type=int, default=25, help="watermarking fine-tune steps per reference")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            rows.append(_pair(i, Path(tmp), mark_steps=args.mark_steps))
    seconds = time.perf_counter() - start
    groups: dict[str, dict[str, Any]] = {}
    for aligned in ("reference", "anchor"):
        for kind in ("all", "independent", "same base"):
            values = [r[aligned] for r in rows if kind in ("all", r["kind"])]
            groups[f"{aligned} | {kind}"] = {"aligned_to": aligned, "suspects": kind, "n": len(values),
                                             "min_log10_p": min(values), "thresholds": _table(values)}
    doc = {"benchmark": "whitebox_null", "pairs": args.pairs, "bits": BITS, "mark_steps": args.mark_steps,
           "seconds": seconds, "max_reference_bit_errors": max(r["reference_bit_errors"] for r in rows),
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "load_average_after": os.getloadavg()},
           "groups": groups, "pairs_log10_p": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.pairs} pairs, {BITS} bits, {args.mark_steps} marking steps, {seconds:.0f}s")
    print("fraction of pairs with p <= t [95 % Clopper-Pearson upper bound]; * = P(Bin(n,t) >= count) < 0.01")
    print(f"{'aligned to | suspects':28s} {'n':>4s} {'min log10p':>10s} " + " ".join(f"{t:>14g}" for t in THRESHOLDS))
    for name, g in groups.items():
        cells = " ".join(f"{r['fraction']:6.3f} [{r['upper_95']:.3f}]{'*' if r['p_excess'] < 0.01 else ' '}"
                         for r in g["thresholds"])
        print(f"{name:28s} {g['n']:4d} {g['min_log10_p']:10.2f} {cells}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
