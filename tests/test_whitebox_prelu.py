"""PReLU in the white-box reader (``nn.PReLU``, or ``F.prelu``/``torch.prelu`` with the model's own slopes, which
slopes shared by two spaces join): one slope keeps the units anywhere; one slope per channel of dimension 1 keeps
them where they sit on dimension 1 (its weight then permutes with the units, as a BatchNorm's does) and is opaque
on a linear layer's rank-3 output, whose units sit on the last axis. Not odd, so its input never flips signs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph


class PReLUNet(nn.Module):
    """conv (8) → PReLU(8) → conv (8) → BatchNorm → PReLU() → pool → fc (2), on 3×8×8; slopes drawn away from 0.25
    so that permuting the per-channel ones wrongly would change the outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8)
        self.conv2, self.bn, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU()
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.act1.weight.uniform_(-1.0, 1.0)
            self.act2.weight.fill_(0.6)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv1(x))
        return self.fc(self.act2(self.bn(self.conv2(h))).mean((2, 3)))


def test_prelu_keeps_the_channels_and_its_slopes_permute_with_them() -> None:
    model = PReLUNet().eval()
    g = read_graph(model)
    first, second = g.spaces[g.layer("conv1.weight").out], g.spaces[g.layer("conv2.weight").out]
    assert first.kind != "opaque" and second.kind != "opaque"
    assert g.layer("conv2.weight").inp == g.layer("conv1.weight").out
    assert "act1.weight" in first.params and "act2.weight" not in second.params
    assert [lay.name for lay in plan(g, "fc.weight")][-1] == "fc.weight"
    x = torch.randn(4, 3, 8, 8)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=3, signs=True))
    assert not torch.equal(other.act1.weight, model.act1.weight)
    assert not torch.equal(other.conv1.weight, model.conv1.weight)
    assert torch.allclose(other(x), model(x), atol=1e-5)


class TokensThen(nn.Module):
    """A linear layer over (B, T, 8) tokens, a PReLU of ``slopes`` slopes, another linear layer."""

    def __init__(self, slopes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = nn.Linear(4, 8), nn.PReLU(slopes), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def test_prelu_with_a_slope_per_channel_of_dimension_1_is_opaque_on_a_linear_layers_tokens() -> None:
    model = TokensThen(5).eval()
    model(torch.randn(2, 5, 4))  # five tokens: PReLU(5) scales dimension 1, the tokens, not the units
    g = read_graph(model)
    space = g.spaces[g.layer("down.weight").inp]
    assert space.kind == "opaque" and "a PReLU of a linear layer's output" in space.why
    with pytest.raises(UsageError, match="down.weight reads the output of"):
        plan(g, "down.weight")


def test_prelu_with_one_slope_keeps_a_linear_layers_tokens() -> None:
    model = TokensThen(1).eval()
    g = read_graph(model)
    assert g.layer("down.weight").inp == g.layer("up.weight").out
    x = torch.randn(2, 5, 4)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1))
    assert not torch.equal(other.up.weight, model.up.weight)
    assert torch.allclose(other(x), model(x), atol=1e-5)


class FunctionalPReLU(nn.Module):
    """``PReLUNet`` with its slopes used functionally: ``F.prelu(x, a)`` with one slope per channel, ``torch.prelu``
    with one shared slope, and ``slopes`` picking other forms of the second one."""

    def __init__(self, slopes: str = "shared") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.fc, self.slopes = nn.BatchNorm2d(8), nn.Linear(8, 2), slopes
        self.a = nn.Parameter(torch.empty(8).uniform_(-1.0, 1.0))
        self.b = nn.Parameter(torch.full((1,), 0.6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.prelu(self.conv1(x), self.a)
        second = {"shared": self.b, "same per-channel": self.a, "computed": self.a * 2}[self.slopes]
        return self.fc(torch.prelu(self.bn(self.conv2(h)), second).mean((2, 3)))


def test_a_functional_prelu_keeps_the_channels_and_its_slopes_permute_with_them() -> None:
    """``F.prelu`` with the model's own slopes was opaque (and its slopes an opaque operand): the net could not be
    aligned past it."""
    model = FunctionalPReLU().eval()
    g = read_graph(model)
    assert g.layer("conv1.weight").out != g.layer("conv2.weight").out
    first, second = g.spaces[g.layer("conv1.weight").out], g.spaces[g.layer("conv2.weight").out]
    assert first.kind == second.kind == "free"
    assert first.params == ["a"] and "b" not in second.params
    assert [lay.name for lay in plan(g, "fc.weight")] == ["conv1.weight", "conv2.weight", "fc.weight"]
    x = torch.randn(4, 3, 8, 8)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=3, signs=True))
    assert not torch.equal(other.a, model.a)
    assert torch.allclose(other(x), model(x), atol=1e-5)


def test_slopes_shared_by_two_spaces_join_them() -> None:
    """The same per-channel slopes scale both convs' outputs: they permute once, so both spaces permute alike."""
    model = FunctionalPReLU("same per-channel").eval()
    g = read_graph(model)
    space = g.layer("conv1.weight").out
    assert g.layer("conv2.weight").out == space == g.layer("conv2.weight").inp
    assert g.spaces[space].params.count("a") == 1
    x = torch.randn(4, 3, 8, 8)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1))
    assert not torch.equal(other.a, model.a)
    assert torch.allclose(other(x), model(x), atol=1e-5)


def test_slopes_computed_in_forward_are_opaque() -> None:
    model = FunctionalPReLU("computed").eval()
    g = read_graph(model)
    assert g.spaces[g.layer("conv2.weight").out].kind == "opaque"
    with pytest.raises(UsageError, match="fc.weight reads the output of a PReLU whose slopes are not a parameter"):
        plan(g, "fc.weight")


class FunctionalTokens(nn.Module):
    """A linear layer over (B, 5, 8) tokens, ``F.prelu`` with 5 slopes (one per token), another linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.a = nn.Linear(4, 8), nn.Linear(8, 2), nn.Parameter(torch.rand(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.prelu(self.up(x), self.a))


def test_a_functional_prelu_with_a_slope_per_token_is_opaque() -> None:
    model = FunctionalTokens().eval()
    model(torch.randn(2, 5, 4))
    g = read_graph(model)
    assert g.spaces[g.layer("up.weight").out].kind == "opaque"
    with pytest.raises(UsageError, match="down.weight reads the output of a PReLU of a linear layer's output"):
        plan(g, "down.weight")
