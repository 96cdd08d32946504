"""Squeezes after a global pool, as ResNet and SE code writes them before the classifier
(``F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)``, ``x.squeeze()``, ``torch.squeeze(x, dim)``,
``x.squeeze((2, 3))``): each removes only the pooled axes of size 1, so the channels stay a space the classifier
reads. The reader made the squeeze's output opaque, so such a net could not be aligned past it. A squeeze that
could remove the units' axis or the batch axis, or a bare ``squeeze()`` of axes of unknown size, stays opaque."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph

Op = Callable[[torch.Tensor, nn.Module], torch.Tensor]
SQUEEZES: dict[str, Op] = {  # (B, 16, 8, 8) map → the (B, 16) vector the classifier reads
    "squeeze(-1) twice": lambda h, m: F.adaptive_avg_pool2d(h, 1).squeeze(-1).squeeze(-1),
    "squeeze()": lambda h, m: F.adaptive_avg_pool2d(h, 1).squeeze(),
    "torch.squeeze(x, dim)": lambda h, m: torch.squeeze(torch.squeeze(h.mean((2, 3), keepdim=True), 3), dim=2),
    "squeeze((2, 3))": lambda h, m: torch.relu(h.amax((2, 3), keepdim=True)).squeeze((2, 3)),
    "module pool, squeeze()": lambda h, m: m.pool(h).squeeze(),
}


class Pooled(nn.Module):
    """stem (8, BatchNorm) → conv (16) → ``op`` → fc (4), on 3×8×8."""

    def __init__(self, op: Op, fc: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1)
        self.pool, self.op, self.fc = nn.AdaptiveAvgPool2d((1, 1)), op, fc or nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.op(torch.relu(self.conv(torch.relu(self.bn(self.stem(x))))), self))


def _keeps_function(model: nn.Module, batch: int = 4) -> None:
    """Every permutation the graph claims keeps the outputs."""
    g = read_graph(model, input_rank=4)
    other, x = copy.deepcopy(model), torch.randn(batch, 3, 8, 8)
    for seed in range(2):
        other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=seed, signs=True))
        assert not torch.equal(other.conv.weight, model.conv.weight)
        assert torch.allclose(other(x), model(x), atol=1e-5), seed


@pytest.mark.parametrize("squeeze", list(SQUEEZES))
def test_a_squeeze_of_the_pooled_axes_keeps_the_channels(squeeze: str) -> None:
    model = Pooled(SQUEEZES[squeeze]).eval()
    g = read_graph(model, input_rank=4)
    assert g.layer("fc.weight").inp == g.layer("conv.weight").out
    assert g.spaces[g.layer("fc.weight").inp].kind == "free"
    assert [lay.name for lay in plan(g, "fc.weight")] == ["stem.weight", "conv.weight", "fc.weight"]
    _keeps_function(model)


def test_a_bare_squeeze_of_a_batch_of_one_still_keeps_the_function() -> None:
    """``squeeze()`` drops the batch axis too on a batch of one: the channels are then the only axis, which the
    classifier reads, so the permutation is still undone."""
    model = Pooled(SQUEEZES["squeeze()"]).eval()
    assert model(torch.randn(1, 3, 8, 8)).shape == (4,)
    _keeps_function(model, batch=1)


@pytest.mark.parametrize(("op", "fc", "why"), [
    (lambda h, m: h.mean((2, 3)).squeeze(1), None, "a squeeze that may remove the units' axis"),
    (lambda h, m: h.mean((2, 3)).squeeze(-1), None, "a squeeze that may remove the units' axis"),
    (lambda h, m: h.mean((2, 3)).squeeze(0), None, r"a squeeze of the batch axis \(it drops it on a batch of one\)"),
    (lambda h, m: h.mean(-1).squeeze(), nn.Linear(8, 4), r"a squeeze\(\) where the reader cannot tell which axes"),
    (lambda h, m: torch.squeeze(h.mean(-1), (0, 2)), nn.Linear(8, 4), "a squeeze of the batch axis"),
])
def test_a_squeeze_that_could_remove_the_units_or_the_batch_stays_opaque(op: Op, fc: nn.Module | None,
                                                                          why: str) -> None:
    model = Pooled(op, fc).eval()
    g = read_graph(model, input_rank=4)
    space = g.spaces[g.layer("conv.weight").out]
    assert space.kind == "opaque" and re.match(f"a layer whose units also feed {why}", space.why), space.why
    with pytest.raises(UsageError, match=f"fc.weight reads the output of {why}"):
        plan(g, "fc.weight")
    other = copy.deepcopy(model)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1))
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(other(x), model(x), atol=1e-5)


def test_a_squeeze_of_an_axis_of_unknown_size_keeps_the_channels_but_not_the_rank() -> None:
    """``squeeze(-1)`` of a map whose width the reader does not know leaves it whole or drops it: the channels stay
    on dimension 1 either way, but a linear layer reading the result may read the width, so it is refused."""
    model = Pooled(lambda h, m: h.squeeze(-1), nn.Linear(8, 4)).eval()
    g = read_graph(model, input_rank=4)
    assert g.spaces[g.layer("conv.weight").out].kind == "opaque"
    with pytest.raises(UsageError, match="fc.weight reads the output of a linear layer over the last axis of a tensor "
                                         "of unknown rank"):
        plan(g, "fc.weight")
