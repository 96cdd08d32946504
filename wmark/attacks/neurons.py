"""Attacks that change no prediction: neuron permutation with positive rescaling, and layer renaming.

Both defeat any weight watermark that reads weights by position or by name. ``permute`` works on plain
conv/linear chains such as the built-in models (``conv1 → conv2 → fc1 → fc2``, with the flatten between
``conv2`` and ``fc1``: permuting ``conv2``'s channels permutes ``fc1``'s input columns in blocks of H·W).
It is exact for ReLU networks (max-pooling commutes with positive scaling) without normalisation layers.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from wmark.errors import UsageError
from wmark.whitebox.chain import WEIGHT_LAYERS, layer_units


def _bias_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


@torch.no_grad()
def permute_state_dict(tensors: Mapping[str, torch.Tensor], *, chain: Sequence[str], seed: int = 0,
                       scale_range: tuple[float, float] = (0.5, 2.0)) -> dict[str, torch.Tensor]:
    """Permute and positively rescale every hidden neuron of a chain of layers, keeping the function.

    Args:
        tensors: A state dict.
        chain: Weight names in forward order; each layer's outputs feed the next one, the last is the head.
        seed: Seed of the permutations and scales.
        scale_range: Per-neuron scales are log-uniform in this range.

    Raises:
        UsageError: If a name is missing or the layers do not form a chain.
    """
    missing = [n for n in chain if n not in tensors]
    if missing:
        raise UsageError(f"The state dict has no tensor {missing[0]!r}; name the chain's weight tensors.")
    out = {n: t.clone() for n, t in tensors.items()}
    rng = np.random.default_rng(seed)
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    for prev, nxt in itertools.pairwise(chain):
        w, w_next = out[prev], out[nxt]
        units, _ = layer_units(w_next.shape, w.shape)
        n = w.shape[0]
        perm = torch.from_numpy(rng.permutation(n)).to(w.device)
        scale = torch.from_numpy(np.exp(rng.uniform(lo, hi, n))).to(w)
        shape = [n] + [1] * (w.dim() - 1)
        out[prev] = w[perm] * scale.view(shape)
        bias = _bias_name(prev)
        if bias in out:
            out[bias] = out[bias][perm] * scale.to(out[bias])
        v = w_next.reshape(w_next.shape[0], units, -1)
        out[nxt] = (v[:, perm, :] / scale.view(1, n, 1)).reshape(w_next.shape).contiguous()
    return out


def layer_names(model: nn.Module) -> list[str]:
    """Weight names of the model's conv/linear layers in registration (forward) order."""
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def permute(model: nn.Module, *, seed: int = 0, scale_range: tuple[float, float] = (0.5, 2.0)) -> nn.Module:
    """A copy of ``model`` with every hidden neuron permuted and rescaled; predictions are unchanged.

    Raises:
        UsageError: If the model is not a plain chain of conv/linear layers.
    """
    names = layer_names(model)
    if len(names) < 2:
        raise UsageError("Permuting needs at least two conv/linear layers.")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for prev, nxt in itertools.pairwise(names):
        try:
            layer_units(shapes[nxt], shapes[prev])
        except UsageError:
            raise UsageError(f"{nxt} does not take {prev}'s outputs as inputs; permute supports plain conv/linear "
                             "chains (fmnist-mlp, fmnist-cnn), and a residual network's permutation is "
                             "wmark.attacks.symmetry.permute_spaces.") from None
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
             nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)
    if any(isinstance(m, norms) for m in model.modules()):
        raise UsageError("Permuting models with normalisation layers is not supported; use a plain conv/linear chain.")
    attacked = copy.deepcopy(model)
    attacked.load_state_dict(permute_state_dict(model.state_dict(), chain=names, seed=seed, scale_range=scale_range))
    return attacked


def rename_tensors(tensors: Mapping[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same tensors under scrambled names (random tokens; nothing of the old names survives)."""
    rng = np.random.default_rng(seed)
    names = list(tensors)
    tokens: set[str] = set()
    while len(tokens) < len(names):
        tokens.add("t" + rng.bytes(6).hex())
    order = rng.permutation(len(names))
    return {tok: tensors[names[i]] for tok, i in zip(sorted(tokens), order)}
