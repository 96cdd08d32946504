"""The unit spaces of a network, read from its real computation graph.

A *space* is a set of units (channels, hidden dimensions, neurons) whose order a thief may permute without
changing the function, as long as every tensor that writes or reads it is permuted the same way:

* a conv/linear layer *writes* its output space (its rows) and *reads* its input space (its columns,
  ``rest`` columns per unit: a kernel window, or ``H·W`` columns after a flatten);
* BatchNorm, ReLU-like activations, dropout, stochastic depth (torchvision's ``stochastic_depth``, timm's
  ``drop_path``: a per-sample scale of a batch), pooling and a flatten into a linear layer keep the space, but
  only elementwise ops keep a linear layer's output, whose units sit on the last axis (a flatten, reshape,
  pooling, mean or conv of it regroups them differently);
* a depthwise conv (one filter per channel, channel multiplier 1) keeps the space like BatchNorm, its
  filters following their channels; so do a LayerNorm over exactly the units on the last axis, a GroupNorm
  pooling all channels or each alone, a 1-D gain on the last axis (ConvNeXt's layer scale), a PReLU
  (``nn.PReLU`` or ``F.prelu`` with the model's own slopes: one per channel follows them where they sit on
  dimension 1) and a permute moving the units between dimension 1 and the last axis (ConvNeXt's
  channels-last MLP). Other grouped
  convs and group norms tie channels into groups no space describes: opaque, as their inputs. Such per-unit
  parameters applied to several tensors permute once: the spaces they follow join, or turn opaque where one use
  cannot permute (:mod:`wmark.whitebox.shared`);
* every op is judged with its input's rank known where it matters (a linear layer over a conv's output reads
  its width unless the tensor is rank 2; ``mean(-3)`` of a rank-4 tensor is over the channels); an op the
  reader cannot place for that rank is opaque (rules in :mod:`wmark.whitebox.fx_rules`). ``x.view(b, n)`` is a
  flatten from dimension 1 (the element count fixes n); an ``expand`` along size-1 axes keeps the units in place
  (a squeeze-and-excitation gate broadcast to its map) unless it copies one unit across their axis; a
  ``squeeze`` of axes other than the batch and the units' keeps them, its output rank known where those axes
  are known to have size 1 (a global pool's; :mod:`wmark.whitebox.singletons`), and a bare ``squeeze()`` only
  there;
* a residual add joins the spaces of its operands into one: the *residual stream*, whose channels permute
  only together across every block that adds into it and every downsample conv writing it; so do other
  elementwise ops and a cat along another axis; an op meeting the units with another axis (a broadcast across
  ranks or layouts, a matmul, a layer reading the wrong axis) makes its operands' spaces opaque;
* any other op makes its output *opaque*: it cannot be aligned, so nothing is guessed through it; and the spaces
  it reads opaque too (a layer reading its output keeps its columns while they permute), unless its output ignores
  the units' order (a reduction over them) or holds none (a size read);
* a space on which every op is odd in each unit (adds, BatchNorm, average pooling, the layers reading it; no
  activation: MobileNetV2's linear-bottleneck stream) is *signed*: a thief may flip each unit's sign.

How the graph is read:

* ``torch.fx`` symbolic tracing for plain PyTorch models (ResNet-style CNNs, MLPs, ``nn.Sequential``);
* explicit rules for BERT-style encoders (:mod:`wmark.whitebox.bert`), whose Hugging Face ``forward``
  cannot be traced: one *negatable* hidden space (``LN(−x) = −LN(x)`` once the norm's bias is negated) and
  one MLP space per layer; attention heads are opaque;
* explicit rules for Llama-style decoders with RMSNorm (:mod:`wmark.whitebox.decoder`), whose hidden
  stream and SwiGLU neurons are *signed* spaces: a thief may flip the sign of their units as well as
  permute them.

The spaces and layers found are the data classes of :mod:`wmark.whitebox.spaces`. The *plan* of a marked
layer, what verification aligns, is built from them by :mod:`wmark.whitebox.plan` (its :func:`plan` and
:func:`binormalize` are re-exported here).

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> g = read_graph(net)
    >>> [(layer.name, layer.inp, layer.out) for layer in g.layers]
    [('0.weight', 'input', '0'), ('2.weight', '0', '2')]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from wmark.errors import UsageError
from wmark.whitebox.bert import bert_layers, read_bert
from wmark.whitebox.decoder import decoder_layers, read_decoder
from wmark.whitebox.fx_rules import (
    _EXPANDS,
    _KEEP_MODULES,
    _LAST_AXIS,
    _LAYERS,
    _flatten,
    _grouped_why,
    _layer_scale,
    _norm,
    _permuted,
    _regroups,
    _through,
    expanded,
    functional_norm,
    join,
    misread,
    odd_spaces,
    one_value,
    out_rank,
    prelu_slopes,
    taint,
    unsqueezed,
)
from wmark.whitebox.plan import binormalize, plan
from wmark.whitebox.seal import seal
from wmark.whitebox.shared import share
from wmark.whitebox.singletons import singleton_axes, squeezed
from wmark.whitebox.sizes import batch_led, shape_read
from wmark.whitebox.spaces import FIXED, SIGNED, Graph, _assemble, _Spaces
from wmark.whitebox.stochastic_depth import is_stochastic_depth, stochastic_depth_why

# binormalize and plan live in wmark.whitebox.plan and are re-exported for the callers that import them from here.
__all__ = ["Graph", "binormalize", "plan", "read_graph"]


def read_graph(model: nn.Module, *, input_rank: int | None = None) -> Graph:
    """The model's spaces and layers, from ``torch.fx`` or the BERT-style encoder rules.

    Args:
        model: The model.
        input_rank: The rank of a batch of the model's inputs (``len(key.input_shape) + 1``), where known: a layer
            reading the raw input then has an output of known rank (a BatchNorm1d after a first linear layer of
            an MLP reads its units only on a rank-2 batch). ``None`` reads such ops as opaque rather than guess.

    Raises:
        UsageError: If the model cannot be traced.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError("The model is a TorchScript module, whose weight graph torch.fx cannot read; mark the "
                         "Python module and script it after marking.")
    unwrapped = _wrapped(model)
    if unwrapped is not None:
        # Wrappers cannot be traced; their parameters are the wrapped model's under the wrapper's prefix.
        inner_model, prefix = unwrapped
        inner = read_graph(inner_model, input_rank=input_rank)
        for space in inner.spaces.values():
            space.params = [f"{prefix}{p}" for p in space.params]
        inner.layers = [replace(lay, name=f"{prefix}{lay.name}",
                                bias=None if lay.bias is None else f"{prefix}{lay.bias}",
                                gain=None if lay.gain is None else f"{prefix}{lay.gain}",
                                absorbers=tuple(f"{prefix}{a}" for a in lay.absorbers)) for lay in inner.layers]
        return inner
    if bert_layers(model):
        return read_bert(model)
    if decoder_layers(model):
        return read_decoder(model)
    return _read_fx(model, input_rank)


