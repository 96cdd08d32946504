"""Squeeze-and-excitation gates written as MobileNetV3/EfficientNet ports often write them: the pooled 1×1 map
squeezed with ``view(b, c)`` or ``reshape(b, c)`` before the linear layers, and the gate broadcast back with
``expand_as(x)`` or ``expand(-1, -1, h, w)`` before ``x * s``. Both keep the channels where they were (a view to
``(batch, n)`` is a ``flatten(1)``, the element count fixing n; an expand copies values along size-1 axes only), but
the reader made the stream opaque at either, so such a net could not be marked. A reshape or expand that does move
the channels (the spatial size folded into them, one unit copied across them) stays opaque."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _whitebox_helpers import assert_reads_back, assert_twins_near_chance, mark_proj, train_gray
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SQUEEZES: dict[str, Op] = {  # (pooled map or map, stream) → the (B, C) tensor the first linear layer reads
    "mean-view": lambda h, x: h.mean((2, 3), keepdim=True).view(x.size(0), x.size(1)),
    "pool-reshape": lambda h, x: F.adaptive_avg_pool2d(h, 1).reshape(x.shape[0], x.shape[1]),
    "pool-view-literal": lambda h, x: F.adaptive_avg_pool2d(h, 1).view(x.size(0), 64),
    "pool-flatten": lambda h, x: F.adaptive_avg_pool2d(h, 1).flatten(1),  # read before: the expands alone are new
}
EXCITES: dict[str, Op] = {  # (gate (B, C), stream) → the gated stream
    "view": lambda s, x: x * s.view(x.size(0), x.size(1), 1, 1),  # read before: the squeezes alone are new
    "expand_as": lambda s, x: x * s.view(x.size(0), x.size(1), 1, 1).expand_as(x),
    "expand": lambda s, x: x * s[:, :, None, None].expand(-1, -1, x.size(2), x.size(3)),
    "expand-full": lambda s, x: s.view(x.size(0), -1, 1, 1).expand(x.size(0), x.size(1), x.size(2), x.size(3)) * x,
}


class SENet(nn.Module):
    """Stem, a 64-channel conv (room for 32 bits in the 1×1 conv reading it), a linear SE on its output, head."""

    def __init__(self, seed: int, squeeze: str = "mean-view", excite: str = "expand_as") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 64)
        self.proj = nn.Conv2d(64, 32, 1)
        self.head = nn.Linear(32, 10)
        self.squeeze, self.excite = squeeze, excite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.stem(x))))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(SQUEEZES[self.squeeze](h, h)))))
        return self.head(torch.relu(self.proj(EXCITES[self.excite](s, h))).mean((2, 3)))


def permuted(model: SENet, seed: int) -> SENet:
    out = SENet(99, model.squeeze, model.excite)
    out.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed, signs=True))
    return out.eval()


@pytest.mark.parametrize("squeeze", list(SQUEEZES))
@pytest.mark.parametrize("excite", list(EXCITES))
def test_the_gate_shares_the_stream_and_permuting_it_keeps_the_function(squeeze: str, excite: str) -> None:
    model = SENet(0, squeeze, excite).eval()
    x = torch.randn(4, 1, 16, 16)
    model(x)  # the forward is real
    g = read_graph(model)
    stream = g.layer("conv.weight").out
    assert g.spaces[stream].kind == "free"
    assert g.layer("fc1.weight").inp == stream == g.layer("fc2.weight").out == g.layer("proj.weight").inp
    plan(g, "proj.weight")
    for seed in range(2):
        other = permuted(model, seed)
        assert not torch.equal(other.fc2.weight, model.fc2.weight)
        assert torch.allclose(other(x), model(x), atol=1e-5)


class ConvThen(nn.Module):
    """An 8-channel conv on 3×8×8 inputs, then ``op`` (of the conv's output and that output), then ``fc``; with
    ``gate``, a one-channel 1×1 conv of the conv's output is what ``op`` gets first."""

    def __init__(self, op: Op, fc: nn.Module, gate: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 1, 1) if gate else None
        self.op, self.fc = op, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(self.op(torch.sigmoid(self.gate(h)) if self.gate is not None else h, h))


def test_a_view_to_batch_and_features_of_a_larger_map_is_a_flatten() -> None:
    """``view(b, 4 * c)`` of a 2×2 map: each channel a block of 4 of the linear layer's columns, as after flatten(1)."""
    model = ConvThen(lambda h, x: F.adaptive_avg_pool2d(h, 2).view(x.size(0), 32), nn.Linear(32, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    g = read_graph(model)
    assert g.layer("fc.weight").inp == g.layer("conv.weight").out
    assert g.units(g.layer("fc.weight")) == (8, 4)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1, signs=True))
    assert not torch.equal(other.fc.weight, model.fc.weight)
    assert torch.allclose(other(x), model(x), atol=1e-5)


@pytest.mark.parametrize(("op", "fc", "gate", "why"), [
    # The spatial size folded into the channels: (B, 8, 2, 2) → (B, 32, 1, 1), or (B, 8, 1, 8) → (B, 64, 1, 1).
    (lambda h, x: F.adaptive_avg_pool2d(h, 2).view(x.size(0), -1, 1, 1), nn.Conv2d(32, 2, 1), False, "a view other"),
    (lambda h, x: h.mean(2, keepdim=True).reshape(x.size(0), 64, 1, 1), nn.Conv2d(64, 2, 1), False,
     "a reshape other"),
    (lambda h, x: h.view(x.size(0), 4, -1), nn.Conv1d(4, 2, 1), False, "a view other"),  # (B, 4, 128)
    # One unit (a one-channel attention map) copied across the channels' axis.
    (lambda g, x: x * g.expand_as(x), nn.Conv2d(8, 2, 1), True, "an expand_as that may copy one unit"),
    (lambda g, x: x * g.expand(x.size(0), x.size(1), 8, 8), nn.Conv2d(8, 2, 1), True,
     "an expand that may copy one unit"),
    # New leading axes move the channels to dimension 2.
    (lambda h, x: h.expand(2, -1, -1, -1, -1).sum(0), nn.Conv2d(8, 2, 1), False, "an expand to another or unknown"),
], ids=["pool2-view", "mean-h-reshape", "view-b-4", "gate-expand_as", "gate-expand", "expand-leading"])
def test_a_reshape_or_expand_that_moves_the_channels_stays_opaque(op: Op, fc: nn.Module, gate: bool, why: str) -> None:
    model = ConvThen(op, fc, gate).eval()
    model(torch.randn(2, 3, 8, 8))  # the forward is real: each case runs
    g = read_graph(model)
    source = g.layer("gate.weight" if gate else "conv.weight").out
    assert g.spaces[source].kind == "opaque"
    assert why in g.spaces[source].why
    with pytest.raises(UsageError, match="fc.weight reads the output of"):
        plan(g, "fc.weight")


class SizeFrom(nn.Module):
    """``view(n, -1)`` of the pooled (B, 8) map with ``n`` the first size of the *input transposed*: 8 on 8×8
    inputs, so (B, 8) → (8, B) puts the units on dimension 0 (the forward runs at batch size 2 only, as such a
    net would at its own); ``square`` views it to (8, B, 1, 1) for a 1×1 conv instead."""

    def __init__(self, square: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc: nn.Module = nn.Conv2d(2, 2, 1) if square else nn.Linear(2, 2)
        self.square = square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(x)).mean((2, 3))
        n = x.transpose(0, 2).size(0)
        return self.fc(pooled.view(n, -1, 1, 1) if self.square else pooled.view(n, -1))


@pytest.mark.parametrize("square", [False, True])
def test_a_view_whose_first_size_is_not_the_batch_size_stays_opaque(square: bool) -> None:
    model = SizeFrom(square).eval()
    model(torch.randn(2, 3, 8, 8))
    g = read_graph(model)
    space = g.spaces[g.layer("conv.weight").out]
    assert space.kind == "opaque" and "a view other" in space.why
    with pytest.raises(UsageError, match="fc.weight reads the output of"):
        plan(g, "fc.weight")


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("se_forms")
    key, model = mark_proj(SENet(0), d)
    return key, model, d


def test_the_mark_reads_back_after_a_stream_permutation(marked) -> None:
    key, model, d = marked
    print("SE forms attacked matches", assert_reads_back(key, d, model, permuted))


def test_an_independent_twin_is_near_chance(marked) -> None:
    key, _, d = marked
    assert_twins_near_chance(key, d, {100: train_gray(SENet(100), 100, steps=80)}, permuted)


class CentredStream(nn.Module):
    """A stream with no activation plus its own spatial mean broadcast back with ``expand_as``: every op on it is odd
    in each channel, so a thief may flip channels through the BatchNorm and the conv reading the stream."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn, self.conv = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.stem(x))
        return self.conv(h + h.mean((2, 3), keepdim=True).expand_as(h)).mean((2, 3))


def test_an_expand_is_odd_in_each_unit_so_the_stream_stays_signed() -> None:
    model = CentredStream()
    with torch.no_grad():
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
    model.eval()
    g = read_graph(model)
    assert g.spaces[g.layer("stem.weight").out].kind == "signed"
    other, x = copy.deepcopy(model), torch.randn(2, 1, 8, 8)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=0, signs=True))
    # The same biases up to order and sign, some of them negated: the channels were flipped, not only moved.
    assert torch.equal(other.bn.bias.abs().sort().values, model.bn.bias.abs().sort().values)
    assert not torch.equal(other.bn.bias.sort().values, model.bn.bias.sort().values)
    assert torch.allclose(other(x), model(x), atol=1e-5)


class HardSENet(SENet):
    """MobileNetV3's block: hard-swish activations and a hard-sigmoid gate, as modules and as functions."""

    def __init__(self, seed: int, functional: bool) -> None:
        super().__init__(seed)
        self.functional = functional
        self.act, self.gate = nn.Hardswish(), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.hardswish if self.functional else self.act
        gate = F.hardsigmoid if self.functional else self.gate
        h = act(self.conv(act(self.stem(x))))
        s = gate(self.fc2(F.relu6(self.fc1(F.adaptive_avg_pool2d(h, 1).flatten(1)))))
        return self.head(act(self.proj(h * s.view(x.size(0), -1, 1, 1))).mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
def test_hard_swish_and_hard_sigmoid_keep_the_stream(functional: bool) -> None:
    model = HardSENet(0, functional).eval()
    x = torch.randn(4, 1, 16, 16)
    g = read_graph(model)
    stream = g.layer("conv.weight").out
    assert g.spaces[stream].kind == "free"
    assert g.layer("fc1.weight").inp == stream == g.layer("fc2.weight").out == g.layer("proj.weight").inp
    other = HardSENet(99, functional)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=0))
    other.eval()
    assert not torch.equal(other.fc2.weight, model.fc2.weight)
    assert torch.allclose(other(x), model(x), atol=1e-5)


@pytest.mark.parametrize("squeeze", [
    lambda h, x: F.adaptive_avg_pool2d(h, 1).view((x.size(0), x.size(1))),  # one tuple of sizes
    lambda h, x: torch.reshape(F.adaptive_avg_pool2d(h, 1), (x.shape[0], -1)),  # the function, not the method
    lambda h, x: F.adaptive_avg_pool2d(h, 1).reshape([x.size(0), x.size(1) * x.size(2) // x.size(2)]),
])
def test_sizes_given_as_one_tuple_or_to_torch_reshape_are_read_as_sizes(squeeze: Op) -> None:
    SQUEEZES["probe"] = squeeze
    try:
        model = SENet(0, "probe", "view").eval()
        g = read_graph(model)
        stream = g.layer("conv.weight").out
        assert g.spaces[stream].kind == "free"
        assert g.layer("fc1.weight").inp == stream
        x = torch.randn(2, 1, 16, 16)
        assert torch.allclose(permuted(model, 0)(x), model(x), atol=1e-5)
    finally:
        del SQUEEZES["probe"]

