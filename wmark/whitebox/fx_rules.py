"""The ``torch.fx`` rules of the graph reader: which ops keep, regroup or hide a space of units.

:func:`wmark.whitebox.graph.read_graph` walks a traced forward node by node; these helpers decide, for the
ops that are not conv/linear layers, whether a node's output still holds the units of its input's space in
a place the next layer reads (dimension 1, or the last axis after a linear layer or a channels-last
permute), or is *opaque*: nothing is aligned through an op whose effect on the units is not known.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wmark.whitebox.sizes import _arg, _batch_size, _sizes, batch_led
from wmark.whitebox.stochastic_depth import is_stochastic_depth

if TYPE_CHECKING:
    from wmark.whitebox.graph import _Spaces

_KEEP_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
    # elementwise, so equivariant under any permutation of the units (MobileNetV3's hard gates among them)
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.SELU, nn.CELU,
    # one slope, or one per channel of dimension 1 (its weight then permutes with the units, as a BatchNorm's)
    nn.PReLU,
)
_KEEP_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.flatten, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
    nn.functional.silu, nn.functional.dropout, nn.functional.max_pool2d, nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d, nn.functional.leaky_relu, nn.functional.hardswish, nn.functional.hardsigmoid,
    nn.functional.hardtanh, nn.functional.mish, nn.functional.softplus, nn.functional.elu, nn.functional.selu,
    nn.functional.celu,
}
_KEEP_METHODS = {"relu", "sigmoid", "tanh", "flatten", "contiguous"}
PRELUS = {torch.prelu, nn.functional.prelu}  # kept where their slopes are the model's (see prelu_slopes)
_ADDS = {operator.add, operator.iadd, torch.add}
_SCALES = {operator.mul, operator.truediv, torch.mul}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Ops that regroup the units of dimension 1: wrong for a linear layer's output, whose units sit on the last axis.
_REGROUP_MODULES = (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_REGROUP_FUNCTIONS = {torch.flatten, nn.functional.max_pool2d, nn.functional.avg_pool2d,
                      nn.functional.adaptive_avg_pool2d, torch.mean, torch.sum, torch.amax, torch.amin}
_REGROUP_METHODS = {"flatten", "view", "reshape", "mean", "sum", "amax", "amin"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
_POOL_FUNCTIONS = {nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d}
# The number of spatial dimensions of the maps a pooling module reads in a batch.
_SPATIAL: dict[type, int] = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.MaxPool2d: 2, nn.AvgPool2d: 2,
    nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
}
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


# Ops that meet their tensor operands unit by unit, broadcasting (in-place methods end in "_").
_ELEMENTWISE = {
    *_ADDS, *_SCALES, operator.isub, operator.imul, operator.itruediv, operator.sub, torch.sub, torch.div, torch.where,
    torch.maximum, torch.minimum, torch.max, torch.min, torch.pow, torch.lerp, torch.addcmul, torch.addcdiv, "add",
    "sub", "mul", "div", "where", "maximum", "minimum", "max", "min", "pow", "lerp", "addcmul", "addcdiv",
}
# Ops that contract or batch an operand's axes against another's: no unit of either stays on its own.
_CONTRACTIONS = {
    operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.einsum, torch.tensordot,
    torch.inner, torch.outer, nn.functional.linear, nn.functional.bilinear, "matmul", "mm", "bmm", "baddbmm", "addmm",
}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_STACKS = {*_CATS, torch.stack}
_NAMES = {operator.iadd: "add", operator.isub: "sub", operator.mul: "mul", operator.imul: "mul",
          operator.truediv: "div", operator.itruediv: "div", nn.functional.linear: "functional linear",
          nn.functional.bilinear: "functional bilinear"}


def join(node: Any, operands: list[Any], last_axis: set[Any], ranks: dict[Any, int | None], sp: _Spaces,
         label: dict[Any, str]) -> tuple[str, str]:
    """How an op meets the units of its tensor operands: ``("union", "")`` where it pairs unit with unit (an
    elementwise op of tensors of one rank and layout, a cat along another axis, a stack), so that only one
    permutation of all their spaces keeps the function; ``("taint", why)`` where it meets them with another axis
    (a broadcast across ranks or layouts) or contracts them; ``("", "")`` where it joins nothing (one operand, a
    rank-0 one, a cat along the units: each operand a block of its own) or the add rule decides.

    A rank-2 tensor holds its units on both axes; a last-axis tensor (in ``last_axis``) on its last, any other on
    dimension 1.
    """
    target = node.target[:-1] if node.op == "call_method" and node.target.endswith("_") else node.target
    name = _NAMES.get(target, getattr(target, "__name__", str(target)))
    article = "an" if name[0] in "aeiou" else "a"
    if node.op == "call_module" or not (target in _ELEMENTWISE or target in _CONTRACTIONS or target in _STACKS):
        return "", ""
    if target in _CONTRACTIONS:
        return "taint", f"{article} {name}"
    ops = [t for t in operands if ranks.get(t) != 0]  # a scalar tensor broadcasts over every unit alike
    if len(ops) < 2:
        return "", ""
    rank = {ranks.get(t) for t in ops}
    placed = sorted(r for r in rank if r is not None)
    if len(placed) > 1:
        # Broadcasting aligns the last axes: dimension 1 of one operand meets another axis of the other.
        return "taint", f"{article} {name} of rank-{placed[-1]} and rank-{placed[0]} tensors"
    known = None not in rank
    axes = {placed[0] - 1 if t in last_axis or placed[0] == 2 else 1 for t in ops} if known else \
        {t in last_axis for t in ops}
    if len(axes) > 1:
        return "taint", f"{article} {name} of a channels-last and a channels-first tensor"
    if target in _ADDS or target == "add":
        return "", ""  # one rank and layout: the add rule joins the operands and refuses unit counts that differ
    if not known:
        return "taint", f"{article} {name} of tensors of unknown rank"
    # A one-unit operand (a single-channel map, as spatial attention multiplies in) broadcasts one value over the
    # units of the others on their axis: it pairs with none of them.
    ops = [t for t in ops if sp.info[sp.find(label[t])].size != 1]
    if len(ops) < 2:
        return "", ""
    if target in _CATS:
        dim = _arg(node, 1, "dim", node.kwargs.get("axis", 0))  # torch.cat takes numpy's axis= too
        if not isinstance(dim, int):
            return "taint", f"{article} {name} along an unknown dimension"
        if {dim % placed[0]} == axes:
            return "", ""
    spaces = [sp.info[sp.find(label[t])] for t in ops]
    if any(space.kind == "opaque" for space in spaces):
        return "taint", f"{article} {name} with an operand wmark cannot place"
    sizes = {space.size for space in spaces if space.size}
    if len(sizes) > 1:
        return "taint", f"{article} {name} of {min(sizes)} and {max(sizes)} units"
    return "union", ""


def one_value(root: nn.Module, node: Any) -> bool:
    """Whether a ``get_attr`` node is a tensor of one element and rank 0 or 1 (a learned scalar such as ReZero's
    gate, ``nn.Parameter(torch.zeros(1))``): broadcast alike over every unit, it is no operand, as a number is not."""
    obj: Any = root
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.Tensor) and obj.ndim <= 1 and obj.numel() == 1


def taint(operands: list[Any], why: str, name: str, sp: _Spaces, label: dict[Any, str]) -> None:
    """Make the space of each operand opaque (a fixed one is never permuted and stays fixed).

    An op that meets the units with another axis (a broadcast across ranks or layouts, a contraction, a layer
    reading the wrong axis) keeps no permutation or sign flip of them alone: nothing is aligned through them.
    """
    for i, operand in enumerate(operands):
        root = sp.find(label[operand])
        if sp.info[root].kind not in ("fixed", "opaque"):
            sp.union(root, sp.new(f"opaque:{name}:{i}", 0, "opaque", why=f"a layer whose units also feed {why}"))


def _layer_scale(node: Any, tensor_args: list[Any], last_axis: set[Any], params: dict[str, Any],
                 ranks: dict[Any, int | None]) -> tuple[Any, str] | None:
    """``(operand, gain)`` of a product of a tensor and a per-unit parameter broadcast over its units: 1-D on a
    last-axis tensor, ``(C, 1, …, 1)`` on a channels-first batch one rank higher (torchvision's ``CNBlock``)."""
    if node.op == "call_module" or node.target not in (operator.mul, torch.mul, "mul") or len(node.args) != 2 \
            or len(tensor_args) != 2:
        return None
    for gain, x in (tensor_args, tensor_args[::-1]):
        shape = tuple(getattr(params.get(str(gain.target)), "shape", ())) if gain.op == "get_attr" else ()
        if x in last_axis and len(shape) == 1:
            return x, str(gain.target)
        if x not in last_axis and len(shape) > 1 and ranks.get(x) == len(shape) + 1 and set(shape[1:]) == {1}:
            return x, str(gain.target)
    return None


def functional_norm(node: Any, label: dict[Any, str], last: bool, rank: int | None, sp: _Spaces,
                    params: dict[str, Any]) -> tuple[str, str | None] | None:
    """``(space, gain)`` of ``F.layer_norm`` with its affine parameters read from the model (torchvision's
    ``LayerNorm2d`` permutes the channels last and calls it); None for any other node.

    The space is kept, with the parameters following it, where the norm is over exactly the units on the last
    axis, as for ``nn.LayerNorm``; else opaque (and no gain).
    """
    if node.op != "call_function" or node.target is not nn.functional.layer_norm:
        return None
    bound = {**dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args)), **node.kwargs}
    x, shape = node.args[0] if node.args else None, bound.get("normalized_shape")
    affine = [bound.get(k) for k in ("weight", "bias")]
    size = sp.info[sp.find(label[x])].size if x in label else -1
    ok = (last or rank == 2) and isinstance(shape, (tuple, list)) and len(shape) == 1 and size in (0, shape[0]) \
        and not isinstance(bound.get("eps"), torch.fx.Node) \
        and all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr"
                              and tuple(getattr(params.get(str(a.target)), "shape", ())) == tuple(shape)) for a in affine)
    if not ok:
        return sp.new(f"opaque:{node.name}", 0, "opaque", why="a LayerNorm not over exactly the units on the last "
                      "axis"), None
    src = sp.find(label[x])
    sp.info[src].params.extend(str(a.target) for a in affine if a is not None)
    return src, None if affine[0] is None else str(affine[0].target)


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


