"""Size reads in a traced forward: which fx arguments are sizes, and which tensors lead with the batch.

The graph reader keeps a space through ``x.view(b, n)`` only when ``b`` is the batch size; these helpers tell a
size read (``x.size(0)``, ``x.shape[0]``, arithmetic of those) from a tensor argument, and whether the tensor it
was read from has the batch on dimension 0.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from wmark.whitebox.spaces import _Spaces


def shape_read(node: Any) -> bool:
    """Whether an fx node is a size read from a tensor (``x.size(...)``, ``x.shape``, an item of one, or arithmetic
    of those): an integer argument, never a tensor whose units an op could mix."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op != "call_function":
        return False
    if node.target is getattr and len(node.args) > 1 and node.args[1] == "shape":
        return True
    if node.target in (operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub):
        nodes = [a for a in node.args if isinstance(a, torch.fx.Node)]
        return bool(nodes) and all(shape_read(a) for a in nodes)
    return False


def metadata_read(node: Any) -> bool:
    """Whether an fx node reads only a tensor's metadata (a size read, ``x.dim()``, ``x.numel()``, ``x.dtype``,
    ``x.device``, ``x.ndim``): no unit of the tensor reaches its output."""
    if shape_read(node) or (node.op == "call_method" and node.target in ("dim", "numel", "get_device")):
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
        and node.args[1] in ("ndim", "dtype", "device", "is_cuda")


def _sizes(node: Any) -> tuple[Any, ...]:
    """The sizes a view, reshape or expand is given, as separate arguments or one tuple."""
    sizes = node.args[1:]
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else tuple(sizes)


def _batch_size(arg: Any, batch: Callable[[Any], bool] | None) -> bool:
    """Whether an fx argument is ``x.size(0)`` or ``x.shape[0]`` of a tensor ``x`` that ``batch`` says leads with
    the batch (any tensor when ``batch`` is None)."""
    if not isinstance(arg, torch.fx.Node):
        return False
    tensor: Any = None
    if arg.op == "call_method" and arg.target == "size":
        tensor = arg.args[0] if _arg(arg, 1, "dim", None) == 0 else None
    elif arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        src = arg.args[0]
        if isinstance(src, torch.fx.Node) and ((src.op == "call_function" and src.target is getattr
                                                and src.args[1] == "shape")
                                               or (src.op == "call_method" and src.target == "size"
                                                   and len(src.args) == 1)):
            tensor = src.args[0]
    return isinstance(tensor, torch.fx.Node) and (batch is None or batch(tensor))


def batch_led(label: dict[Any, str], sp: _Spaces) -> Callable[[Any], bool]:
    """A test of whether an fx node's dimension 0 is the batch: an input of ``forward`` (the model contract's
    batch, or one of its named tensors), or a tensor computed from one through ops the reader kept a space
    through (none of those moves dimension 0; a transpose or a permutation of it makes its output opaque).

    So ``x.view(b, -1)`` is read as ``x.flatten(1)`` only when ``b`` is the batch size, not the first size of a
    weight or of a tensor whose first axis is the sequence.
    """
    memo: dict[Any, bool] = {}

    def led(node: Any) -> bool:
        stack = [node]
        while stack:
            top = stack[-1]
            if top in memo:
                stack.pop()
                continue
            if top.op == "placeholder":
                memo[top] = True
            elif top not in label or sp.info[sp.find(label[top])].kind == "opaque":
                memo[top] = False
            else:
                todo = [a for a in top.all_input_nodes if a in label and a not in memo]
                if todo:
                    stack.extend(todo)
                    continue
                memo[top] = any(memo[a] for a in top.all_input_nodes if a in label)
            stack.pop()
        return memo[node]

    return led


def _arg(node: Any, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
