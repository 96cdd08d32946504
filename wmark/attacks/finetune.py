"""Fine-tuning attacks: the thief trains the copy further on data of their own."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from wmark.errors import UsageError
from wmark.training import make_loader, train_epochs

Layers = Literal["all", "last", "reinit-last"]


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier head: the last ``nn.Linear`` registered in the model."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("The model has no nn.Linear layer to treat as its head; fine-tune all layers.")
    return linears[-1]


def finetune(model: nn.Module, *, x: torch.Tensor, y: torch.Tensor, epochs: int = 5, lr: float = 1e-3,
             batch_size: int = 64, layers: Layers = "all", seed: int = 0, progress: bool = False) -> nn.Module:
    """Return a copy of ``model`` fine-tuned on ``(x, y)`` with Adam.

    Args:
        layers: ``all`` trains every parameter; ``last`` only the head; ``reinit-last`` re-initialises the
            head first, then trains every parameter.
    """
    if layers not in ("all", "last", "reinit-last"):
        raise UsageError(f"Unknown layers {layers!r} to fine-tune; use all, last or reinit-last.")
    attacked = copy.deepcopy(model)
    dtypes = {name: t.dtype for name, t in [*attacked.named_parameters(), *attacked.named_buffers()]}
    # Adam's float16 steps are NaN (its eps rounds to 0: 0/0 where a gradient is 0), so a float16 model trains on
    # float32 master weights, as mixed-precision training does, and comes back in its own dtypes
    half = torch.float16 in dtypes.values()
    if half:
        attacked.float()
    torch.manual_seed(seed)
    head = last_linear(attacked)
    if layers == "reinit-last":
        head.reset_parameters()
    params = list(head.parameters()) if layers == "last" else list(attacked.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    train_epochs(attacked, make_loader(x, y, batch_size=batch_size, seed=seed), epochs=epochs,
                 optimizer=optimizer, progress=progress, desc="fine-tune")
    if half:
        with torch.no_grad():
            for name, t in [*attacked.named_parameters(), *attacked.named_buffers()]:
                t.data = t.data.to(dtypes[name])
    return attacked