def prelu_slopes(node: Any, last: bool, rank: int | None, params: dict[str, Any]) -> tuple[str, str | None] | None:
    """``(why it hides the units or '', its per-unit slopes)`` of ``F.prelu``/``torch.prelu``; None for other nodes.

    Slopes that are a parameter of the model act as ``nn.PReLU``'s weight: one slope on every unit alike, one per
    channel of dimension 1 (a 1-D parameter) following the units where they sit on dimension 1 (a channels-first
    tensor or a rank-2 one); slopes computed in ``forward`` or of another shape are opaque.
    """
    if node.op != "call_function" or node.target not in PRELUS:
        return None
    weight = _arg(node, 1, "weight", None)
    slopes = params.get(str(weight.target)) if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else None
    if slopes is None:
        return "a PReLU whose slopes are not a parameter of the model", None
    if slopes.numel() == 1:
        return "", None
    if slopes.ndim != 1:
        return f"a PReLU with slopes of shape {tuple(slopes.shape)}", None
    if last and rank != 2:
        return (f"a PReLU of a linear layer's output, a {_rank(rank)} (its slopes are per entry of dimension 1, "
                "not per unit)"), None
    return "", str(weight.target)


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


def _through(node: Any, tensor_args: list[Any], label: dict[Any, str], sp: _Spaces,
             ranks: dict[Any, int | None]) -> str:
    """The space of a function/method node's output; opaque unless the op keeps or joins spaces."""
    target = node.target
    first = sp.find(label[tensor_args[0]])
    if node.op == "call_method" and target.endswith("_") and not target.startswith("_"):
        # An in-place method (x.add_(y), x.relu_()): x itself holds the result, and later reads of x share its space.
        return sp.union(first, _through_op(node, target[:-1], first, tensor_args, label, sp, ranks))
    return _through_op(node, target, first, tensor_args, label, sp, ranks)