def _wrapped(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The module a data-parallel or ``torch.compile`` wrapper holds and the prefix its parameter names get."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner, prefix = getattr(model, "module", None), "module."
    elif type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper, not importable from a stable path
        inner, prefix = getattr(model, "_orig_mod", None), "_orig_mod."
    else:
        return None
    return (inner, prefix) if isinstance(inner, nn.Module) else None


def _read_fx(model: nn.Module, input_rank: int | None = None) -> Graph:
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; all mean "cannot read this forward"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise UsageError(f"torch.fx cannot trace the model's forward ({first}), so its weight graph cannot be read; "
                         "mark a model whose forward has no data-dependent control flow.") from None
    modules = dict(traced.named_modules())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    sp = _Spaces()
    label: dict[Any, str] = {}
    layers: list[tuple[str, str, str, str | None]] = []
    seen: set[str] = set()
    last_axis: set[Any] = set()  # nodes whose units sit on the last axis: a linear layer's output, kept elementwise
    # node → its rank where known: whether an op reads the units depends on it (a linear layer reads the last
    # axis, which holds a conv's channels only in a rank-2 tensor; mean(-3) is over them in a rank-3 one).
    ranks: dict[Any, int | None] = {}
    ones: dict[Any, frozenset[int]] = {}  # node → the axes of its output known to have size 1 (a global pool's)
    made: dict[Any, str] = {}  # node of a conv/linear layer's output → its weight
    owns: dict[str, tuple[str, tuple[str, ...]]] = {}
    # node → the affine norm gain or layer scale it is the output of (through permutes and dropout): a thief may
    # flip the signs of entries of the gain and its bias with the columns of the layers reading the node.
    tags: dict[Any, str] = {}
    gains: dict[str, str] = {}

    def absorb(src: Any, mode: str, names: Sequence[str]) -> None:
        # Only a layer whose output feeds nothing but this op may flip rows that the op's parameters absorb.
        if src in made and len(src.users) == 1 and names:
            owns[made[src]] = (mode, tuple(names))

    def keep(node: Any, src: Any, why: str) -> None:
        # An op that leaves its input's units where they sit keeps their space (and its axis); `why` hides them.
        label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=why) if why else sp.find(label[src])
        if not why and src in last_axis:
            last_axis.add(node)

    fixed = 0
    for node in traced.graph.nodes:
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and a in label]
        ranks[node] = out_rank(node, tensor_args, ranks, modules, {**buffers, **params})
        if node.op == "get_attr" and one_value(traced, node):
            continue  # unlabelled: the ops using it see one tensor operand fewer (x * s keeps x's space)
        if node.op == "placeholder" and not any(n.op == "placeholder" for n in ranks if n is not node):
            ranks[node] = input_rank  # the batch of inputs: only the first argument of forward is one
        ones[node] = singleton_axes(node, tensor_args, ranks, ones, modules)
        norm = functional_norm(node, label, bool(tensor_args) and tensor_args[0] in last_axis,
                               ranks[tensor_args[0]] if tensor_args else None, sp, params)
        if norm is not None:
            label[node] = norm[0]
            if sp.info[norm[0]].kind != "opaque":
                last_axis.add(node)
            if norm[1]:
                tags[node] = norm[1]
                absorb(tensor_args[0], "whole", [norm[1]])
            continue
        if tensor_args and unsqueezed(node, ranks[tensor_args[0]], tensor_args[0] in last_axis,
                                      batch_led(label, sp)) is not None:
            label[node] = sp.find(label[tensor_args[0]])  # the units stay on dimension 1, now channels-first
            continue
        squeeze = squeezed(node, ranks[tensor_args[0]], tensor_args[0] in last_axis, ones[tensor_args[0]],
                           sp.info[sp.find(label[tensor_args[0]])].size) if tensor_args else None
        if squeeze is not None:
            # One removing only axes other than the batch and the units' leaves the units where they sat.
            ranks[node], why = squeeze
            keep(node, tensor_args[0], why)
            continue
        prelu = prelu_slopes(node, tensor_args[0] in last_axis, ranks[tensor_args[0]], params) if tensor_args else None
        if prelu is not None:
            why, weight = prelu
            keep(node, tensor_args[0], why)
            if weight and sp.info[label[node]].kind != FIXED:
                sp.info[label[node]].params.append(weight)  # one slope per unit, as nn.PReLU(C)'s: it permutes with them
            continue
        if tensor_args and is_stochastic_depth(node):
            # A per-sample scale in training, the identity in eval mode: the units stay where they sit, as dropout.
            why = stochastic_depth_why(node, ranks[tensor_args[0]], batch_led(label, sp))
            keep(node, tensor_args[0], why)
            if not why and tensor_args[0] in tags:
                tags[node] = tags[tensor_args[0]]
            continue
        if tensor_args and node.op == "call_method" and node.target in _EXPANDS:
            # The units sit where the first operand's do; expand_as's other operand lends only its shape.
            src, last = sp.find(label[tensor_args[0]]), tensor_args[0] in last_axis
            why = expanded(node, ranks, last and ranks[tensor_args[0]] != 2, sp.info[src].size)
            if why and sp.info[src].kind not in (FIXED, "opaque"):
                taint(tensor_args[:1], why, node.name, sp, label)  # its readers see the units' copies, not the units
                src = sp.new(f"opaque:{node.name}", 0, "opaque", why=why)
            label[node] = src
            if last:
                last_axis.add(node)
            continue
        if node.op != "output" and any(a in label and a not in tensor_args and not shape_read(a)
                                       for a in node.all_input_nodes):
            # A list of tensors (torch.cat, torch.stack) or a tensor passed by keyword: nothing is guessed through it,
            # but the operands a cat or stack pairs unit with unit are joined, and those it misaligns made opaque.
            listed = [a for a in node.all_input_nodes if a in label]
            how, why = join(node, listed, last_axis, ranks, sp, label)
            _join(how, why, listed, node.name, sp, label)
            label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=why or getattr(node.target, "__name__",
                                                                                         str(node.target)))
            continue
        if tensor_args and tensor_args[0] in last_axis and _regroups(node, modules):
            label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=_LAST_AXIS)
            continue
        if tensor_args and node.op != "call_module" and node.target in ("permute", torch.permute):
            label[node], to_last = _permuted(node, tensor_args[0] in last_axis, label[tensor_args[0]], sp)
            if tensor_args[0] in tags:
                tags[node] = tags[tensor_args[0]]
            if tensor_args[0] in made and len(tensor_args[0].users) == 1:
                made[node] = made[tensor_args[0]]  # a norm after the permute may own the layer's row signs
            if to_last:
                last_axis.add(node)
            continue
        gain = _layer_scale(node, tensor_args, last_axis, params, ranks)
        if gain is not None and sp.info[sp.find(label[gain[0]])].size in (0, params[gain[1]].shape[0]):
            # A per-unit gain over the units (ConvNeXt's layer scale) keeps the space and follows it.
            label[node] = sp.find(label[gain[0]])
            sp.info[label[node]].params.append(gain[1])
            absorb(gain[0], "rows", [gain[1]])
            if gain[0] in last_axis:
                last_axis.add(node)
            tags[node] = gain[1]
            continue
        how, why = join(node, tensor_args, last_axis, ranks, sp, label)
        if _join(how, why, tensor_args, node.name, sp, label):
            label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=why)
            continue
        layer = modules[node.target] if node.op == "call_module" and isinstance(modules[node.target], _LAYERS) else None
        if isinstance(layer, nn.Linear) or (layer is None and any(a in last_axis for a in tensor_args)):
            last_axis.add(node)
        if node.op == "placeholder":
            label[node] = sp.new(f"input{fixed or ''}", 0, FIXED)
            fixed += 1
        elif node.op == "call_module" and isinstance(modules[node.target], _LAYERS):
            target = str(node.target)
            if target in seen:
                raise UsageError(f"Layer {target} is applied more than once; wmark cannot align shared weights.")
            seen.add(target)
            mod = modules[target]
            groups = int(getattr(mod, "groups", 1))
            if groups > 1 and groups == mod.weight.shape[0] and mod.weight.shape[1] == 1 and tensor_args:
                # Depthwise (one filter per channel): like BatchNorm, it keeps the space and its filters follow it.
                why = misread(mod, tensor_args[0] in last_axis, ranks[tensor_args[0]])
                if why and sp.info[sp.find(label[tensor_args[0]])].kind != "opaque":
                    taint(tensor_args[:1], why, node.name, sp, label)
                    label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=why)
                    continue
                label[node] = sp.find(label[tensor_args[0]])
                sp.info[label[node]].params.extend(n for n in (f"{target}.weight", f"{target}.bias") if n in params)
                continue
            why = _grouped_why(mod.weight, groups) if groups > 1 else ""
            out = sp.new(target, int(mod.weight.shape[0]), "opaque" if groups > 1 else "free", why=why)
            if groups > 1 and tensor_args:
                # Its channels permute only group by group, tied to its input's: neither side is aligned.
                src = sp.union(label[tensor_args[0]], sp.new(f"opaque:{node.name}", 0, "opaque", why=why))
            elif tensor_args:
                src = sp.find(label[tensor_args[0]])
                why = misread(mod, tensor_args[0] in last_axis, ranks[tensor_args[0]])
                if why and sp.info[src].kind not in (FIXED, "opaque"):
                    # A fixed input is never permuted, so any axis of it may be read; a space must be read on its
                    # units, else its flips and permutations pass the layer on another axis, undone nowhere.
                    taint(tensor_args[:1], why, node.name, sp, label)
                    src = sp.new(f"opaque:{node.name}", 0, "opaque", why=why)
            else:
                src = sp.new(f"opaque:{node.name}", 0, "opaque")
            bias = f"{target}.bias" if getattr(mod, "bias", None) is not None else None
            if tensor_args and tensor_args[0] in tags:
                gains[f"{target}.weight"] = tags[tensor_args[0]]
            layers.append((f"{target}.weight", src, out, bias))
            label[node] = out
            made[node] = f"{target}.weight"
        elif node.op == "call_module" and type(modules[node.target]) in (nn.LayerNorm, nn.GroupNorm) and tensor_args:
            # The exact types: a subclass may override forward to normalise other axes.
            mod = modules[node.target]
            label[node] = _norm(str(node.target), mod,
                                tensor_args[0] in last_axis or ranks[tensor_args[0]] == 2, sp.find(label[tensor_args[0]]),
                                sp, params)
            if sp.info[label[node]].kind != "opaque" and getattr(mod, "weight", None) is not None:
                # A norm over every unit reads -z as -(its reading of z): its gain absorbs one sign of all rows.
                alone = isinstance(mod, nn.GroupNorm) and mod.num_groups == mod.num_channels
                absorb(tensor_args[0], "rows" if alone else "whole", [f"{node.target}.weight"])
                tags[node] = f"{node.target}.weight"
        elif node.op == "call_module" and isinstance(modules[node.target], _KEEP_MODULES) and tensor_args:
            mod = modules[node.target]
            label[node] = sp.find(label[tensor_args[0]])
            why = misread(mod, tensor_args[0] in last_axis, ranks[tensor_args[0]])
            if isinstance(mod, nn.Flatten):
                why = _flatten(mod.start_dim, mod.end_dim, ranks[tensor_args[0]])[0]
            if why and sp.info[label[node]].kind not in (FIXED, "opaque"):
                if isinstance(mod, nn.Flatten):
                    taint(tensor_args[:1], why, node.name, sp, label)  # it reads the units in a fixed order
                label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=why)
                continue
            if isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Identity)) and tensor_args[0] in tags:
                tags[node] = tags[tensor_args[0]]
            if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                sp.info[label[node]].params.append(f"{node.target}.weight")  # one slope per unit
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                names = [f"{node.target}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
                sp.info[label[node]].params.extend(n for n in names if n in params or n in buffers)
                if mod.weight is not None:
                    # BN(-z) with γ and μ negated is BN(z): each row's sign is the layer's own.
                    absorb(tensor_args[0], "rows", [n for n in names[::2] if n in params or n in buffers])
                    tags[node] = names[0]
        elif node.op in ("call_function", "call_method") and tensor_args:
            label[node] = _through(node, tensor_args, label, sp, ranks)
            if node.target in ("contiguous", nn.functional.dropout) and tensor_args[0] in tags:
                tags[node] = tags[tensor_args[0]]
        elif node.op in ("call_module", "get_attr") or (node.op != "output" and tensor_args):
            label[node] = sp.new(f"opaque:{node.name}", 0, "opaque", why=str(node.target))
    # A per-unit parameter used twice permutes once: the spaces it follows join, and no layer's row signs alone
    # may be absorbed by negating its entries.
    uses = share(traced.graph.nodes, label, sp, modules)
    owns = {name: own for name, own in owns.items() if not any(len(uses.get(n, ())) > 1 for n in own[1])}
    seal(traced.graph.nodes, label, sp, modules, ranks, last_axis)
    # A flipped gain shows in every op reading its output: only the layers credited with it may read it.
    loose = {g for n, g in tags.items() for u in n.users
             if tags.get(u) != g and gains.get(f"{u.target}.weight") != g}
    # So does every other use of the gain and its bias (an op reading the parameter that is no norm of the units).
    loose |= {g for g in tags.values() for u in (*uses.get(g, ()), *uses.get(g.removesuffix(".weight") + ".bias", ()))
              if tags.get(u) != g}
    gains = {name: g for name, g in gains.items() if g not in loose}
    # Where a layer's own row signs and the gain of the norm owning them already describe every flip of a space
    # (one writer, its norm, the layers reading it), the gain's readers read them.
    covered = {sp.find(label[n]) for n, g in tags.items() if g in gains.values()
               and any(g in names for _, names in owns.values())}
    for root, negated in odd_spaces(traced.graph.nodes, label, sp, modules).items():
        if root not in covered:
            sp.info[root].kind, sp.info[root].negated = SIGNED, negated
    # A reader of a norm gain whose rows never flip (no norm after it owns them) shows the gain's signs in them.
    return _assemble(sp, layers, params, family="fx", owns=owns, gains=gains,
                     unsigned=frozenset(name for name in gains if name not in owns))


def _join(how: str, why: str, operands: list[Any], name: str, sp: _Spaces, label: dict[Any, str]) -> bool:
    """Apply :func:`~wmark.whitebox.fx_rules.join`'s decision to the operands; True if it made them opaque."""
    if how == "union":
        for operand in operands[1:]:
            sp.union(label[operands[0]], label[operand])
    elif how == "taint":
        taint(operands, why, name, sp, label)
    return how == "taint"
