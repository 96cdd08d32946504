"""The gauntlet's model families: what each one trains, marks, attacks and checks (see ``gauntlet.py``).

Three families:

* ``cnn`` — ``fmnist-cnn`` on Fashion-MNIST 1×28×28 (the original gauntlet; its plan is unchanged);
* ``resnet`` — ``resnet-small`` (BatchNorm, residual adds) on Fashion-MNIST as 3×32×32. Neuron permutation
  is the residual-stream permutation of :func:`wmark.attacks.symmetry.permute_spaces` (the plain-chain
  permutation refuses a residual net), and BatchNorm folding is added;
* ``text`` — ``tiny-bert`` (a 2-layer BERT from scratch over MiniLM's vocabulary) on Debian fortunes
  (8 classes) with a text key. Hidden-space + attention-head permutation and fused QKV replace the image
  rewrites; thieves distil ``tiny-bert`` and ``text-bow`` surrogates from the API's answers to their own third.

What the library does not support for a family is refused with a stated reason (:attr:`Family.refused`),
never run as a cell: see :func:`family`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wmark.keys import Key, default_schemes

FULL_ROW = "trigger+weights+api-tiebreak"
EARLY_STOP_EPOCHS = 6

SCHEMES = ["none", "trigger", "weights", "trigger+weights", "api-mark", "trigger+api-mark", FULL_ROW]
EMBEDS: dict[str, tuple[str, ...]] = {
    "none": (), "trigger": ("trigger",), "weights": ("weights",), "trigger+weights": ("trigger", "weights"),
    "api-mark": (), "trigger+api-mark": ("trigger",), FULL_ROW: ("trigger", "weights"),
}


@dataclass
class Plan:
    """What one run does; ``quick`` is a small subset for CI smoke runs."""

    owner_samples: int | None
    attacker_samples: int
    base_epochs: int
    embed_epochs: int
    attack_epochs: int
    extract_queries: int
    extract_epochs: int
    attacks: list[str]
    null_models: list[tuple[str, int, int | None, int]] = field(default_factory=list)
    # reference surrogates of the tie-break rule: architectures and seeds per recipe (None: the library's)
    tiebreak_references: tuple[str, ...] = ("fmnist-cnn", "fmnist-mlp")
    tiebreak_reference_repeats: int | None = None
    # the rows a run measures by default (None: every row of the family)
    rows: list[str] | None = None
    early_stop_epochs: int = EARLY_STOP_EPOCHS
    # image families: train on the first ``slice_data[0]`` training and test on the first ``slice_data[1]`` test
    # images (a smoke run: every accuracy of a resnet over the whole 10k test set costs ~15 CPU seconds)
    slice_data: tuple[int, int] | None = None
    # triggers mixed into each embedding step (None: the library's default); a family trained on fewer images
    # takes fewer steps and needs more triggers per step to learn them
    trigger_per_batch: int | None = None
    # the trigger embedding's lookahead radius (None: the library's default; 0 mixes the triggers into the batches)
    trigger_lookahead: float | None = None
    # the rows the extraction attacks run on (None: every row); a smoke run keeps the control and the full row
    extract_rows: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Family:
    """One model family: its architecture, data, key shape, rows, surrogates and refusals."""

    name: str
    arch: str
    owner: str
    attacker: str
    num_classes: int
    input_shape: tuple[int, ...]
    rows: tuple[str, ...]
    full_row: str
    # extraction attack -> (labels, the thief's architecture)
    surrogates: dict[str, tuple[str, str]]
    # attack -> the steps applied to the source model (api.attack kinds or this module's rewrites)
    steps: dict[str, list[dict[str, Any]]]
    # what the library cannot run on this family, with the reason (rows, attacks or tests)
    refused: dict[str, str]
    whitebox: bool
    text: bool = False
    # attacks whose file no longer loads into the architecture but computes the same function: black-box tests
    # query the file before that step ("step0": the previous step's output, "source": the attacked model)
    twins: dict[str, str] = field(default_factory=lambda: {"rename": "step0"})

    def stem(self, quick: bool) -> str:
        """Results file stem: the cnn family keeps the original ``gauntlet[-quick]`` names."""
        base = "gauntlet" if self.name == "cnn" else f"gauntlet-{self.name}"
        return f"{base}-quick" if quick else base

    def cache_dir(self, root: Path, quick: bool, seed: int) -> Path:
        mode = "quick" if quick else "full"
        parts = (mode,) if self.name == "cnn" else (self.name, mode)
        return root.joinpath("gauntlet", *parts, f"seed{seed}")

    def key(self, seed: int) -> Key:
        """A key whose secret is derived from the seed, so two runs with the same seed are identical."""
        secret = hashlib.sha256(f"wmark-gauntlet-key/{seed}".encode()).digest()
        if self.name != "cnn":
            secret = hashlib.sha256(secret + self.name.encode()).digest()
        modality = None
        schemes = default_schemes()
        if self.text:
            from wmark.text import MINILM, load_tokenizer, text_modality

            modality = text_modality(tokenizer=load_tokenizer(MINILM), name=MINILM, max_length=64)
            schemes = default_schemes(kind="text")
            # tiny-bert's widest layer reads 64 MLP neurons per row: room for 32 bits (two columns a bit)
            schemes["weights"] = dict(schemes["weights"], bits=32)
        return Key(owner="Gauntlet Owner", secret=secret, num_classes=self.num_classes, input_shape=self.input_shape,
                   schemes=schemes, created="2026-01-01T00:00:00+00:00", modality=modality)

    def plan(self, quick: bool) -> Plan:
        return {"cnn": _cnn_plan, "resnet": _resnet_plan, "text": _text_plan}[self.name](quick)


def _weight_steps(epochs: int, permute: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Fine-tuning, pruning, quantization, noise and the family's permutation (with renaming, combined)."""
    return {
        "finetune": [{"kind": "finetune", "epochs": epochs, "layers": "all"}],
        "finetune-last": [{"kind": "finetune", "epochs": epochs, "layers": "last"}],
        "finetune-reinit-last": [{"kind": "finetune", "epochs": epochs, "layers": "reinit-last"}],
        "prune-30": [{"kind": "prune", "sparsity": 0.3}],
        "prune-50": [{"kind": "prune", "sparsity": 0.5}],
        "prune-70": [{"kind": "prune", "sparsity": 0.7}],
        "quantize-int8": [{"kind": "quantize", "bits": 8}],
        "noise": [{"kind": "noise", "std": 0.3}],
        "permute": [dict(permute, seed=1)],
        "rename": [dict(permute, seed=1), {"kind": "rename", "seed": 1}],
        "permute+prune-50+finetune": [dict(permute, seed=2), {"kind": "prune", "sparsity": 0.5},
                                      {"kind": "finetune", "epochs": epochs, "layers": "all"}],
    }