def _through_op(node: Any, target: Any, first: str, tensor_args: list[Any], label: dict[Any, str],
                sp: _Spaces, ranks: dict[Any, int | None]) -> str:
    rank = ranks.get(tensor_args[0])
    if target in _ADDS or target == "add":
        if len(tensor_args) == 2:
            other = ranks.get(tensor_args[1])
            if rank is not None and other is not None and rank != other:
                # Broadcasting aligns the last axes: dimension 1 of one operand meets another axis of the other.
                return sp.new(f"opaque:{node.name}", 0, "opaque", why=f"an add of rank-{rank} and rank-{other} tensors")
            return sp.union(first, label[tensor_args[1]])
        return first
    if (target in _SCALES or target in ("mul", "div")) and (
            len(tensor_args) == 1 or (len(tensor_args) == 2 and sp.find(label[tensor_args[1]]) == first)):
        return first  # a product by a number, or of two tensors join() paired unit with unit (an SE gate)
    why = ""
    if target in (torch.flatten, "flatten"):
        why = _flatten(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), rank)[0]
    elif target in _POOL_FUNCTIONS and rank != 4 and sp.info[first].kind not in ("fixed", "opaque"):
        why = f"{target.__name__} of a {_rank(rank)} (only a batch of 2-D maps keeps its channels on dimension 1)"
    elif target in _KEEP_FUNCTIONS or (node.op == "call_method" and target in _KEEP_METHODS):
        return first
    elif target in _RESHAPES:
        shape = _sizes(node)
        if len(shape) == 2 and _batch_size(shape[0], batch_led(label, sp)):
            # x.view(b, n) is x.flatten(1) whatever n is: the element count fixes n (n = C on a pooled 1×1 map).
            return first
        name = getattr(target, "__name__", target)
        why = f"a {name} other than x.{name}(x.size(0), -1)"
    elif target in _REDUCTIONS:
        why = _reduction(node, rank)[0]
    else:
        why = getattr(target, "__name__", str(target))
    if not why:
        return first
    return sp.new(f"opaque:{node.name}", 0, "opaque", why=why)


