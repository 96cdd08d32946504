"""Squeeze-and-excitation built from linear layers (EfficientNet, MobileNetV3): ``s = x.mean((2, 3))`` → Linear →
ReLU → Linear → sigmoid → ``s[:, :, None, None]`` (or ``s.view(b, c, 1, 1)``, ``s.unsqueeze(-1).unsqueeze(-1)``) →
``x * s``. The reshape keeps the gate's units on dimension 1 of a channels-first map, so the product pairs them with
the stream's: the second linear layer's rows share the stream's permutation. It was read as a channels-last gate
meeting a channels-first stream, and the stream made opaque: such a net could not be marked."""

from __future__ import annotations

import copy

import pytest
import torch
from _whitebox_helpers import assert_reads_back, assert_twins_near_chance, mark_proj, train_gray
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.whitebox.graph import plan, read_graph

FORMS = {
    "none-index": lambda s, x: s[:, :, None, None],
    "view": lambda s, x: s.view(x.size(0), x.size(1), 1, 1),
    "unsqueeze": lambda s, x: s.unsqueeze(-1).unsqueeze(-1),
}


class SE(nn.Module):
    def __init__(self, c: int, form: str, gate=torch.sigmoid) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 8), nn.Linear(8, c)
        self.form, self.gate = form, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * FORMS[self.form](s, x)


class SENet(nn.Module):
    """Stem, a 64-channel conv (room for 32 bits in the 1×1 conv reading it), an SE block on its output, head."""

    def __init__(self, seed: int, form: str = "none-index") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.se = SE(64, form)
        self.proj = nn.Conv2d(64, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se(torch.relu(self.conv(torch.relu(self.stem(x)))))
        return self.head(torch.relu(self.proj(h)).mean((2, 3)))


def permuted(model: nn.Module, seed: int) -> SENet:
    out = SENet(99, model.se.form)
    out.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed, signs=True))
    return out.eval()


@pytest.mark.parametrize("form", list(FORMS))
def test_the_gate_shares_the_stream_permutation_and_permuting_keeps_the_function(form: str) -> None:
    model = SENet(0, form).eval()
    g = read_graph(model)
    stream = g.layer("conv.weight").out
    assert g.spaces[stream].kind == "free"
    assert g.layer("se.fc2.weight").out == stream == g.layer("se.fc1.weight").inp == g.layer("proj.weight").inp
    plan(g, "proj.weight")
    x = torch.randn(4, 1, 16, 16)
    for seed in range(3):
        other = permuted(model, seed)
        assert not torch.equal(other.se.fc2.weight, model.se.fc2.weight)
        assert torch.allclose(other(x), model(x), atol=1e-5)


class ConvSE(nn.Module):
    """The conv-based SE (1×1 convs on a ``(B, C, 1, 1)`` map), then a conv reading the gated stream."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.fc1, self.fc2, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h * torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))).mean((2, 3))


def test_the_product_of_a_conv_se_keeps_the_stream() -> None:
    """The gate was joined with the stream, but the product was opaque: the conv reading it was refused."""
    model = ConvSE().eval()
    g = read_graph(model)
    assert g.layer("b.weight").inp == g.layer("a.weight").out == g.layer("fc2.weight").out
    plan(g, "b.weight")
    other, x = copy.deepcopy(model), torch.randn(2, 3, 8, 8)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1, signs=True))
    assert torch.allclose(other(x), model(x), atol=1e-5)


class LinearStream(nn.Module):
    """A stream with no activation (each channel's sign would flip through the BatchNorm), gated by a linear SE:
    the product of two tensors of the space is even in a unit's sign, so the stream is not signed."""

    def __init__(self, gate) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.se = SE(16, "view", gate)
        self.conv = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.se(self.bn(self.stem(x)))).mean((2, 3))


@pytest.mark.parametrize("gate", [torch.sigmoid, nn.Identity()])
def test_a_stream_times_its_gate_is_not_signed(gate) -> None:
    model = LinearStream(gate)
    with torch.no_grad():
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
    model.eval()
    g = read_graph(model)
    assert g.spaces[g.layer("stem.weight").out].kind == "free"
    other = copy.deepcopy(model)
    x = torch.randn(2, 1, 8, 8)
    for seed in range(3):
        other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=seed, signs=True))
        assert torch.allclose(other(x), model(x), atol=1e-5)


@pytest.mark.parametrize(("op", "rank"), [
    (lambda s: s[:, None], None),  # the units move to dimension 2
    (lambda s: s.unsqueeze(1), None),
    (lambda s: s.view(s.size(0), 1, -1, 1), None),  # not only 1s after the units
    (lambda s: s[..., None, None], 4),
    (lambda s: s.reshape((s.shape[0], -1, 1, 1)), 4),
])
def test_only_singleton_axes_after_the_units_keep_them(op, rank) -> None:
    """Read as the op between a conv's pooled output and a conv reading a batch of 2-D maps."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1) if rank else nn.Conv1d(1, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(op(self.a(x).mean((2, 3))))

    g = read_graph(Net())
    assert (g.layer("b.weight").inp == g.layer("a.weight").out) == bool(rank)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("se")
    key, model = mark_proj(SENet(0), d)  # the key's weak bit sits at -0.04 here, with or without the SE block
    return key, model, d


def test_the_mark_reads_back_after_a_stream_permutation(marked) -> None:
    key, model, d = marked
    print("SE attacked matches", assert_reads_back(key, d, model, permuted))


def test_independent_twins_are_near_chance(marked) -> None:
    key, _, d = marked
    twins = {seed: train_gray(SENet(seed), seed, steps=80) for seed in (100, 101)}
    print("SE twin matches", assert_twins_near_chance(key, d, twins, permuted))
