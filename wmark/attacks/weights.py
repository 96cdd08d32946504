"""Attacks that edit weights directly: pruning and quantization."""

from __future__ import annotations

import copy

import torch
from torch import nn

from wmark.errors import UsageError


def linear_weights(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Every conv/linear weight of the model, each once (a tied one too), with its output-channel axis.

    Besides ``nn.Linear`` and ``nn.ConvNd``: transposed convolutions (in × out × k…), ``nn.MultiheadAttention``'s
    input projections (raw parameters, not ``nn.Linear``) and Hugging Face's ``Conv1D`` (GPT-2's in × out
    projections). Pruning, quantization and noise that skip these leave attention and decoders untouched.
    """
    found: dict[int, tuple[torch.Tensor, int]] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            pairs = [(m.weight, 0)]
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            pairs = [(m.weight, 1)]
        elif isinstance(m, nn.MultiheadAttention):
            pairs = [(w, 0) for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
                     if w is not None]
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(m.weight, torch.Tensor):
            pairs = [(m.weight, 1)]  # Hugging Face's, recognised without importing transformers
        else:
            continue
        for w, axis in pairs:
            found.setdefault(id(w), (w, axis))
    return list(found.values())


@torch.no_grad()
def prune(model: nn.Module, *, sparsity: float) -> nn.Module:
    """Global magnitude pruning: zero the ``sparsity`` fraction of conv/linear weights (:func:`linear_weights`)
    smallest in |w|."""
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"The pruning sparsity must be in [0, 1), got {sparsity}.")
    attacked = copy.deepcopy(model)
    weights = [w for w, _ in linear_weights(attacked)]
    if not weights or sparsity == 0.0:
        return attacked
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(sparsity * magnitudes.numel())
    if k == 0:
        return attacked
    # exactly the k smallest by rank: a threshold zeroed every weight tied with the k-th (quantized weights
    # share few magnitudes), so more than the asked fraction
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[torch.topk(magnitudes, k, largest=False, sorted=False).indices] = False
    for w, mask in zip(weights, keep.split([w.numel() for w in weights])):
        w.mul_(mask.view(w.shape).to(w.dtype))
    return attacked


@torch.no_grad()
def quantize(model: nn.Module, *, bits: int = 8) -> nn.Module:
    """Symmetric per-output-channel quantization of conv/linear weights (:func:`linear_weights`), stored
    de-quantized.

    The result has exactly the values an int8 deployment computes with, in float32 tensors that load
    into the original architecture (a float16 or bfloat16 model keeps its dtype, the values rounded to it).
    """
    if not 2 <= bits <= 16:
        raise UsageError(f"Quantisation bits must be between 2 and 16, got {bits}.")
    attacked = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    for w, axis in linear_weights(attacked):
        # in float32: float16 rounds the 1e-12 floor to 0, so an all-zero channel (a pruned one) became 0/0 = NaN
        channels = w.movedim(axis, 0).float()
        flat = channels.reshape(channels.shape[0], -1)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / levels
        q = torch.round(flat / scale[:, None]).clamp(-levels, levels)
        w.copy_((q * scale[:, None]).reshape(channels.shape).movedim(0, axis))
    return attacked