_UNSQUEEZES = {"unsqueeze", torch.unsqueeze}
_RESHAPES = {"view", "reshape", torch.reshape}
_EXPANDS = {"expand", "expand_as"}


def expanded(node: Any, ranks: dict[Any, int | None], last: bool, units: int) -> str:
    """Why ``x.expand(...)`` or ``x.expand_as(y)`` does not keep x's units in place, or '' if it does.

    An expand copies values along axes of size 1, as broadcasting does: a squeeze-and-excitation gate of shape
    ``(B, C, 1, 1)`` expanded to its map's ``(B, C, H, W)`` before ``x * s`` keeps its units on dimension 1. The
    rank must stay (new leading axes move the units) and the units' axis (the last if ``last`` and the rank is
    not 2, else dimension 1) must not be expanded: it cannot be where it holds ``units`` >= 2 (only axes of size
    1 expand), and ``expand`` keeps it where given -1 or 1 there; one unit copied across it is opaque.
    """
    rank = ranks.get(node.args[0])
    if node.target == "expand_as":
        sizes: tuple[Any, ...] = ()
        out = ranks.get(node.args[1]) if len(node.args) == 2 else None
    else:
        sizes = _sizes(node)
        out = len(sizes) or None
    if rank is None or out != rank:
        return f"an {node.target} to another or unknown rank (new leading axes move the units)"
    axis = rank - 1 if last else 1
    if units < 2 and not (sizes and type(sizes[axis]) is int and sizes[axis] in (-1, 1)):
        return f"an {node.target} that may copy one unit across the units' axis"
    return ""


def unsqueezed(node: Any, rank: int | None, last: bool = False,
               batch: Callable[[Any], bool] | None = None) -> int | None:
    """The output rank of an op that only inserts singleton axes after dimension 1 of a tensor holding its units
    there (rank 2, or channels-first), so that they stay on dimension 1 of a channels-first tensor: a
    squeeze-and-excitation gate ``s[:, :, None, None]``, ``s.view(b, c, 1, 1)`` or ``s.unsqueeze(-1).unsqueeze(-1)``
    before ``x * s``; None for any other op.

    A view must name the batch size first (``x.size(0)``, ``x.shape[0]`` of a tensor ``batch`` says leads with
    the batch; any tensor's when ``batch`` is None, which only the output rank may rely on) and only literal 1s
    after the units, so that the element count fixes the units' axis to the input's units.
    """
    if rank is None or rank < 2 or (last and rank != 2) or node.op not in ("call_function", "call_method"):
        return None
    if node.target in _UNSQUEEZES:
        dim = _arg(node, 1, "dim", None)
        ok = isinstance(dim, int) and -rank - 1 <= dim <= rank and dim % (rank + 1) >= 2
        return rank + 1 if ok else None
    if node.target is operator.getitem and len(node.args) == 2 and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = sum(isinstance(i, slice) and i == slice(None) for i in index)
        seen, new = 0, 0
        for i in index:
            if i is None and seen >= 2:
                new += 1
            elif i is Ellipsis:
                seen += rank - full
            elif isinstance(i, slice) and i == slice(None):
                seen += 1
            else:
                return None  # an index, a partial slice, or a new axis before the units
        return rank + new if new and seen <= rank else None
    if node.op == "call_method" and node.target in ("view", "reshape") and rank == 2:
        shape = _sizes(node)
        if len(shape) > 2 and _batch_size(shape[0], batch) and all(type(d) is int and d == 1 for d in shape[2:]):
            return len(shape)
    return None


