"""Shared benchmark plumbing: a disk cache of trained models keyed by configuration, machine info, results."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("WMARK_BENCH_CACHE", ROOT / "cache"))
RESULTS = Path(os.environ.get("WMARK_BENCH_RESULTS", ROOT / "results"))


def cached(config: dict[str, Any], make: Callable[[Path], None]) -> Path:
    """Return the cached file for ``config``, calling ``make(path)`` first if it is not there yet."""
    CACHE.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{config.get('name', 'model')}-{digest}.safetensors"
    if not path.exists():
        make(path)
    return path


def shared_key(k: int, keys_dir: Path | None, make: Callable[[], Any]) -> Any:
    """Key ``k``: ``make()`` fresh, or shared through ``keys_dir`` (``k{k}.key`` loaded when there, else written
    there, 0600), so that settings can be compared in separate processes on the same keys."""
    from wmark.keys import load_key, save_key

    if keys_dir is None:
        return make()
    path = keys_dir / f"k{k}.key"
    if path.exists():
        return load_key(path)
    keys_dir.mkdir(parents=True, exist_ok=True)
    key = make()
    save_key(key, path)
    return key


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns``."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(name: str, doc: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (with machine info) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **doc}, indent=2, sort_keys=True) + "\n")
    return path


def extraction_victim(owner_data: str) -> tuple[Path, Any, Path]:
    """The extraction benchmarks' shared owner: a cached key and a trigger-marked victim CNN.

    Returns the key file, the loaded key and the victim's model file.
    """
    from wmark import api
    from wmark.keys import generate_key, load_key, save_key

    CACHE.mkdir(parents=True, exist_ok=True)
    key_path = CACHE / "extraction-owner.key"
    if not key_path.exists():
        save_key(generate_key(owner="Benchmark Owner"), key_path)
    key = load_key(key_path)
    base = cached({"name": "base-cnn", "data": owner_data, "epochs": 2, "seed": 0},
                  lambda p: api.train(arch="fmnist-cnn", data=owner_data, out=p, epochs=2, seed=0))
    victim = cached({"name": "extraction-victim", "key": key.fingerprint(), "epochs": 2},
                    lambda p: api.embed(key=key_path, arch="fmnist-cnn", weights=base, data=owner_data, out=p,
                                        epochs=2))
    return key_path, key, victim


def extraction_independents() -> list[tuple[str, str, Path]]:
    """The extraction benchmarks' independent models (name, arch, cached file): other seeds, two other
    architectures, one trained with true labels on all the attacker's images, one on the owner's data."""
    attacker, owner = "fashion-mnist@attacker", "fashion-mnist@owner"
    configs = [(f"cnn seed {s}", "fmnist-cnn", {"data": attacker, "max_samples": 10_000, "epochs": 6, "seed": s})
               for s in range(1, 6)] + [
        ("mlp seed 1", "fmnist-mlp", {"data": attacker, "max_samples": 10_000, "epochs": 6, "seed": 1}),
        ("mlp seed 2", "fmnist-mlp", {"data": attacker, "max_samples": 10_000, "epochs": 6, "seed": 2}),
        ("wide cnn seed 1", "fmnist-cnn-wide", {"data": attacker, "max_samples": 10_000, "epochs": 2, "seed": 1}),
        ("cnn, all 30k attacker images, true labels", "fmnist-cnn",
         {"data": attacker, "max_samples": None, "epochs": 3, "seed": 11}),
        ("cnn, owner's data (other seed)", "fmnist-cnn", {"data": owner, "max_samples": None, "epochs": 2, "seed": 12}),
    ]
    from wmark import api

    return [(name, arch, cached({"name": "extraction-indep", "arch": arch, **cfg},
                                lambda p, arch=arch, cfg=cfg: api.train(arch=arch, out=p, **cfg)))
            for name, arch, cfg in configs]


def extraction_copy(key: Any, victim: Path) -> Path:
    """A copy of the extraction victim fine-tuned by the attacker (2 epochs on 10k of their images), cached."""
    from wmark import api

    return cached({"name": "extraction-copy", "key": key.fingerprint(), "epochs": 2},
                  lambda p: api.attack(kind="finetune", arch="fmnist-cnn", weights=victim, out=p,
                                       data="fashion-mnist@attacker", epochs=2, max_samples=10_000, seed=3))


# The tie-break benchmarks' thieves (name, architecture, labels) and what "in scope" means for them.
TIEBREAK_THIEVES = (("hard", "fmnist-cnn", "hard"), ("soft", "fmnist-cnn", "soft"), ("mlp-hard", "fmnist-mlp", "hard"))
TIEBREAK_REFERENCE_ARCHS = ("fmnist-cnn", "fmnist-mlp")
SCOPE_PP, SCOPE_CAP = 5.0, 40


@dataclass
class TieBreakSetting:
    """What the tie-break benchmarks share: the extraction victim served with its scores, the owner's inputs,
    the attacker's split and its held-out test set, and the in-scope stopping rule."""

    owner_key: Any
    victim_path: Path
    victim: torch.nn.Module
    served: Any
    x_owner: Any
    attacker: Any
    xt: Any
    yt: Any
    victim_accuracy: float
    in_scope: Callable[..., bool]