def family(name: str, attack_epochs: int) -> Family:
    """The family ``name`` with its attack steps for ``attack_epochs`` of fine-tuning."""
    image_rows = ("none", "trigger", "weights", "trigger+weights", "api-mark", "trigger+api-mark", FULL_ROW)
    if name == "cnn":
        return Family(
            name="cnn", arch="fmnist-cnn", owner="fashion-mnist@owner", attacker="fashion-mnist@attacker",
            num_classes=10, input_shape=(1, 28, 28), rows=image_rows, full_row=FULL_ROW,
            surrogates={"extract-hard": ("hard", "fmnist-cnn"), "extract-soft": ("soft", "fmnist-cnn"),
                        "extract-mlp": ("hard", "fmnist-mlp"), "extract-hard-early": ("hard", "fmnist-cnn")},
            steps=_weight_steps(attack_epochs, {"kind": "permute"}), refused={}, whitebox=True)
    if name == "resnet":
        steps = _weight_steps(attack_epochs, {"kind": "permute-spaces"})
        steps["bn-fold"] = [{"kind": "fold-batchnorm"}]
        return Family(
            name="resnet", arch="resnet-small", owner="fashion-mnist-rgb32@owner",
            attacker="fashion-mnist-rgb32@attacker", num_classes=10, input_shape=(3, 32, 32), rows=image_rows,
            full_row=FULL_ROW,
            # The thieves train small CNN/MLP surrogates: a resnet-small surrogate per row costs too much CPU here.
            surrogates={"extract-hard": ("hard", "fmnist-cnn"), "extract-soft": ("soft", "fmnist-cnn"),
                        "extract-mlp": ("hard", "fmnist-mlp"), "extract-hard-early": ("hard", "fmnist-cnn")},
            steps=steps, whitebox=True, twins={"rename": "step0", "bn-fold": "source"},
            refused={"neuron permutation + rescaling (plain chain)":
                     "wmark.attacks.permute refuses residual nets with BatchNorm; the residual-stream permutation "
                     "(wmark.attacks.symmetry.permute_spaces) takes its place as `permute`"})
    if name == "text":
        steps = _weight_steps(attack_epochs, {"kind": "permute-text"})
        steps["fused-qkv"] = [{"kind": "fuse-qkv", "seed": 1}]
        for dropped in ("rename", "finetune-reinit-last"):
            steps.pop(dropped)
        return Family(
            name="text", arch="tiny-bert", owner="fortunes@owner", attacker="fortunes@attacker", num_classes=8,
            input_shape=(64,), rows=("none", "trigger", "weights", "trigger+weights", FULL_ROW), full_row=FULL_ROW,
            surrogates={"extract-hard": ("hard", "tiny-bert"), "extract-soft": ("soft", "tiny-bert"),
                        "extract-bow": ("hard", "text-bow"), "extract-hard-early": ("hard", "tiny-bert")},
            steps=steps, whitebox=True, text=True, twins={"fused-qkv": "source"},
            refused={
                "api-mark, trigger+api-mark": "the flip mark serves image classifiers only (wmark refuses a text "
                                              "API: 'mark a text API with the tie-break mark')",
            })
    raise ValueError(f"Unknown family {name!r}; choose cnn, resnet or text.")


