"""An op the graph reader cannot place makes its output opaque, and the space it reads opaque too: a layer reading
that output keeps its columns while the units permute, so a permutation claimed for the input's space would
change the outputs. Only an op of a fixed order (a slice, a partial flatten) did so; an unknown function, an
interpolation, a concatenation along the units or a mean over the batch left the space claimed permutable (each
claimed permutation changed the outputs by 0.05-0.1). Ops whose output ignores the units'
order (a reduction over them) and reads of a tensor's shape still leave it permutable."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph

Op = Callable[[torch.Tensor, nn.Module], torch.Tensor]


class Branched(nn.Module):
    """A conv's channels read by a 1×1 conv ``b`` and, through ``op``, by another layer ``fc``."""

    def __init__(self, op: Op, fc: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.op, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), op, fc
        self.up = nn.Upsample(scale_factor=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h).mean((2, 3)) + self.fc(self.op(h, self)).flatten(1)[:, :4]


def _keeps_function(model: nn.Module) -> str:
    """The kind of ``a``'s space, after checking every permutation the graph claims keeps the outputs."""
    g = read_graph(model, input_rank=4)
    other, x = copy.deepcopy(model), torch.randn(2, 3, 8, 8)
    for seed in range(2):
        other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=seed, signs=True))
        assert torch.allclose(other(x), model(x), atol=1e-5), seed
    return g.spaces[g.layer("a.weight").out].kind


@pytest.mark.parametrize(("op", "fc"), [
    (lambda h, m: torch.erf(h), nn.Conv2d(8, 4, 1)),
    (lambda h, m: nn.functional.interpolate(h, scale_factor=2.0), nn.Conv2d(8, 4, 1)),
    (lambda h, m: m.up(h), nn.Conv2d(8, 4, 1)),
    (lambda h, m: torch.cat([h, h * 2], 1), nn.Conv2d(16, 4, 1)),
    (lambda h, m: torch.cumsum(h, 1), nn.Conv2d(8, 4, 1)),
    (lambda h, m: h.mean(0, keepdim=True).expand_as(h), nn.Conv2d(8, 4, 1)),
])
def test_an_op_the_reader_cannot_place_makes_the_space_it_reads_opaque(op: Op, fc: nn.Module) -> None:
    model = Branched(op, fc).eval()
    assert _keeps_function(model) == "opaque"
    with pytest.raises(UsageError, match="b.weight reads the output of a layer whose units also feed"):
        plan(read_graph(model, input_rank=4), "b.weight")


@pytest.mark.parametrize("op", [
    lambda h, m: h.mean(1, keepdim=True),  # over the units: the same whatever their order
    lambda h, m: h.amax((1, 2), keepdim=True),
    lambda h, m: torch.cat([h, h * 2], 1).sum(1, keepdim=True),
    lambda h, m: (h - 1).amin(1, keepdim=True),
    lambda h, m: h.amax(1, keepdim=True).expand(h.size(0), 1, h.shape[2], -1) * h.dim(),  # its shape read only
])
def test_an_op_that_ignores_the_units_order_leaves_their_space_permutable(op: Op) -> None:
    model = Branched(op, nn.Conv2d(1, 4, 1)).eval()
    assert _keeps_function(model) == "free"
    plan(read_graph(model, input_rank=4), "b.weight")
