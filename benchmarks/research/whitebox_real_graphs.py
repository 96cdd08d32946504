"""What the white-box graph reader finds in real torchvision classifiers, and what its stricter rules cost.

For each classifier (random weights, ``weights=None``, eval mode) it runs
``wmark.whitebox.graph.read_graph(model, input_rank=4)`` and counts, over the conv/linear layers found, how many
read (input side) and write (output side) a ``free``, ``signed``, ``fixed`` or ``opaque`` space, and the units
that can be aligned: the sizes of the free and signed spaces some layer reads, and the layers ``plan`` accepts as
the marked one (``markable_layers``). It also checks the graph's claims on the real model: every space it calls
permutable is permuted at once (signed ones with random sign flips) and the largest change of the logits,
relative to their largest magnitude, is reported (``claims_break``: float noise, 1e-7 to 1e-5 on these nets,
where every claim holds). A name ending in ``+id`` reads the model with its stochastic-depth modules replaced by
the identity they are in eval mode.

``--before ROOT`` reads the same models with the library of another checkout (a ``git worktree`` of an older
commit) in a child process and prints both side by side. For every space that checkout calls permutable but
this one makes opaque, the child permutes that space alone in the real model and reports the change
(``newly_opaque``): far above float noise, the old claim was wrong and the new opacity is needed.

torchvision is no dependency of wmark: without it the script says so and exits. A torchvision wheel built for
CUDA installed beside a CPU build of torch fails to register its compiled detection ops; the classifiers need
none of them, so the script then imports torchvision without those registrations (``_meta_registrations``).

``PYTHONPATH=.:/path/to/torchvision python benchmarks/research/whitebox_real_graphs.py [--before ROOT]``
writes ``benchmarks/results/research_whitebox_real_graphs.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import torch

CHILD = "--child" in sys.argv
if not CHILD:
    # The child reads the library of another checkout, which its PYTHONPATH names: this one must not shadow it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MODELS = ("resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
          "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "densenet121", "squeezenet1_1",
          "shufflenet_v2_x0_5", "mnasnet0_5", "vgg11_bn", "googlenet", "inception_v3", "vit_b_16", "swin_t",
          "efficientnet_b0+id", "convnext_tiny+id", "swin_t+id")
SIDE = {"vit_b_16": 224, "inception_v3": 299}  # input sizes these need; 128 for the rest
KINDS = ("free", "signed", "fixed", "opaque")


def torchvision_models() -> Any:
    """``torchvision.models``, or None if torchvision cannot be imported."""
    try:
        from torchvision import models
    except ImportError:
        return None
    except RuntimeError:
        # Its compiled ops did not load against this torch (e.g. a CUDA wheel beside a CPU torch): the fake-kernel
        # registrations for them fail. The pure-Python classifiers use none of those ops.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        from torchvision import models
    return models


def build(models: Any, name: str) -> torch.nn.Module:
    """The classifier with random weights (seeded), in eval mode; GoogLeNet and Inception without aux heads.

    Its BatchNorm statistics are those of random inputs and no parameter is constant, so that the function checks
    see every unit.

    A name ending in ``+id`` has each ``StochasticDepth`` module replaced by ``nn.Identity``, which it is in eval
    mode: what the reader would find if it knew the op (``torchvision.ops.stochastic_depth`` is a leaf of the
    trace, which the reader makes opaque).
    """
    base = name.removesuffix("+id")
    extra = {"aux_logits": False, "init_weights": True} if base in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    model = getattr(models, base)(weights=None, **extra)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                # A constant start (a zero head, 1e-6 layer scales, unit gains, zero biases) would hide a wrong
                # permutation of what it reads: the function checks need every tensor to tell units apart.
                param.add_(0.1 * torch.randn_like(param))
        # BatchNorm statistics of random inputs, as training would set them: with the initial ones (mean 0,
        # variance 1) GoogLeNet's activations shrink to 1e-11, so no permutation would show in its logits.
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None
        side = SIDE.get(base, 128)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, side, side))
    model.eval()
    if name.endswith("+id"):
        for parent in list(model.modules()):
            for child_name, mod in parent.named_children():
                if type(mod).__name__ == "StochasticDepth":
                    setattr(parent, child_name, torch.nn.Identity())
    return model


def _change(model: torch.nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    other = copy.deepcopy(model)
    state = other.state_dict()  # keeps the version metadata that MNASNet's loader checks
    state.update(tensors)
    other.load_state_dict(state)
    with torch.no_grad():
        return float((other(x) - y).abs().max() / y.abs().max())


def census(models: Any, name: str, opaque_after: list[list[str]] | None) -> dict[str, Any]:
    """One model's row: how the reader reads it, and whether its claims keep the function."""
    from wmark.attacks.symmetry import free_spaces, permute_spaces
    from wmark.errors import UsageError
    from wmark.whitebox.graph import plan, read_graph

    model = build(models, name)
    start = time.perf_counter()
    try:
        g = read_graph(model, input_rank=4)
    except UsageError as exc:
        return {"model": name, "reads": False, "refusal": str(exc)}
    row: dict[str, Any] = {"model": name, "reads": True, "layers": len(g.layers),
                           "read_s": round(time.perf_counter() - start, 2)}
    for side in ("inp", "out"):
        kinds = Counter(g.spaces[getattr(lay, side)].kind for lay in g.layers)
        for kind in KINDS:
            row[f"{side}_{kind}"] = kinds.get(kind, 0)
    row["opaque_sides"] = row["inp_opaque"] + row["out_opaque"]
    permutable = free_spaces(g)
    row["aligned_units"] = sum(g.spaces[s].size for s in permutable)
    whys = Counter(g.spaces[getattr(lay, side)].why for lay in g.layers for side in ("inp", "out")
                   if g.spaces[getattr(lay, side)].kind == "opaque")
    row["why"] = dict(whys.most_common())
    markable = 0
    for lay in g.layers:
        try:
            plan(g, lay.name)
        except UsageError:
            continue
        markable += 1
    row["markable_layers"] = markable
    row["opaque"] = [[lay.name, side] for lay in g.layers for side in ("inp", "out")
                     if g.spaces[getattr(lay, side)].kind == "opaque"]
    torch.manual_seed(1)
    side = SIDE.get(name.removesuffix("+id"), 128)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        y = model(x)
    state = model.state_dict()
    row["claims_break"] = _change(model, permute_spaces(state, graph=g, seed=0, signs=True), x, y)
    if opaque_after is not None:
        # Spaces this checkout calls permutable that the other makes opaque, read by a layer or not: each permuted
        # alone.
        lost = dict.fromkeys(getattr(g.layer(lay), side) for lay, side in opaque_after
                             if lay in {la.name for la in g.layers})
        row["newly_opaque"] = {
            s: {"units": g.spaces[s].size, "change": _change(model, permute_spaces(state, graph=g, seed=0, spaces=[s],
                                                                                   signs=True), x, y)}
            for s in lost if g.spaces[s].kind in ("free", "signed", "negatable")}
    return row