def _cnn_plan(quick: bool) -> Plan:
    arch = "fmnist-cnn"
    if quick:
        nulls = [(arch, s, 3000, 1) for s in (101, 102)] + [("fmnist-mlp", 103, 3000, 1)]
        # no reference surrogates: the rule commits the served model's nearest ties (a smoke run, in seconds)
        # each extraction trains a surrogate (about half the run): only the control's and the full row's; every
        # accuracy on 2000 test images, not 5000 (a third of the run went to scoring the test split)
        return Plan(owner_samples=8000, attacker_samples=3000, base_epochs=1, embed_epochs=2, attack_epochs=1,
                    extract_queries=3000, extract_epochs=8,
                    attacks=["none", "finetune", "prune-50", "quantize-int8", "permute", "extract-hard"],
                    null_models=nulls, tiebreak_references=(), extract_rows=("none", FULL_ROW),
                    slice_data=(16000, 4000))
    nulls = [(arch, 100 + s, n, 2) for s, n in enumerate([None, None, None, None, 20000, 20000, 10000, 10000,
                                                          5000, 5000, None, 20000])]
    nulls += [("fmnist-mlp", 120 + s, n, 2) for s, n in enumerate([None, 20000, 10000, 5000])]
    nulls += [("fmnist-cnn-wide", 130 + s, n, 2) for s, n in enumerate([None, 20000, 10000, 5000])]
    return Plan(owner_samples=None, attacker_samples=10000, base_epochs=2, embed_epochs=2, attack_epochs=5,
                extract_queries=10000, extract_epochs=20,
                attacks=["none", "finetune", "finetune-last", "finetune-reinit-last", "prune-30", "prune-50",
                         "prune-70", "quantize-int8", "noise", "permute", "rename", "permute+prune-50+finetune",
                         "extract-hard", "extract-soft", "extract-mlp", "extract-hard-early"],
                null_models=nulls, tiebreak_references=(arch, "fmnist-mlp"))


