"""Layer chains and the rescaling-invariant canonical form the weight watermark lives in.

A *chain* is the sequence of conv / linear weight tensors that feed each other, ending at the marked
layer: ``conv1 → conv2 → fc1`` in the built-in CNN (the flatten between ``conv2`` and ``fc1`` makes each
of ``conv2``'s channels own a block of ``H·W`` consecutive input columns of ``fc1``). Every weight is viewed
as ``(out, units, rest)``: ``units`` are the previous layer's neurons (or the raw input channels for the
first layer) and ``rest`` is the kernel window or the flatten block.

Canonical form: walking the chain, each layer's input units are multiplied by the norms of the previous
layer's rows, then every row is divided by its own norm. Multiplying a hidden ReLU neuron's incoming
weights (and bias) by ``s > 0`` and its outgoing weights by ``1/s`` changes no prediction and leaves this
form unchanged; permuting hidden neurons permutes its rows and the next layer's units. Biases are left out
on purpose, so a suspect's tensors can be read without knowing which bias belongs to which weight.

Example:
    >>> import torch
    >>> ws = [torch.randn(4, 1, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(5, 6 * 9)]
    >>> scaled = [ws[0] * 2.0, ws[1] / 2.0, ws[2]]
    >>> bool(torch.allclose(watermark_vector(ws), watermark_vector(scaled), atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wmark.errors import UsageError

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TINY = 1e-12


def layer_units(shape: Sequence[int], previous: Sequence[int] | None) -> tuple[int, int]:
    """``(units, rest)`` of a weight of ``shape`` fed by a weight of shape ``previous`` (None: first layer).

    Raises:
        UsageError: If the previous layer's outputs cannot be the inputs of this one.
    """
    if len(shape) < 2:
        raise UsageError(f"A weight of shape {tuple(shape)} is not a conv or linear weight.")
    fan_in = 1
    for d in shape[1:]:
        fan_in *= int(d)
    if previous is None:
        units = int(shape[1])
    else:
        units = int(previous[0])
        conv_to_conv = len(shape) > 2 and int(shape[1]) == units
        flatten = len(shape) == 2 and int(shape[1]) % units == 0
        if not (conv_to_conv or flatten):
            raise UsageError(
                f"A layer of shape {tuple(shape)} cannot follow one with {units} outputs; "
                "give the layers of a plain conv/linear chain."
            )
    return units, fan_in // units


def chain_connects(shapes: Sequence[Sequence[int]]) -> bool:
    """Whether each weight shape can feed the next one."""
    try:
        for i in range(1, len(shapes)):
            layer_units(shapes[i], shapes[i - 1])
    except UsageError:
        return False
    return True


def module_chain(model: nn.Module, layer: str | None = None) -> list[str]:
    """Parameter names of the chain that ends at ``layer`` (default: the largest weight before the head).

    Layers are taken in registration order, which is the forward order of the built-in models and of any
    ``nn.Sequential``; the chain stops going back at the first layer that does not fit.

    Raises:
        UsageError: If the model has no conv/linear layer other than its head, or ``layer`` is not one.
    """
    names = [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    params = dict(model.named_parameters())
    names = [n for n in names if n in params]
    if layer is None:
        body = names[:-1]
        if not body:
            raise UsageError("The model has no conv/linear layer before its head to mark; pass a layer name.")
        layer = max(body, key=lambda n: params[n].numel())
    elif not layer.endswith("weight"):
        layer = f"{layer}.weight"
    if layer not in names:
        raise UsageError(f"{layer!r} is not the weight of a conv/linear layer; choose one of {', '.join(names)}.")
    idx = names.index(layer)
    chain = [layer]
    for prev in reversed(names[:idx]):
        if not chain_connects([params[prev].shape, params[chain[0]].shape]):
            break
        chain.insert(0, prev)
    return chain


def canonical_layers(weights: Sequence[torch.Tensor], *, first_units: int | None = None) -> list[torch.Tensor]:
    """Each weight of the chain as ``(out, units, rest)``, input-rescaled and row-normalised.

    Args:
        weights: The chain's weights in forward order.
        first_units: Input units of the first weight (default: its dimension 1).
    """
    out: list[torch.Tensor] = []
    scale: torch.Tensor | None = None
    previous: Sequence[int] | None = None
    for w in weights:
        units, rest = layer_units(w.shape, previous)
        if previous is None and first_units is not None:
            units, rest = first_units, w[0].numel() // first_units
        v = w.reshape(w.shape[0], units, rest)
        if scale is not None:
            v = v * scale[None, :, None]
        norms = v.flatten(1).norm(dim=1)
        out.append(v / norms.clamp_min(_TINY)[:, None, None])
        scale = norms
        previous = w.shape
    return out


def watermark_vector(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The vector the projection reads: the mean canonical row of the chain's last (marked) layer.

    It is invariant to permuting or positively rescaling that layer's outputs and every earlier layer's
    rescaling; earlier layers' permutations permute its blocks (undone by alignment).
    """
    last = canonical_layers(weights)[-1]
    return last.flatten(1).mean(dim=0)