def tiebreak_setting() -> TieBreakSetting:
    """Load the shared tie-break setting; a thief is in scope from its first epoch within ``SCOPE_PP`` of the
    victim's accuracy on the attacker's test images."""
    from wmark.attacks.extract import accuracy_reached
    from wmark.data import load_dataset
    from wmark.models import load_model
    from wmark.suspects import LocalSuspect

    owner_data, attacker_data = "fashion-mnist@owner", "fashion-mnist@attacker"
    _, owner_key, victim_path = extraction_victim(owner_data)
    owner, attacker = load_dataset(owner_data), load_dataset(attacker_data)
    victim, _ = load_model("fmnist-cnn", victim_path)
    served = LocalSuspect(victim, input_shape=(1, 28, 28), description="victim", expose_scores=True)
    xt, yt = attacker.x_test.numpy(), attacker.y_test.numpy()
    victim_accuracy = float((served.query(xt).labels == yt).mean())
    return TieBreakSetting(owner_key=owner_key, victim_path=victim_path, victim=victim, served=served,
                           x_owner=owner.x_train.numpy(), attacker=attacker, xt=xt, yt=yt,
                           victim_accuracy=victim_accuracy,
                           in_scope=accuracy_reached(xt, yt, victim_accuracy - SCOPE_PP / 100))


def cached_references(setting: Any, repeats: dict[str, int]) -> list[tuple[str, torch.nn.Module]]:
    """The reference surrogates distilled from the unmarked victim (key-free), trained once and cached."""
    from wmark.io import load_tensors, save_tensors, wmark_metadata
    from wmark.models import build_model

    def make(path: Path) -> None:
        from wmark.schemes.tiebreak import train_reference_surrogates

        nets = train_reference_surrogates(served=setting.served, x=setting.x_owner, archs=TIEBREAK_REFERENCE_ARCHS,
                                          **repeats)
        save_tensors({f"{i}/{n}": t for i, (_, net) in enumerate(nets) for n, t in net.state_dict().items()}, path,
                     metadata={"archs": [arch for arch, _ in nets]})

    path = cached({"name": "tiebreak-references", "victim": str(setting.victim_path.name), **repeats}, make)
    tensors, raw = load_tensors(path)
    out = []
    for i, arch in enumerate(wmark_metadata(raw)["archs"]):
        net = build_model(arch, num_classes=10, input_shape=(1, 28, 28))
        net.load_state_dict({n.split("/", 1)[1]: t for n, t in tensors.items() if n.startswith(f"{i}/")})
        out.append((arch, net.eval()))
    return out