def _resnet_plan(quick: bool) -> Plan:
    # The triggers are mixed into the batches (lookahead 0): with the image default's separate trigger pass,
    # resnet-small kept 13 of 100 triggers (chance) after 2 epochs on 3000 images; mixed, 69 of 100.
    if quick:
        # the control and the full row only: a resnet embedding costs a minute per row on a loaded CPU
        nulls = [("resnet-small", 101, 400, 1), ("fmnist-cnn", 102, 400, 1)]
        return Plan(owner_samples=800, attacker_samples=400, base_epochs=1, embed_epochs=4, attack_epochs=1,
                    extract_queries=400, extract_epochs=3,
                    attacks=["none", "permute", "bn-fold", "extract-hard"],
                    null_models=nulls, tiebreak_references=(), rows=["none", FULL_ROW], early_stop_epochs=2,
                    slice_data=(1600, 1000), trigger_per_batch=16, trigger_lookahead=0.0)
    # A reduced scale (3000 images a side, fewer attacks than the cnn run): resnet-small trains ~10x slower here.
    nulls = [("resnet-small", 100 + s, n, 2) for s, n in enumerate([3000, 1500])]
    nulls += [("fmnist-cnn", 110 + s, n, 2) for s, n in enumerate([3000, 1500])]
    nulls += [("fmnist-mlp", 120, 3000, 2)]
    return Plan(owner_samples=3000, attacker_samples=3000, base_epochs=2, embed_epochs=2, attack_epochs=1,
                extract_queries=3000, extract_epochs=5,
                attacks=["none", "finetune", "finetune-last", "prune-50", "prune-70", "quantize-int8", "noise",
                         "permute", "bn-fold", "rename",
                         "permute+prune-50+finetune", "extract-hard", "extract-soft", "extract-mlp",
                         "extract-hard-early"],
                null_models=nulls, tiebreak_references=("fmnist-cnn", "fmnist-mlp"), tiebreak_reference_repeats=1,
                early_stop_epochs=2, trigger_lookahead=0.0)


def _text_plan(quick: bool) -> Plan:
    if quick:
        nulls = [("tiny-bert", 101, 300, 1), ("text-bow", 102, 300, 1)]
        # no trigger+weights row: the full row already combines both marks on the same model (a smoke run)
        return Plan(owner_samples=400, attacker_samples=300, base_epochs=1, embed_epochs=6, attack_epochs=1,
                    extract_queries=300, extract_epochs=2,
                    attacks=["none", "finetune", "prune-50", "permute", "fused-qkv", "extract-hard"],
                    null_models=nulls, tiebreak_references=(), rows=["none", "trigger", "weights", FULL_ROW],
                    early_stop_epochs=1)
    nulls = [("tiny-bert", 100 + s, n, 4) for s, n in enumerate([None, None, None, 1200, 1200, 600])]
    nulls += [("text-bow", 110 + s, n, 4) for s, n in enumerate([None, None, 1200, 600])]
    return Plan(owner_samples=None, attacker_samples=5000, base_epochs=6, embed_epochs=6, attack_epochs=3,
                extract_queries=5000, extract_epochs=6,
                attacks=["none", "finetune", "finetune-last", "prune-30", "prune-50", "prune-70", "quantize-int8",
                         "noise", "permute", "fused-qkv", "permute+prune-50+finetune", "extract-hard", "extract-soft",
                         "extract-bow", "extract-hard-early"],
                null_models=nulls, tiebreak_references=("text-bow", "tiny-bert"), tiebreak_reference_repeats=1,
                early_stop_epochs=3)


def sliced(fam: Family, plan: Plan, directory: Path) -> Family:
    """``fam`` on a data file of its first training and test images (``plan.slice_data``), split into the owner's
    and the attacker's halves as the full data is."""
    if plan.slice_data is None:
        return fam
    import dataclasses

    from wmark.data import load_dataset
    from wmark.io import save_tensors

    n_train, n_test = plan.slice_data
    path = directory / f"data-{n_train}-{n_test}.safetensors"
    if not path.exists():
        full = load_dataset(fam.owner.partition("@")[0])
        save_tensors({"x": full.x_train[:n_train], "y": full.y_train[:n_train], "x_test": full.x_test[:n_test],
                      "y_test": full.y_test[:n_test]}, path)
    return dataclasses.replace(fam, owner=f"{path}@owner", attacker=f"{path}@attacker")


