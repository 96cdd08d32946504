"""Lookahead trigger embedding on a BatchNorm residual network: how many triggers it learns against mixing.

``resnet-small`` on 3,000 Fashion-MNIST images as 3×32×32: a 2-epoch base (Adam 1e-3), then the key's 100
triggers embedded over ``--epochs`` epochs (Adam 5e-4, batch 64) from the same base and data order, per mode:

* ``la``: the library's lookahead (radius 0.05, 4 triggers per step; batch norms on running statistics in the
  trigger pass); ``la-train``: the same with the batch norms left in training mode (the behaviour before);
* ``lar<R>``: lookahead at radius R; ``mix``: 8 triggers mixed into each batch.

Reports the share of triggers the embedded model answers with their labels and its accuracy on 1,000 test
images. Run: ``python benchmarks/research/lookahead_batchnorm.py [--epochs 6] [--modes la la-train mix]``;
writes ``benchmarks/results/research_lookahead_batchnorm.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from keykit import seeded_key

import wmark.schemes.trigger_lookahead as lookahead
from benchmarks.common import RESULTS, table
from wmark.data import load_dataset
from wmark.embed import Watermarker
from wmark.models import build_model
from wmark.schemes.trigger_set import generate_triggers
from wmark.training import accuracy, make_loader, train_epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--modes", nargs="+", default=["la", "la-train", "lar0.001", "mix"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    ds = load_dataset("fashion-mnist-rgb32@owner").subset(max_samples=3000)
    x_test, y_test = ds.x_test[:1000], ds.y_test[:1000]
    torch.manual_seed(0)
    base = build_model("resnet-small", num_classes=10, input_shape=(3, 32, 32), seed=0)
    train_epochs(base, make_loader(ds.x_train, ds.y_train, batch_size=64, seed=0), epochs=2,
                 optimizer=torch.optim.Adam(base.parameters(), lr=1e-3), device=cpu)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    key = seeded_key("resnet/la", num_classes=10, input_shape=(3, 32, 32), num_triggers=100)
    triggers = generate_triggers(key)
    running = lookahead._running_statistics
    rows = [{"mode": "base", "trigger_acc": None, "test_acc": round(accuracy(base, x_test, y_test), 4)}]
    for mode in args.modes:
        lookahead._running_statistics = ((lambda model: contextlib.nullcontext()) if mode.endswith("-train")
                                         else running)
        radius = 0.0 if mode == "mix" else float(mode.split("-")[0][3:]) if mode.startswith("lar") else None
        model = build_model("resnet-small", num_classes=10, input_shape=(3, 32, 32), seed=0)
        model.load_state_dict(state)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
        wm = Watermarker(key, trigger_lookahead=radius)
        model, optimizer, loader = wm.attach(model=model, optimizer=optimizer,
                                             data_loader=make_loader(ds.x_train, ds.y_train, batch_size=64, seed=1))
        start = time.perf_counter()
        train_epochs(model, loader, epochs=args.epochs, optimizer=optimizer, device=cpu)
        wm.detach()
        with torch.no_grad():
            learnt = (model.eval()(triggers.inputs).argmax(1) == triggers.labels).float().mean().item()
        rows.append({"mode": mode, "trigger_acc": round(learnt, 3), "test_acc": round(accuracy(model, x_test, y_test), 4),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    lookahead._running_statistics = running
    print(table(rows, ["mode", "trigger_acc", "test_acc", "seconds"]))
    path = RESULTS / "research_lookahead_batchnorm.json"
    path.write_text(json.dumps({"epochs": args.epochs, "train": 3000, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
