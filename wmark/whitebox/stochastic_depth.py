"""Stochastic depth (drop path) in a traced forward: an op that keeps the units of its input's space.

torchvision's ``stochastic_depth`` (ConvNeXt, EfficientNet, Swin) is ``torch.fx.wrap``-ed, so it shows in a trace
as a call_function; timm's ``drop_path`` is the same op where a tracer keeps it as one. In training it multiplies
each sample of the batch (dimension 0) by one scalar, 0 or ``1/(1-p)`` (``mode="batch"``: the whole batch by one),
and in eval mode it is the identity: it never moves or mixes units on another axis, so permuting or flipping them
commutes with it, as with dropout. Neither package is a dependency of wmark: the functions are recognised by the
module and qualified name they are defined under, never by a loose name match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from wmark.whitebox.sizes import _arg

# (module, qualified name) of each function; the modes torchvision's takes (timm's has no mode: per sample).
_FUNCTIONS = {("torchvision.ops.stochastic_depth", "stochastic_depth"): ("mode", 2),
              ("timm.layers.drop", "drop_path"): None}
_MODES = ("row", "batch")


def is_stochastic_depth(node: Any) -> bool:
    """Whether an fx node calls torchvision's ``stochastic_depth`` or timm's ``drop_path``."""
    target = getattr(node, "target", None)
    return node.op == "call_function" and \
        (getattr(target, "__module__", None), getattr(target, "__qualname__", None)) in _FUNCTIONS


def stochastic_depth_why(node: Any, rank: int | None, batch: Callable[[Any], bool]) -> str:
    """Why a stochastic-depth call does not keep its input's units, or '' if it does.

    It keeps them where the tensor's dimension 0 is the batch (``batch`` says so: an input of ``forward`` or a
    tensor the reader kept a space through from one) and its rank is known to be at least 2, so the units sit on
    another axis than the one scaled; its drop rate, mode and training flag must be constants, the mode ``row`` or
    ``batch``. Anything else may scale units apart from each other: opaque.
    """
    x = node.args[0] if node.args else None
    extra = [*node.args[1:], *node.kwargs.values()]
    if not isinstance(x, torch.fx.Node) or any(isinstance(a, torch.fx.Node) for a in extra):
        return "a stochastic depth given a tensor other than its input"
    where = _FUNCTIONS[(node.target.__module__, node.target.__qualname__)]
    if where is not None and _arg(node, where[1], where[0], "row") not in _MODES:
        return "a stochastic depth of an unknown mode"
    if rank is None or rank < 2 or not batch(x):
        return "a stochastic depth of a tensor whose dimension 0 may not be the batch"
    return ""
