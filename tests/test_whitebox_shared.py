"""A module with one parameter entry per unit applied to two tensors (one ``nn.PReLU(C)``, BatchNorm, LayerNorm or
layer scale reused in ``forward``) permutes its entries once, so the spaces it follows are one space. Each space
listed the parameter and permuted it on its own: every claimed permutation changed the outputs (by 0.1-2). Where
one use cannot permute (the model's input, slopes computed from the parameter), the spaces are opaque instead."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wmark.attacks.symmetry import flip_gain_signs, permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph


class Chain(nn.Module):
    """conv a (8) → ``norm`` → ReLU → conv b (8) → the same ``norm`` → ReLU → pool → fc (2), on 3×8×8."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.norm, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), norm, \
            nn.Linear(8, 2)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.uniform_(-1.0, 1.0)  # away from the defaults, so that a wrong permutation shows
            if isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.a(x)))
        return self.fc(torch.relu(self.norm(self.b(h))).mean((2, 3)))


class Tokens(nn.Module):
    """linear a (8) → LayerNorm → GELU → linear b (8) → the same LayerNorm → fc (2), or a layer scale ``g`` in
    place of the norm: an MLP over the last axis."""

    def __init__(self, scale: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.ln, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)
        self.g = nn.Parameter(torch.empty(8).uniform_(-1.0, 1.0))
        with torch.no_grad():
            self.ln.weight.uniform_(-1.0, 1.0)
            self.ln.bias.uniform_(-1.0, 1.0)
        self.scale = scale

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.g if self.scale else self.ln(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.b(F.gelu(self.norm(self.a(x))))))


def _keeps_function(model: nn.Module, x: torch.Tensor):
    """The graph, after checking that every permutation and sign flip it claims keeps the outputs."""
    g = read_graph(model.eval(), input_rank=x.dim())
    other = copy.deepcopy(model)
    for seed in range(3):
        other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=seed, signs=True))
        assert torch.allclose(other(x), model(x), atol=1e-5), seed
        if any(lay.gain for lay in g.layers):
            other.load_state_dict(flip_gain_signs(model.state_dict(), graph=g, seed=seed))
            assert torch.allclose(other(x), model(x), atol=1e-5), seed
    return g


@pytest.mark.parametrize(("model", "x", "shared"), [
    (Chain(nn.PReLU(8)), torch.randn(2, 3, 8, 8), ["norm.weight"]),
    (Chain(nn.BatchNorm2d(8)), torch.randn(2, 3, 8, 8), ["norm.weight", "norm.bias", "norm.running_mean",
                                                         "norm.running_var"]),
    (Chain(nn.GroupNorm(1, 8)), torch.randn(2, 3, 8, 8), ["norm.weight", "norm.bias"]),
    (Tokens(), torch.randn(2, 4), ["ln.weight", "ln.bias"]),
    (Tokens(scale=True), torch.randn(2, 4), ["g"]),
])
def test_a_per_unit_module_applied_to_two_spaces_joins_them(model: nn.Module, x: torch.Tensor,
                                                             shared: list[str]) -> None:
    g = _keeps_function(model, x)
    space = g.layer("a.weight").out
    assert g.layer("b.weight").inp == g.layer("b.weight").out == space
    assert g.spaces[space].kind != "opaque" and g.spaces[space].params == shared
    assert not any(lay.own for lay in g.layers)  # a row's sign is not the norm's to absorb: both uses would see it
    assert [lay.name for lay in plan(g, "fc.weight")][-1] == "fc.weight"


class Twice(nn.Module):
    """One PReLU applied twice within one space (``act(h) + act(2h)``): its slopes permute once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.act.weight.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(self.act(h) + self.act(h * 2))


def test_a_module_applied_twice_in_one_space_lists_its_parameter_once() -> None:
    g = _keeps_function(Twice(), torch.randn(2, 3, 8, 8))
    assert g.spaces[g.layer("a.weight").out].params == ["act.weight"]


class OnInput(nn.Module):
    """One PReLU(3) on the model's input and on a conv's 3 channels; ``computed``: ``F.prelu`` with slopes ``s`` on
    conv a's output and ``2·s`` on conv b's."""

    def __init__(self, computed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 1), nn.PReLU(3)
        self.c, self.computed = nn.Conv2d(3, 4, 1), computed
        self.s = nn.Parameter(torch.empty(3).uniform_(-1.0, 1.0))
        with torch.no_grad():
            self.act.weight.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computed:
            return self.c(F.prelu(self.a(x), self.s)) + self.b(F.prelu(x, self.s * 2))
        return self.c(self.act(self.a(x))) + self.b(self.act(x))


@pytest.mark.parametrize(("computed", "why"), [
    (False, r"a PReLU \(act.weight\) applied both to the model's input and to another tensor"),
    (True, "the per-unit parameter s also used where wmark cannot place the units"),
])
def test_a_per_unit_parameter_that_one_use_cannot_permute_makes_its_spaces_opaque(computed: bool, why: str) -> None:
    g = _keeps_function(OnInput(computed), torch.randn(2, 3, 8, 8))
    assert g.spaces[g.layer("a.weight").out].kind == "opaque"
    with pytest.raises(UsageError, match=f"c.weight reads the output of {why}"):
        plan(g, "c.weight")


class GainInPlace(nn.Module):
    """A layer scale ``g`` over linear a's output, read by c; ``g`` also scales linear b's output in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)
        self.g = nn.Parameter(torch.empty(8).uniform_(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(x)
        h.mul_(self.g)  # a node no other reads: its effect reaches the output through h
        return self.c(self.a(x) * self.g) + self.d(h)


def test_a_gain_with_another_use_is_not_flipped_with_its_readers() -> None:
    """c was credited with g's sign flips, which the in-place product on b's output saw too."""
    g = _keeps_function(GainInPlace(), torch.randn(2, 4))
    assert g.layer("c.weight").gain is None
    assert g.spaces[g.layer("a.weight").out].kind == "opaque"
