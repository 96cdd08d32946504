"""The ``torch.fx`` rules of the graph reader: which ops keep, regroup or hide a space of units.

:func:`wmark.whitebox.graph.read_graph` walks a traced forward node by node; these helpers decide, for the
ops that are not conv/linear layers, whether a node's output still holds the units of its input's space in
a place the next layer reads (dimension 1, or the last axis after a linear layer or a channels-last
permute), or is *opaque*: nothing is aligned through an op whose effect on the units is not known.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from wmark.whitebox.graph import _Spaces

_KEEP_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
)
_KEEP_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.flatten, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
    nn.functional.silu, nn.functional.dropout, nn.functional.max_pool2d, nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d, nn.functional.leaky_relu,
}
_KEEP_METHODS = {"relu", "sigmoid", "tanh", "flatten", "contiguous"}
_ADDS = {operator.add, operator.iadd, torch.add}
_SCALES = {operator.mul, operator.truediv, torch.mul}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Ops that regroup the units of dimension 1: wrong for a linear layer's output, whose units sit on the last axis.
_REGROUP_MODULES = (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_REGROUP_FUNCTIONS = {torch.flatten, nn.functional.max_pool2d, nn.functional.avg_pool2d,
                      nn.functional.adaptive_avg_pool2d}
_REGROUP_METHODS = {"flatten", "view", "reshape", "mean"}
_LAST_AXIS = "a reshape, pooling, mean or conv of a linear layer's output (its units sit on the last axis)"


def _permuted(node: Any, last: bool, src: str, sp: _Spaces) -> tuple[str, bool]:
    """The space of a ``permute`` and whether its units end on the last axis.

    The units stay a space when they move from dimension 1 to the last axis (channels-last, as ConvNeXt reads
    a conv's output with linear layers) or back; anywhere else they are opaque.
    """
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
    dims = dims or tuple(node.kwargs.get("dims", ()))
    rank = len(dims)
    if rank < 2 or not all(isinstance(d, int) for d in dims) or sorted(d % rank for d in dims) != list(range(rank)):
        return sp.new(f"opaque:{node.name}", 0, "opaque", why="a permute of unknown dimensions"), False
    axis = [d % rank for d in dims].index(rank - 1 if last else 1)
    if axis not in (1, rank - 1):
        return sp.new(f"opaque:{node.name}", 0, "opaque", why="a permute that moves the units off dimension 1 "
                      "and the last axis"), False
    return sp.find(src), axis == rank - 1


def _layer_scale(node: Any, tensor_args: list[Any], last_axis: set[Any], params: dict[str, Any]) -> tuple[Any, str] | None:
    """``(operand, gain)`` of a product of a last-axis tensor and a 1-D parameter (broadcast over its units)."""
    if node.op == "call_module" or node.target not in (operator.mul, torch.mul, "mul") or len(node.args) != 2 \
            or len(tensor_args) != 2:
        return None
    for gain, x in (tensor_args, tensor_args[::-1]):
        if gain.op == "get_attr" and x in last_axis and getattr(params.get(str(gain.target)), "ndim", 0) == 1:
            return x, str(gain.target)
    return None


def _norm(name: str, mod: nn.Module, last: bool, src: str, sp: _Spaces, params: dict[str, Any]) -> str:
    """The space after a LayerNorm or GroupNorm: kept (its affine parameters follow it) where permuting the
    units commutes with the norm, else opaque.

    A LayerNorm must normalise exactly the units, on the last axis; a GroupNorm's statistics must pool all
    channels or each one alone (a permutation across several multi-channel groups changes what is pooled).
    """
    size = sp.info[src].size
    if isinstance(mod, nn.LayerNorm):
        shape = tuple(mod.normalized_shape)
        ok = last and len(shape) == 1 and (not size or shape[0] == size)
        why = "a LayerNorm not over exactly the units on the last axis"
    else:
        assert isinstance(mod, nn.GroupNorm)
        ok = not last and mod.num_groups in (1, mod.num_channels)
        why = _LAST_AXIS if last else f"a GroupNorm of {mod.num_groups} groups of several channels"
    if not ok:
        return sp.new(f"opaque:{name}", 0, "opaque", why=why)
    sp.info[src].params.extend(n for n in (f"{name}.weight", f"{name}.bias") if n in params)
    return src


def _grouped_why(weight: torch.Tensor, groups: int) -> str:
    """Why a grouped conv other than a depthwise one with channel multiplier 1 cannot be aligned through."""
    if weight.shape[1] == 1 and weight.shape[0] % groups == 0:
        # Each channel owns a block of k filters: its readers' channels permute as blocks, which no space describes.
        return f"a depthwise conv with channel multiplier {weight.shape[0] // groups}"
    return "a grouped conv"


def _regroups(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _REGROUP_MODULES)
    return node.target in _REGROUP_FUNCTIONS if node.op == "call_function" else node.target in _REGROUP_METHODS


def _through(node: Any, tensor_args: list[Any], label: dict[Any, str], sp: _Spaces) -> str:
    """The space of a function/method node's output; opaque unless the op keeps or joins spaces."""
    target = node.target
    first = sp.find(label[tensor_args[0]])
    if node.op == "call_method" and target.endswith("_") and not target.startswith("_"):
        # An in-place method (x.add_(y), x.relu_()): x itself holds the result, and later reads of x share its space.
        return sp.union(first, _through_op(node, target[:-1], first, tensor_args, label, sp))
    return _through_op(node, target, first, tensor_args, label, sp)


def _through_op(node: Any, target: Any, first: str, tensor_args: list[Any], label: dict[Any, str],
                sp: _Spaces) -> str:
    if target in _ADDS or target == "add":
        if len(tensor_args) == 2:
            return sp.union(first, label[tensor_args[1]])
        return first
    if (target in _SCALES or target in ("mul", "div")) and len(tensor_args) == 1:
        return first
    if target in _KEEP_FUNCTIONS or (node.op == "call_method" and target in _KEEP_METHODS):
        if target in (torch.flatten, "flatten") and _arg(node, 1, "start_dim", 0) != 1:
            return sp.new(f"opaque:{node.name}", 0, "opaque", why="flatten not from dim 1")
        return first
    if node.op == "call_method" and target in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
        return first
    if node.op == "call_method" and target == "mean" and 1 not in _dims(_arg(node, 1, "dim", None)):
        return first
    return sp.new(f"opaque:{node.name}", 0, "opaque", why=getattr(target, "__name__", str(target)))


def _arg(node: Any, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims(value: Any) -> set[int]:
    if value is None:
        return {1}
    return set(value) if isinstance(value, (tuple, list)) else {int(value)}
