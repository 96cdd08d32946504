"""Attacks that edit weights directly: pruning and quantization."""

from __future__ import annotations

import copy

import torch
from torch import nn

from wmark.errors import UsageError


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


@torch.no_grad()
def prune(model: nn.Module, *, sparsity: float) -> nn.Module:
    """Global magnitude pruning: zero the ``sparsity`` fraction of conv/linear weights smallest in |w|."""
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"The pruning sparsity must be in [0, 1), got {sparsity}.")
    attacked = copy.deepcopy(model)
    weights = _weight_tensors(attacked)
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
    """Symmetric per-output-channel quantization of conv/linear weights, stored de-quantized.

    The result has exactly the values an int8 deployment computes with, in float32 tensors that load
    into the original architecture.
    """
    if not 2 <= bits <= 16:
        raise UsageError(f"Quantisation bits must be between 2 and 16, got {bits}.")
    attacked = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    for w in _weight_tensors(attacked):
        flat = w.reshape(w.shape[0], -1)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / levels
        q = torch.round(flat / scale[:, None]).clamp(-levels, levels)
        w.copy_((q * scale[:, None]).reshape(w.shape))
    return attacked