def _rank(rank: int | None) -> str:
    return "tensor of unknown rank" if rank is None else f"rank-{rank} tensor"


def _flatten(start: Any, end: Any, rank: int | None) -> tuple[str, int | None]:
    """``(why the flatten regroups the units, or '', its output rank if known)``.

    Only a flatten of every dimension from 1 to the last keeps the units of dimension 1 (as blocks of columns
    of the linear layer reading it); a flatten that stops earlier or starts elsewhere mixes them with others.
    """
    if not isinstance(start, int) or not isinstance(end, int):
        return "a flatten of unknown dimensions", None
    if rank is not None:
        start, end = start % rank, end % rank
        out: int | None = rank - (end - start)
    else:
        out = start + 1 if end == -1 and start >= 0 else None
    if start != 1:
        return "a flatten not from dimension 1", out
    if end != -1 and (rank is None or end != rank - 1):
        return f"a flatten of dimensions 1 to {end} of a {_rank(rank)} (not to the last)", out
    return "", out


def _reduction(node: Any, rank: int | None) -> tuple[str, int | None]:
    """``(why a mean/sum/amax/amin hides the units of dimension 1, or '', its output rank if known)``."""
    dim = _arg(node, 1, "dim", None)
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (() if dim is None else (dim,))
    if not dims or not all(isinstance(d, int) for d in dims):
        return "a reduction over every dimension or unknown ones", None
    if rank is None and any(d < 0 for d in dims):
        return "a reduction over negative dimensions of a tensor of unknown rank", None
    axes = {d % rank for d in dims} if rank is not None else set(dims)
    keep = _arg(node, 2, "keepdim", False)
    out = rank if keep is True else (rank - len(axes) if rank is not None and keep is False else None)
    if axes & {0, 1}:
        return "a reduction over the batch or the units' dimension 1", out
    return "", out


