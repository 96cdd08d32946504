"""Axes of size 1 in a traced forward, and the squeezes that remove only them.

A global pool (``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3), keepdim=True)``) leaves a map's spatial axes of
size 1, and real CNNs drop them before the classifier with ``x.squeeze(-1).squeeze(-1)``, ``x.squeeze((2, 3))``,
``torch.squeeze(x, 2)`` or ``x.squeeze()``. A squeeze removes a named axis only where it has size 1 (elsewhere it
does nothing), so the graph reader (:func:`wmark.whitebox.graph.read_graph`) knows its output rank only where
every axis it names is known to have size 1: :func:`singleton_axes` follows those axes from the ops that make them
to the squeeze, and :func:`squeezed` judges the squeeze.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmark.whitebox.fx_rules import (
    _ELEMENTWISE,
    _KEEP_FUNCTIONS,
    _KEEP_METHODS,
    _KEEP_MODULES,
    _REDUCTIONS,
    _REGROUP_FUNCTIONS,
    _REGROUP_METHODS,
    _REGROUP_MODULES,
    _UNSQUEEZES,
    PRELUS,
)
from wmark.whitebox.sizes import _arg, _sizes

_SQUEEZES = {"squeeze", torch.squeeze}
# Adaptive pools by the number of trailing axes they pool.
_ADAPTIVE_MODULES: dict[type, int] = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
_ADAPTIVE_FUNCTIONS: dict[Any, int] = {
    nn.functional.adaptive_avg_pool1d: 1, nn.functional.adaptive_avg_pool2d: 2, nn.functional.adaptive_avg_pool3d: 3,
    nn.functional.adaptive_max_pool1d: 1, nn.functional.adaptive_max_pool2d: 2, nn.functional.adaptive_max_pool3d: 3,
}
# Ops that keep every axis of their (first) operand: its axes of size 1 stay so.
_UNARY = (_KEEP_FUNCTIONS - _REGROUP_FUNCTIONS) | (_KEEP_METHODS - _REGROUP_METHODS) | PRELUS


def _ones(size: Any) -> bool:
    """Whether an adaptive pool's output size is 1 along every axis it pools."""
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _dropped(ones: frozenset[int], axes: set[int]) -> frozenset[int]:
    """The axes of size 1 left once ``axes`` are removed (the later ones move down)."""
    return frozenset(a - sum(d < a for d in axes) for a in ones if a not in axes)


def singleton_axes(node: Any, tensor_args: list[Any], ranks: dict[Any, int | None], ones: dict[Any, frozenset[int]],
                   modules: dict[str, nn.Module]) -> frozenset[int]:
    """The axes of a node's output known to have size 1 (non-negative; none where its rank is unknown).

    They are made by an adaptive pool to 1, a reduction with ``keepdim=True``, ``unsqueeze`` or a ``view`` with
    literal 1s, and kept by unary elementwise ops, norms, activations and dropout, by elementwise ops of operands of
    one rank where every operand has size 1 there, and by reductions and squeezes (renumbered).
    """
    if not tensor_args:
        return frozenset()
    target, rank, source = node.target, ranks.get(node), ranks.get(tensor_args[0])
    first = ones.get(tensor_args[0], frozenset())
    if node.op != "call_module" and (target in _SQUEEZES or target in _REDUCTIONS):
        return _removed(node, source, first)
    if rank is None:
        return frozenset()
    if node.op == "call_module":
        mod = modules[target]
        pooled = _ADAPTIVE_MODULES.get(type(mod), 0)
        if pooled:
            return frozenset(range(rank - pooled, rank)) if _ones(mod.output_size) else frozenset()
        keeps = isinstance(mod, _KEEP_MODULES) and not isinstance(mod, _REGROUP_MODULES)
        return first if keeps else frozenset()
    if node.op not in ("call_function", "call_method"):
        return frozenset()
    if target in _ADAPTIVE_FUNCTIONS:
        pooled = _ADAPTIVE_FUNCTIONS[target]
        return frozenset(range(rank - pooled, rank)) if _ones(_arg(node, 1, "output_size", None)) else frozenset()
    if target in _UNARY:
        return first
    if target in _ELEMENTWISE and target not in (torch.max, torch.min, "max", "min"):
        # Broadcasting gives an axis the size of the operand that is not 1 there.
        if {ranks.get(a) for a in tensor_args} != {rank}:
            return frozenset()
        return frozenset.intersection(*(ones.get(a, frozenset()) for a in tensor_args))
    if target in _UNSQUEEZES:
        dim = _arg(node, 1, "dim", None)
        if not isinstance(dim, int):
            return frozenset()
        dim %= rank
        return frozenset({a + (a >= dim) for a in first} | {dim})
    if target in ("view", "reshape", torch.reshape):
        return frozenset(i for i, d in enumerate(_sizes(node)) if type(d) is int and d == 1)
    return frozenset()


def _removed(node: Any, source: int | None, ones: frozenset[int]) -> frozenset[int]:
    """The axes of size 1 after a reduction or squeeze of a rank-``source`` tensor with axes ``ones`` of size 1."""
    dim = _arg(node, 1, "dim", None)
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (() if dim is None else (dim,))
    if source is None or not all(type(d) is int for d in dims) or (node.target in _REDUCTIONS and not dims):
        return frozenset()
    axes = {d % source for d in dims}
    if node.target in _SQUEEZES:
        # An axis of unknown size may stay (a squeeze leaves an axis of another size): the numbering is unknown.
        return _dropped(ones, axes or set(ones)) if axes <= ones else frozenset()
    return ones | axes if _arg(node, 2, "keepdim", False) is True else _dropped(ones, axes)


def squeezed(node: Any, rank: int | None, last: bool, ones: frozenset[int], units: int) -> tuple[int | None, str] | None:
    """``(output rank or None where unknown, why it hides the units or '')`` of a squeeze; None for any other op.

    A squeeze of named axes keeps the units in place where it names neither the batch axis (dropped on a batch of
    one) nor the units' (the last if ``last`` and the rank is not 2, else dimension 1); its output rank is known
    where every axis it names is in ``ones``, the axes known to have size 1. A bare ``squeeze()`` removes every
    axis of size 1: it keeps the units where ``ones`` holds every axis but the batch and the units' and the units
    number 2 or more. On a batch of one it drops the batch axis too, which leaves the units on the only axis, where
    the linear layer reading a pooled vector reads them.
    """
    if node.op not in ("call_function", "call_method") or node.target not in _SQUEEZES:
        return None
    if rank is None:
        return None, "a squeeze of a tensor of unknown rank"
    axis = rank - 1 if last else 1
    dim = _arg(node, 1, "dim", None)
    if dim is None:
        rest = set(range(1, rank)) - {axis}
        if ones != rest or units < 2:
            return None, "a squeeze() where the reader cannot tell which axes have size 1 (name them: x.squeeze((2, 3)))"
        return rank - len(rest), ""
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not dims or not all(type(d) is int and -rank <= d < rank for d in dims):
        return None, "a squeeze of unknown dimensions"
    axes = {d % rank for d in dims}
    if 0 in axes:
        return None, "a squeeze of the batch axis (it drops it on a batch of one)"
    if axis in axes:
        return None, "a squeeze that may remove the units' axis"
    return (rank - len(axes) if axes <= ones else None), ""