def rewrite(kind: str, *, arch: str, weights: Path, out: Path, data: str | None, max_samples: int | None,
            seed: int) -> dict[str, Any]:
    """A function-preserving rewrite the generic attack command does not offer: the residual-stream / hidden
    permutation (with attention heads for text), BatchNorm folding, fused QKV. Returns the test accuracy of the
    rewritten model where it still runs in ``arch`` (folded and fused files are measured as the function they
    compute, which the rewrite keeps)."""
    from wmark.attacks import rename_tensors
    from wmark.attacks.symmetry import fold_batchnorm, fuse_qkv, permute_heads, permute_spaces
    from wmark.data import load_dataset
    from wmark.io import save_tensors, wmark_metadata
    from wmark.models import load_model
    from wmark.training import accuracy
    from wmark.whitebox.graph import read_graph

    model, metadata = load_model(arch, weights)
    meta = {k: v for k, v in wmark_metadata(metadata).items() if k in ("arch", "num_classes", "input_shape",
                                                                       "modality")}
    attacked: torch.nn.Module = model
    if kind == "permute-spaces":
        tensors = permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed)
        attacked.load_state_dict(tensors)
    elif kind == "permute-text":
        heads = int(model.encoder.config.num_attention_heads)  # type: ignore[union-attr]
        tensors = permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed,
                                 extra_readers={"hidden": ["head.weight"]})
        tensors = permute_heads(tensors, num_heads=heads, prefix="encoder.", seed=seed + 1)
        attacked.load_state_dict(tensors)
    elif kind == "fold-batchnorm":
        attacked = fold_batchnorm(model)
        tensors = attacked.state_dict()
    elif kind == "fuse-qkv":
        # fused and renamed: the file no longer loads into the architecture, as a converted checkpoint would not
        tensors = rename_tensors(fuse_qkv(model.state_dict(), prefix="encoder."), seed=seed)
    else:
        raise ValueError(f"Unknown rewrite {kind!r}.")
    acc = None
    if data is not None:
        ds = load_dataset(data).subset(max_samples=max_samples)
        acc = accuracy(attacked.eval(), ds.x_test, ds.y_test)
    save_tensors(tensors, out, metadata={**meta, "attack": {"kind": kind, "seed": seed}, "test_accuracy": acc})
    return {"out": str(out), "attack": kind, "test_accuracy": acc}


REWRITES = ("permute-spaces", "permute-text", "fold-batchnorm", "fuse-qkv")


def family_doc(fam: Family, plan: Plan) -> dict[str, Any]:
    """What a non-cnn family's run used and refused (the cnn gauntlet's documents stay as they were)."""
    return {"name": fam.name, "arch": fam.arch, "owner": fam.owner, "attacker": fam.attacker,
            "input_shape": list(fam.input_shape), "num_classes": fam.num_classes,
            "surrogates": {a: f"{labels} labels -> {arch}" for a, (labels, arch) in fam.surrogates.items()
                           if a in plan.attacks},
            "tiebreak_references": list(plan.tiebreak_references),
            "tiebreak_reference_repeats": plan.tiebreak_reference_repeats, "refused": fam.refused,
            "samples": {"owner": plan.owner_samples, "attacker": plan.attacker_samples},
            "slice": list(plan.slice_data) if plan.slice_data else None,
            "epochs": {"base": plan.base_epochs, "embed": plan.embed_epochs, "attack": plan.attack_epochs,
                       "extract": plan.extract_epochs, "extract_early": plan.early_stop_epochs},
            "extract_queries": plan.extract_queries}


def family_lines(fam: dict[str, Any] | None) -> list[str]:
    """The markdown paragraph on a non-cnn family: model, data, scale, thieves, the rule's references, refusals."""
    if not fam:
        return []
    n, e = fam["samples"], fam["epochs"]
    refs = ", ".join(fam["tiebreak_references"]) or "none (the served model's nearest ties)"
    lines = [f"Family `{fam['name']}`: `{fam['arch']}` on `{fam['owner']}` / `{fam['attacker']}` (inputs "
             f"{'x'.join(map(str, fam['input_shape']))}, {fam['num_classes']} classes); {n['owner'] or 'all'} owner and "
             f"{n['attacker']} attacker samples at most; epochs: base {e['base']}, embedding {e['embed']}, attacks "
             f"{e['attack']}, extraction {e['extract']} (early-stopped {e['extract_early']}) on {fam['extract_queries']} "
             f"queries. Thieves: " + "; ".join(f"{a}: {s}" for a, s in fam["surrogates"].items())
             + f". Tie-break rule's reference surrogates: {refs}"
             + (f", {fam['tiebreak_reference_repeats']} seed(s) per recipe" if fam["tiebreak_reference_repeats"] else "")
             + ".", ""]
    if fam.get("slice"):
        lines += [(f"Smoke-run data: the first {fam['slice'][0]} training images (split into the two halves) and "
                   f"the first {fam['slice'][1]} test images."), ""]
    if fam["refused"]:
        lines += ["Not run for this family (the library does not support it; no cell is shown for it):", ""]
        lines += [f"- {what}: {why}." for what, why in fam["refused"].items()] + [""]
    return lines