def out_rank(node: Any, tensor_args: list[Any], ranks: dict[Any, int | None], modules: dict[str, nn.Module],
             tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank of a node's output where the reader knows it (``None`` for the model's inputs).

    A conv's output is a batch of ``k``-D maps (rank ``k + 2``; the reader reads every conv as batched and refuses
    one fed anything else); linear layers, norms, activations, pooling and elementwise ops keep the rank;
    flatten, view/reshape, permute and reductions change it.
    """
    rank = ranks.get(tensor_args[0]) if tensor_args else None
    target = node.target
    if node.op == "get_attr":
        return tensors[target].ndim if target in tensors else None
    if node.op == "call_module":
        mod = modules[target]
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return len(mod.kernel_size) + 2
        if isinstance(mod, nn.Flatten):
            return _flatten(mod.start_dim, mod.end_dim, rank)[1]
        return rank if tensor_args else None
    if node.op not in ("call_function", "call_method") or not tensor_args:
        return None
    if target in (torch.flatten, "flatten"):
        return _flatten(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), rank)[1]
    if target in ("permute", torch.permute):
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        return len(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else len(dims) or None
    if target in _RESHAPES or target == "expand":
        return len(_sizes(node)) or None
    if target == "expand_as":
        return ranks.get(node.args[1]) if len(node.args) == 2 else None
    if target in _REDUCTIONS:
        return _reduction(node, rank)[1]
    if target is operator.getitem or target in _UNSQUEEZES:
        return unsqueezed(node, rank)
    elementwise = (target in _ADDS or target in _SCALES or target in _KEEP_FUNCTIONS or target in PRELUS
                   or target in ("add", "mul", "div", "contiguous") or target in _KEEP_METHODS
                   or (isinstance(target, str) and target.endswith("_")) or is_stochastic_depth(node))
    known = [ranks.get(a) for a in tensor_args]
    return max(known) if elementwise and None not in known else None  # type: ignore[type-var]


def misread(mod: nn.Module, last: bool, rank: int | None) -> str:
    """Why a module does not read the units of its input where they sit, or '' if it does.

    ``last``: the units sit on the last axis (a linear layer's output), else on dimension 1; a rank-2 tensor
    has them on both. A linear layer reads the last axis; a conv, pooling or BatchNorm reads dimension 1 of a
    batch of maps of its own dimension (a conv fed one rank less reads it as unbatched, channels on dimension 0).
    """
    both = rank == 2
    if isinstance(mod, nn.Linear):
        return "" if last or both else f"a linear layer over the last axis of a {_rank(rank)} whose units " \
                                         "sit on dimension 1"
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return "" if not last or both else f"a BatchNorm of a linear layer's output, a {_rank(rank)} (it normalises " \
                                             "dimension 1, not the units)"
    if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
        return "" if not last or both else f"a PReLU of a linear layer's output, a {_rank(rank)} (its slopes are " \
                                             "per entry of dimension 1, not per unit)"
    dim = _SPATIAL.get(type(mod), len(getattr(mod, "kernel_size", ())) if isinstance(mod, _LAYERS) else 0)
    if not dim:
        return ""
    if last:
        return _LAST_AXIS
    if rank != dim + 2:
        return f"a {type(mod).__name__} of a {_rank(rank)} (only a batch of {dim}-D maps keeps its channels " \
               "on dimension 1)"
    return ""


_ODD_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.Flatten)
_ODD_TARGETS = {
    *_ADDS, *_SCALES, "add", "add_", "mul", "div", torch.flatten, "flatten", *_RESHAPES, *_EXPANDS, "contiguous",
    "permute", torch.permute, "mean", "sum", torch.mean, torch.sum, nn.functional.dropout,
    nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
}


def odd_spaces(nodes: Any, label: dict[Any, str], sp: _Spaces, modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Free spaces on which every op is odd in each unit, each with the per-unit tensors a unit's flip negates.

    Negating unit ``c`` wherever such a space is written (a writer's row and bias, a BatchNorm's bias and running
    mean, a depthwise conv's bias) negates it in every tensor of the space, and the layers reading the space undo
    it in their columns: the function is kept, so a thief may flip the sign of each unit (MobileNetV2's
    linear-bottleneck stream: projections and BatchNorm write it, adds and average pooling carry it, expansion
    convs and the head read it). A single other op on any tensor of the space (an activation, max pooling, a
    LayerNorm, the model's output) rules the space out.
    """
    bad: set[str] = set()
    negated: dict[str, list[str]] = {}
    for node in nodes:
        root = sp.find(label[node]) if node in label else ""
        if not root or sp.info[root].kind != "free" or root in bad:
            continue
        for user in node.users:
            names = _odd_user(user, root, label, sp, modules)
            if names is None:
                bad.add(root)
                break
            negated.setdefault(root, []).extend(names)
    return {root: list(dict.fromkeys(names)) for root, names in negated.items() if root not in bad}


def _odd_user(user: Any, root: str, label: dict[Any, str], sp: _Spaces,
              modules: dict[str, nn.Module]) -> list[str] | None:
    """The per-unit tensors negated with a unit for ``user`` to stay odd in a tensor of ``root``, or None if it
    is not odd there (or moves the units out of the space)."""
    same = user in label and sp.find(label[user]) == root
    if user.op == "call_module":
        mod = modules[user.target]
        bias = [f"{user.target}.bias"] if getattr(mod, "bias", None) is not None else []
        if isinstance(mod, _LAYERS):
            # A conv/linear layer reads the units (its columns follow the flip); a depthwise one keeps them.
            return (bias if same else None) if int(getattr(mod, "groups", 1)) > 1 else []
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and same:
            # BN(-z) = -BN(z) once its bias and running mean are negated (γ and the variance stay).
            return bias + ([f"{user.target}.running_mean"] if mod.running_mean is not None else [])
        return [] if isinstance(mod, _ODD_MODULES) and same else None
    if (user.op == "call_function" and user.target is getattr) or (user.op == "call_method"
                                                                   and user.target in ("size", "dim")):
        return []  # reads the shape, which no sign changes
    if user.op not in ("call_function", "call_method") or not same or (user.target not in _ODD_TARGETS
                                                                      and not is_stochastic_depth(user)):
        return None
    if user.target in _ADDS or user.target in ("add", "add_"):
        # x + y is odd only when both operands flip (a constant added would not); both are in the space then.
        operands = [a for a in user.args if isinstance(a, torch.fx.Node)]
        return [] if len(operands) == 2 and all(a in label and sp.find(label[a]) == root for a in operands) else None
    if user.target in _SCALES or user.target in ("mul", "div"):
        # x * s flips with x alone; a product of two tensors of the space (a gate joined with the stream) does not:
        # (-x)(-s) = xs.
        operands = [a for a in user.args if isinstance(a, torch.fx.Node) and a in label and sp.find(label[a]) == root]
        return [] if len(operands) < 2 else None
    return []
