"""Ops that meet a space's units with another axis (a broadcast across ranks or layouts, a contraction, a layer
reading the wrong axis) leave no permutation or sign flip of that space alone function-preserving: the reader
makes the space opaque, so nothing is aligned through it and a layer reading it is refused. Ops that pair unit
with unit (an elementwise product of tensors of one layout, a cat along another axis) join the spaces instead."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import Graph, plan, read_graph

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Width(nn.Module):
    """A linear layer over the width of a channels-first tensor (a misread: it reads no channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.fc(h)


class ChannelsLastDepthwise(nn.Module):
    """A depthwise conv of a channels-last tensor: it reads the rows as channels and slides over the units."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.dw(h.permute(0, 2, 3, 1))


class Gated(nn.Module):
    """A learned scalar (ReZero's gate, shape ``(1,)`` or ``()``) scaling the stream before a branch is added."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full(shape, 0.5))

    def forward(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return h * self.s + k


class SpatialAttention(nn.Module):
    """A single-channel map scaling the stream (spatial attention): one value for all channels of a position."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Conv2d(8, 1, 1)

    def forward(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return h * torch.sigmoid(self.g(k))


class Joined(nn.Module):
    """A stream ``h`` (``a`` through a BatchNorm plus a 1×1 ``skip``, no activation: each channel's sign may flip)
    and a branch ``k`` on 8×8 maps with 8 channels, met by ``op``; ``conv`` reads the stream. Every axis but the
    batch has 8 entries, so any axis may meet any other."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.skip = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 4, 1)
        self.op = op

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, k = self.bn(self.a(x)) + self.skip(x), torch.relu(self.b(x))
        # the channel maximum does not change when the channels of the op's output are permuted
        return self.conv(h).mean((2, 3)), self.op(h, k).amax(1).flatten(1)


def _model(op: Op) -> Joined:
    torch.manual_seed(0)
    model = Joined(op)
    with torch.no_grad():
        model.bn.weight.normal_()
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
    return model.eval()


def _keeps_function(model: Joined, graph: Graph) -> None:
    """Every permutation and sign flip the graph claims keeps the model's outputs."""
    x = torch.randn(1, 3, 8, 8)  # a batch of one: a rank-3 operand broadcasts over the other's batch
    other = copy.deepcopy(model)
    for seed in range(3):
        other.load_state_dict(permute_spaces(model.state_dict(), graph=graph, seed=seed, signs=True))
        for got, want in zip(other(x), model(x)):
            assert torch.allclose(got, want, atol=1e-5), seed


@pytest.mark.parametrize(("op", "why"), [
    (lambda h, k: h + h.mean(2), "an add of rank-4 and rank-3 tensors"),
    (lambda h, k: h - h.mean(2), "a sub of rank-4 and rank-3 tensors"),
    (lambda h, k: h * h.mean(2), "a mul of rank-4 and rank-3 tensors"),
    (lambda h, k: torch.where(k > 0, h, k.mean(3)), "a where of rank-4 and rank-3 tensors"),
    (lambda h, k: torch.lerp(h, h.mean(2), 0.5), "a lerp of rank-4 and rank-3 tensors"),
    (lambda h, k: h @ k, "a matmul"),
    (lambda h, k: torch.bmm(h.mean(2), k.mean(3)).unsqueeze(1), "a bmm"),
    (lambda h, k: torch.einsum("nchw,nc->nhw", h, k.mean((2, 3))).unsqueeze(1), "an einsum"),
    (lambda h, k: torch.cat([h, h.permute(0, 2, 3, 1)], 2), "a cat of a channels-last and a channels-first tensor"),
    (Width(), "a linear layer over the last axis of a rank-4 tensor whose units sit on dimension 1"),
    (ChannelsLastDepthwise(), r"a reshape, pooling, mean or conv of a linear layer's output"),
])
def test_an_op_meeting_the_units_with_another_axis_makes_their_space_opaque(op: Op, why: str) -> None:
    model = _model(op)
    g = read_graph(model)
    assert g.spaces[g.layer("a.weight").out].kind == "opaque"
    with pytest.raises(UsageError, match=f"conv.weight reads the output of a layer whose units also feed {why}.* that "
                                         "wmark cannot align through"):
        plan(g, "conv.weight")
    _keeps_function(model, g)


@pytest.mark.parametrize("op", [
    lambda h, k: h * k,
    lambda h, k: torch.cat([h, k], 2),
    lambda h, k: h - k,
    Gated((1,)),
    Gated(()),
])
def test_an_op_pairing_unit_with_unit_joins_the_spaces(op: Op) -> None:
    """Each branch's channels were permuted on their own, which the product or the cat along the rows undoes.

    A one-element parameter scales every unit alike, as a number does: a ``(1,)`` one was read as a rank-1
    operand meeting the units with another axis (the stream made opaque), a ``()`` one left the product opaque.
    """
    model = _model(op)
    g = read_graph(model)
    assert g.layer("a.weight").out == g.layer("b.weight").out
    assert g.spaces[g.layer("a.weight").out].kind == "free"
    plan(g, "conv.weight")
    _keeps_function(model, g)


def test_a_stack_joins_the_spaces_and_hides_their_units() -> None:
    """A stack along dimension 0 moves the units to dimension 2 before ``sum(0)`` moves them back; the reader follows
    no unit through an opaque op, so the joined space is opaque too (no permutation claimed, none broken)."""
    model = _model(lambda h, k: torch.stack([h, k], 0).sum(0))
    g = read_graph(model)
    assert g.layer("a.weight").out == g.layer("b.weight").out
    assert g.spaces[g.layer("a.weight").out].kind == "opaque"
    _keeps_function(model, g)


@pytest.mark.parametrize("op", [
    lambda h, k: torch.cat([h, k], 1),
    lambda h, k: torch.cat([h, k], dim=1),
    lambda h, k: torch.cat([h, k], axis=1),  # numpy's name, which torch takes too: it was read as dim 0
    lambda h, k: torch.concat([h, k], axis=-3),
])
def test_a_cat_along_the_units_keeps_each_space(op: Op) -> None:
    model = _model(op)
    g = read_graph(model)
    assert g.layer("a.weight").out != g.layer("b.weight").out
    assert g.spaces[g.layer("a.weight").out].kind == "free"  # the cat's output is opaque: no sign flips
    _keeps_function(model, g)


def test_a_single_channel_map_scaling_the_units_joins_nothing() -> None:
    """The map gives every channel of a position one value, so the stream's channels still permute on their own;
    its 1 unit was read as a count the stream's 8 did not match, and the stream made opaque."""
    model = _model(SpatialAttention())
    g = read_graph(model)
    a, b = g.layer("a.weight").out, g.layer("b.weight").out
    assert a != b and g.spaces[a].kind == g.spaces[b].kind == "free"
    assert g.layer("op.g.weight").inp == b
    plan(g, "conv.weight")
    _keeps_function(model, g)
