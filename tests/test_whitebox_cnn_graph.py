"""Residual CNN graphs wmark must read right or refuse: channel concatenation, in-place adds, grouped convs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph


def same_function_after_permuting(model: nn.Module, fresh: nn.Module, x: torch.Tensor) -> bool:
    graph = read_graph(model)
    model.eval()
    for seed in range(4):
        fresh.load_state_dict(permute_spaces(model.state_dict(), graph=graph, seed=seed))
        if not torch.allclose(fresh.eval()(x), model(x), atol=1e-5):
            return False
    return True


class DenseAdd(nn.Module):
    """A residual add of a channel concatenation (DenseNet-style): its channels come from two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 2, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = h + F.relu(torch.cat([self.a(h), self.b(h)], 1))
        return self.fc(self.conv(h).mean((2, 3)))


def test_a_channel_concatenation_is_refused_not_misread() -> None:
    """The cat was skipped, so the add read as the stem's space alone and a permutation of it broke the model."""
    torch.manual_seed(0)
    model = DenseAdd()
    g = read_graph(model)
    assert g.spaces[g.layer("conv.weight").inp].kind == "opaque"
    with pytest.raises(UsageError, match="reads the output of cat that wmark cannot align through"):
        plan(g, "conv.weight")
    assert same_function_after_permuting(model, DenseAdd(), torch.randn(2, 3, 8, 8))
