"""Which spaces an op the graph reader cannot place hides along with its output.

:func:`wmark.whitebox.graph.read_graph` makes the output of an op it cannot place opaque; :func:`seal` then makes
opaque the spaces that op reads, once the whole graph is read, except where the op's output ignores the order of
their units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from wmark.whitebox.fx_rules import _CATS, _ELEMENTWISE, _LAYERS, _REDUCTIONS, taint
from wmark.whitebox.sizes import _arg, metadata_read

if TYPE_CHECKING:
    from wmark.whitebox.spaces import _Spaces


def seal(nodes: Any, label: dict[Any, str], sp: _Spaces, modules: dict[str, nn.Module], ranks: dict[Any, int | None],
         last_axis: set[Any]) -> None:
    """Make opaque the space of every tensor an op reads where the op makes its output opaque.

    A layer reading an opaque output keeps its columns while the units of the op's input permute, and nothing
    says how the op moves them (a slice, a partial flatten, an unknown function, a concatenation along the units,
    a parameter used functionally): a permutation claimed for the input's space would change the outputs. Exempt
    are the ops whose output ignores the units' order (a reduction over their axis or every axis; an elementwise
    op or a cat of channels-first tensors read only by such reductions) and those whose output holds no unit
    (layers, whose output is a space of their own; reads of a tensor's shape, dtype or device).
    """
    for node in list(nodes):
        if node not in label or sp.info[sp.find(label[node])].kind != "opaque" or metadata_read(node) \
                or node.op not in ("call_function", "call_method", "call_module") \
                or (node.op == "call_module" and isinstance(modules[node.target], _LAYERS)) \
                or _order_blind(node, ranks, last_axis):
            continue
        operands = [a for a in node.all_input_nodes if a in label]
        moves_no_axis = node.op != "call_module" and (
            node.target in _ELEMENTWISE or (node.target in _CATS and not any(a in last_axis for a in operands)))
        if moves_no_axis and all(_order_blind(u, ranks, last_axis) for u in node.users):
            continue  # the units stay where its readers reduce them
        why = sp.info[sp.find(label[node])].why or getattr(node.target, "__name__", str(node.target))
        taint(operands, why, node.name, sp, label)


def _order_blind(node: Any, ranks: dict[Any, int | None], last_axis: set[Any]) -> bool:
    """Whether a mean/sum/amax/amin reduces over the axis of its input's units (or every axis), so that its output
    is the same however they are ordered."""
    if node.op == "call_module" or node.target not in _REDUCTIONS or not node.args:
        return False
    rank, last = ranks.get(node.args[0]), node.args[0] in last_axis
    dim = _arg(node, 1, "dim", None)
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (() if dim is None else (dim,))
    if not all(isinstance(d, int) for d in dims):
        return False
    if not dims:
        return True
    if rank is None:
        return not last and 1 in dims
    return (rank - 1 if last else 1) in {d % rank for d in dims}
