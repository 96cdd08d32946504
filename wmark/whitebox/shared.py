"""Per-unit parameters used at several places of a graph: the spaces they follow are one, or opaque.

A module with one parameter entry per unit (``nn.PReLU(C)``, a BatchNorm, an affine LayerNorm or GroupNorm) or
a per-unit parameter used functionally (``F.prelu`` slopes, ``F.layer_norm`` gains, a layer scale) may be applied
to several tensors in ``forward``. Its entries are permuted once, so every space it follows must permute by the
same permutation: :func:`share` joins those spaces, or makes them opaque where one use cannot be permuted with
them (the model's input, a tensor whose units the reader cannot place, a space of another size).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from torch import nn

from wmark.whitebox.sizes import metadata_read

_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow, operator.imatmul,
             operator.setitem}

if TYPE_CHECKING:
    from wmark.whitebox.spaces import _Spaces


def share(nodes: Any, label: dict[Any, str], sp: _Spaces, modules: dict[str, nn.Module]) -> dict[str, list[Any]]:
    """Join the spaces each per-unit parameter follows, or make them opaque; the nodes using each parameter.

    A parameter is per-unit where some space lists it among its params. Each node using it (a call of the module
    owning it, an op reading it) must leave its output in one space that lists it: then that space permutes it
    once for every use. A use whose output is the model's input or a space that does not list the parameter
    (an opaque op, slopes computed from it in ``forward``) keeps its entries in their order, so no space that
    lists it may permute them.

    Returns:
        Each parameter or buffer → the nodes whose value reaching the output uses it (calls of its module, ops
        reading it): negating its entries (to absorb a layer's row signs, or a norm gain's flips) shows in each.
    """
    live = _live(nodes)
    uses: dict[str, list[Any]] = {}
    for node in nodes:
        if node.op == "call_module" and node in live:
            mod = modules[str(node.target)]
            for name, _ in (*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)):
                uses.setdefault(f"{node.target}.{name}", []).append(node)
        elif node.op == "get_attr":
            uses.setdefault(str(node.target), []).extend(u for u in node.users if u in live and not metadata_read(u))
    listed: dict[str, list[str]] = {}
    for root in dict.fromkeys(sp.find(name) for name in sp.parent):  # in order of creation
        for param in sp.info[root].params:
            listed.setdefault(param, []).append(root)
    for param, roots in listed.items():
        sites = uses.get(param, [])
        spaces = list(dict.fromkeys(sp.find(s) for s in [*(label[u] for u in sites if u in label), *roots]))
        if len(spaces) < 2 and all(u in label for u in sites):
            continue
        why = _unjoinable(param, spaces, sites, label, sp, modules)
        if not why:
            for root in spaces[1:]:
                sp.union(spaces[0], root)
            continue
        for i, root in enumerate(spaces):
            if sp.info[sp.find(root)].kind not in ("fixed", "opaque"):
                sp.union(root, sp.new(f"opaque:shared:{param}:{i}", 0, "opaque", why=why))
    return uses


def _live(nodes: Any) -> set[Any]:
    """The nodes whose value reaches the model's output, or that may write a tensor in place: a value computed and
    never used (``forward`` building a dict of alternatives) leaves the function as it is."""
    live: set[Any] = set()
    for node in reversed(list(nodes)):
        name = str(getattr(node.target, "__name__", node.target))
        in_place = node.target in _IN_PLACE or name.endswith("_") or "out" in node.kwargs \
            or node.kwargs.get("inplace") is True
        if node.op in ("output", "call_module") or in_place or any(u in live for u in node.users):
            live.add(node)
    return live


def _unjoinable(param: str, spaces: list[str], sites: list[Any], label: dict[Any, str], sp: _Spaces,
                modules: dict[str, nn.Module]) -> str:
    """Why the spaces a per-unit parameter follows cannot be one space, or '' if they can."""
    owner = param.rpartition(".")[0]
    what = f"a {type(modules[owner]).__name__} ({param})" if owner and owner in modules \
        else f"the per-unit parameter {param}"
    infos = [sp.info[sp.find(s)] for s in spaces]
    if any(u not in label for u in sites):
        return f"{what} also returned as an output of the model"
    if any(info.kind == "fixed" for info in infos):
        return f"{what} applied both to the model's input and to another tensor (its entries follow one order of " \
               "the units)"
    if any(info.kind == "opaque" or param not in info.params for info in infos):
        return f"{what} also used where wmark cannot place the units (its entries follow one order of them)"
    if len({info.size for info in infos}) > 1:
        return f"{what} shared by tensors of {min(i.size for i in infos)} and {max(i.size for i in infos)} units"
    return ""