def child() -> None:
    """Rows for the library on this process's path; stdin: model → the sides the other checkout reads opaque."""
    import wmark

    opaque_after = json.load(sys.stdin)
    models = torchvision_models()
    rows = [census(models, name, opaque_after.get(name)) for name in opaque_after]
    json.dump({"wmark": str(Path(wmark.__file__).parent), "rows": rows}, sys.stdout)


def _revision(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    parser.add_argument("--before", type=Path, help="a checkout of an older commit, read side by side")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    models = torchvision_models()
    if models is None:
        print("torchvision is not importable: nothing to measure (install it outside the project's environment and "
              "put it on PYTHONPATH).")
        return
    import torchvision

    import wmark
    from benchmarks.common import table, write_results

    here = Path(wmark.__file__).resolve().parents[1]
    names = args.models.split(",")
    after = [census(models, name, None) for name in names]
    columns = ["model", "layers", *(f"{s}_{k}" for s in ("inp", "out") for k in KINDS), "aligned_units",
               "markable_layers", "claims_break"]
    print(table([r for r in after if r["reads"]], columns))
    for r in after:
        if not r["reads"]:
            print(f"{r['model']}: refused: {r['refusal']}")
    doc: dict[str, Any] = {"torchvision": torchvision.__version__, "after": {"revision": _revision(here), "rows": after}}
    if args.before is not None:
        tv_dir = str(Path(torchvision.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.before.resolve()), tv_dir])}
        sides = {r["model"]: r.get("opaque", []) for r in after}
        out = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(sides), stdout=subprocess.PIPE,
                             text=True, env=env, check=True)
        child_doc = json.loads(out.stdout)
        before = child_doc["rows"]
        doc["before"] = {"revision": _revision(args.before), "wmark": child_doc["wmark"], "rows": before}
        summary = []
        for old, new in zip(before, after):
            lost = old.get("newly_opaque", {})
            summary.append({
                "model": new["model"],
                "aligned_units": f"{old.get('aligned_units', '-')} -> {new.get('aligned_units', '-')}",
                "opaque_sides": f"{old.get('opaque_sides', '-')} -> {new.get('opaque_sides', '-')}",
                "markable_layers": f"{old.get('markable_layers', '-')} -> {new.get('markable_layers', '-')}",
                "claims_break": f"{old.get('claims_break', 0):.1e} -> {new.get('claims_break', 0):.1e}",
                "newly_opaque_spaces": len(lost),
                "min_change_alone": min((v["change"] for v in lost.values()), default=""),
            })
        doc["summary"] = summary
        print(f"\nbefore: {doc['before']['revision']}\nafter:  {doc['after']['revision']}")
        print(table(summary, list(summary[0])))
    print(write_results("research_whitebox_real_graphs", doc))


if __name__ == "__main__":
    main()
