"""Weight noise: Gaussian noise on every conv/linear weight (attention projections included), scaled to each
tensor's own size."""

from __future__ import annotations

import copy

import torch
from torch import nn

from wmark.attacks.weights import linear_weights
from wmark.errors import UsageError


@torch.no_grad()
def noise(model: nn.Module, *, std: float, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with N(0, (std · rms(W))²) added to each conv/linear weight W.

    ``std`` is relative so one value means the same damage to every layer: 0.1 adds noise at 10 % of each
    weight tensor's root-mean-square.
    """
    if not 0.0 <= std <= 10.0:
        raise UsageError(f"The noise std must be between 0 and 10 (relative to each weight's RMS), got {std}.")
    attacked = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for w, _ in linear_weights(attacked):
        rms = w.pow(2).mean().sqrt()
        w.add_(torch.randn(w.shape, generator=gen).to(w) * std * rms)
    return attacked
