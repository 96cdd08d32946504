"""White-box watermark on the Fashion-MNIST CNN: fidelity, BER, robustness to attacks, independent models.

Trains a base model on the owner's half of Fashion-MNIST, fine-tunes it twice with the same seed and data
order (with and without the 256-bit weight watermark), attacks the marked model the ways a thief would and
verifies every copy with :func:`wmark.whitebox.verify.verify_whitebox` at alpha = 1e-6, aligned to the
reference and (columns "anchor") to the unmarked base model. Independently
trained models (different seeds and data) and an unmarked fine-tune of the very same base model must not be
detected. Models are cached under ``benchmarks/cache/whitebox`` (git-ignored).

Independent models are trained on 5k images for 1 epoch (different seeds, half on the owner's data, half on
the thief's) to keep CPU low. Run: ``nice -n 10 python benchmarks/whitebox_robustness.py``.
Writes ``benchmarks/results/whitebox_robustness.json``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from wmark.attacks import finetune, noise, permute, prune, quantize, rename_tensors
from wmark.data import load_dataset
from wmark.embed import Watermarker
from wmark.io import save_model, save_tensors
from wmark.keys import generate_key, load_key, save_key
from wmark.models import build_model, load_model
from wmark.training import accuracy, make_loader, train_epochs
from wmark.whitebox.verify import verify_whitebox

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "whitebox"
RESULTS = ROOT / "results" / "whitebox_robustness.json"
ARCH = "fmnist-cnn"
ALPHA = 1e-6
SHAPE = (1, 28, 28)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int,
           wm: Watermarker | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if wm is not None:
        model, optimizer, _ = wm.attach(model=model, optimizer=optimizer)
    try:
        train_epochs(model, make_loader(x, y, seed=seed), epochs=epochs, optimizer=optimizer)
    finally:
        if wm is not None:
            wm.detach()
    return model


def _cached(path: Path, make: Any, metadata: dict[str, Any] | None = None) -> torch.nn.Module:
    if path.exists():
        return load_model(ARCH, path)[0]
    model = make()
    save_model(model, path, metadata={"arch": ARCH, "num_classes": 10, "input_shape": list(SHAPE), **(metadata or {})})
    return model


def _int8_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Raw int8 weights without their scales, as an int8 deployment stores them (biases kept as float)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("weight") and t.dim() >= 2:
            scale = t.reshape(t.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) / 127
            out[name] = torch.round(t / scale.view(-1, *[1] * (t.dim() - 1))).clamp(-127, 127).to(torch.int8)
        else:
            out[name] = t
    return out


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    ds = load_dataset("fashion-mnist")
    owner, thief = ds.split(owner_fraction=0.5, seed=0)
    thief10k = thief.subset(max_samples=10_000)
    key_path = CACHE / "owner.key"
    if not key_path.exists():
        save_key(generate_key(owner="Benchmark Owner"), key_path)
    key = load_key(key_path)
    xt, yt = ds.x_test, ds.y_test
    start = time.perf_counter()

    base = _cached(CACHE / "base.safetensors", lambda: _train(
        build_model(ARCH, num_classes=10, input_shape=SHAPE, seed=0), owner.x_train, owner.y_train,
        epochs=2, lr=1e-3, seed=0))
    fidelity = []
    marked_path = CACHE / "marked_s1.safetensors"
    for seed in (1,):
        plain = _cached(CACHE / f"plain_s{seed}.safetensors", lambda s=seed: _train(
            load_model(ARCH, CACHE / "base.safetensors")[0], owner.x_train, owner.y_train, epochs=2, lr=5e-4, seed=s))
        path = CACHE / f"marked_s{seed}.safetensors"
        if not path.exists():
            wm = Watermarker(key, schemes=("weights",))
            m = _train(load_model(ARCH, CACHE / "base.safetensors")[0], owner.x_train, owner.y_train,
                       epochs=2, lr=5e-4, seed=seed, wm=wm)
            save_model(m, path, metadata={"arch": ARCH, "num_classes": 10, "input_shape": list(SHAPE),
                                          **wm.metadata()})
        m = load_model(ARCH, path)[0]
        fidelity.append({"seed": seed, "unmarked_accuracy": accuracy(plain, xt, yt), "marked_accuracy": accuracy(m, xt, yt)})
    marked = load_model(ARCH, marked_path)[0]
    marked_acc = accuracy(marked, xt, yt)

    rows: list[dict[str, Any]] = []

    def check(name: str, tensors_or_model: Any, acc: float | None, *, group: str = "attack") -> None:
        path = CACHE / f"suspect_{name.replace(' ', '_').replace('%', 'pct').replace('+', '_')}.safetensors"
        if isinstance(tensors_or_model, torch.nn.Module):
            save_model(tensors_or_model, path)
        else:
            save_tensors(tensors_or_model, path)
        t0 = time.perf_counter()
        verdict = verify_whitebox(key=key, reference=marked_path, suspect=path, alpha=ALPHA)
        seconds = time.perf_counter() - t0
        test = verdict.tests[0]
        # The recommended path: align to the unmarked base (null exact by construction).
        anchored = verify_whitebox(key=key, reference=marked_path, suspect=path, alpha=ALPHA,
                                   anchor=CACHE / "base.safetensors")
        rows.append({
            "group": group, "suspect": name, "accuracy": acc, "detected": verdict.detected,
            "log10_p": verdict.log10_p, "bit_error_rate": test.details["bit_error_rate"],
            "candidates": test.details["candidates"], "alignment_similarity": test.details["alignment_similarity"],
            "verify_seconds": seconds, "anchor_detected": anchored.detected, "anchor_log10_p": anchored.log10_p,
            "anchor_bit_error_rate": anchored.tests[0].details["bit_error_rate"],
            "anchor_alignment_similarity": anchored.tests[0].details["alignment_similarity"],
        })

    check("marked (no attack)", marked, marked_acc)
    check("marked fp16", {k: v.half() for k, v in marked.state_dict().items()}, marked_acc)
    check("marked bf16", {k: v.bfloat16() for k, v in marked.state_dict().items()}, marked_acc)
    check("int8 tensors (no scales)", _int8_tensors(marked), None)
    for layers in ("all",):
        ft = finetune(marked, x=thief10k.x_train, y=thief10k.y_train, epochs=5, lr=1e-3, layers=layers, seed=7)
        check(f"finetune {layers} 5ep 10k", ft, accuracy(ft, xt, yt))
    for sparsity in (0.3, 0.5, 0.7):
        pr = prune(marked, sparsity=sparsity)
        check(f"prune {int(sparsity * 100)}%", pr, accuracy(pr, xt, yt))
    q = quantize(marked, bits=8)
    check("quantize int8", q, accuracy(q, xt, yt))
    for std in (0.1, 0.2, 0.3, 0.5):
        nz = noise(marked, std=std, seed=3)
        check(f"noise std {std}", nz, accuracy(nz, xt, yt))
    pm = permute(marked, seed=11)
    check("permute + rescale", pm, accuracy(pm, xt, yt))
    check("rename", rename_tensors(marked.state_dict(), seed=5), marked_acc)
    check("permute + rename", rename_tensors(pm.state_dict(), seed=6), accuracy(pm, xt, yt))
    combo = finetune(prune(permute(marked, seed=12), sparsity=0.5), x=thief10k.x_train, y=thief10k.y_train,
                     epochs=5, lr=1e-3, seed=8)
    check("permute + prune 50% + finetune 5ep", combo, accuracy(combo, xt, yt))

    plain1 = load_model(ARCH, CACHE / "plain_s1.safetensors")[0]
    check("unmarked fine-tune of the same base", plain1, accuracy(plain1, xt, yt), group="independent")
    check("unmarked base", base, accuracy(base, xt, yt), group="independent")
    for i in range(10):
        data = thief if i % 2 == 0 else owner
        source = "thief" if i % 2 == 0 else "owner"
        ind = _cached(CACHE / f"independent_{i}.safetensors", lambda i=i, data=data: _train(
            build_model(ARCH, num_classes=10, input_shape=SHAPE, seed=100 + i), data.x_train[:5_000],
            data.y_train[:5_000], epochs=1, lr=1e-3, seed=100 + i))
        check(f"independent seed {100 + i} ({source} data)", ind, accuracy(ind, xt, yt), group="independent")
        if i < 2:
            pi = permute(ind, seed=200 + i)
            check(f"independent seed {100 + i} permuted", pi, accuracy(pi, xt, yt), group="independent")

    independents = [r for r in rows if r["group"] == "independent"]
    doc = {
        "benchmark": "whitebox_robustness",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()},
        "arch": ARCH, "bits": 256, "alpha": ALPHA,
        "fidelity": fidelity,
        "fidelity_gap_pp": [100 * (f["marked_accuracy"] - f["unmarked_accuracy"]) for f in fidelity],
        "marked_bit_error_rate": rows[0]["bit_error_rate"],
        "rows": rows,
        "independent_min_log10_p": min(r["log10_p"] for r in independents),
        "independent_detected": sum(r["detected"] for r in independents),
        "independent_min_anchor_log10_p": min(r["anchor_log10_p"] for r in independents),
        "independent_anchor_detected": sum(r["anchor_detected"] for r in independents),
        "seconds": time.perf_counter() - start,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    for f in fidelity:
        print(f"fidelity seed {f['seed']}: unmarked {f['unmarked_accuracy']:.4f}  marked {f['marked_accuracy']:.4f}  "
              f"gap {100 * (f['marked_accuracy'] - f['unmarked_accuracy']):+.2f} pp")
    print(f"{'suspect':44s} {'acc':>7s} {'BER':>6s} {'log10 p':>9s} {'cand':>4s} {'detected':>8s} "
          f"{'anchor BER':>10s} {'log10 p':>9s} {'detected':>8s}")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "   -  "
        lp = r["log10_p"] if math.isfinite(r["log10_p"]) else -999
        alp = r["anchor_log10_p"] if math.isfinite(r["anchor_log10_p"]) else -999
        print(f"{r['suspect']:44s} {acc:>7s} {r['bit_error_rate']:6.3f} {lp:9.2f} {r['candidates']:4d} "
              f"{r['detected']!s:>8s} {r['anchor_bit_error_rate']:10.3f} {alp:9.2f} {r['anchor_detected']!s:>8s}")
    print(f"independent models: {len(independents)}, detected {doc['independent_detected']} "
          f"(with anchor {doc['independent_anchor_detected']}), min log10 p {doc['independent_min_log10_p']:.2f} "
          f"(with anchor {doc['independent_min_anchor_log10_p']:.2f})")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
