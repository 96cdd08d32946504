"""Residual CNN graphs wmark must read right or refuse (channel concatenation, in-place adds, depthwise convs),
and BatchNorm folding without affine parameters or running statistics."""

from __future__ import annotations

import pytest
import torch
from _whitebox_helpers import tiny_key
from torch import nn
from torch.nn import functional as F

from wmark.attacks.symmetry import fold_batchnorm, permute_spaces
from wmark.errors import UsageError
from wmark.schemes.weights import WeightsEmbedder
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


class InPlaceAdds(nn.Module):
    """Residual blocks adding in every way: ``x.add_`` (its result read through ``x``), ``+=``, ``torch.add``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(3))
        self.short = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)), inplace=True)
        out = self.convs[0](h)
        out.add_(self.short(h))
        h = F.relu(out, inplace=True)
        out = self.convs[1](h)
        out += h
        h = torch.add(self.convs[2](out), out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_an_in_place_add_joins_the_residual_stream() -> None:
    """``out.add_(h)`` then reading ``out`` left the stream split: a permutation of it changed the outputs."""
    torch.manual_seed(0)
    model = InPlaceAdds()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    g = read_graph(model)
    stream = g.layer("stem.weight").out
    assert [lay.name for lay in g.writers(stream)] == ["stem.weight", *(f"convs.{i}.weight" for i in range(3))]
    assert g.layer("fc.weight").inp == stream and "bn.running_var" in g.spaces[stream].params
    assert same_function_after_permuting(model, InPlaceAdds(), torch.randn(2, 3, 8, 8))


class Separable(nn.Module):
    """A residual depthwise-separable block (MobileNet-style): a depthwise 3×3 conv, then a pointwise one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.pw(torch.relu(self.dw(h)))
        return self.fc(h.mean((2, 3)))


def test_a_depthwise_conv_keeps_its_channels_space() -> None:
    """The depthwise conv's 9 columns per row were read as 6 input units (a traceback when permuting); then it
    was refused as a grouped conv, although its filters follow their channels as BatchNorm's parameters do."""
    torch.manual_seed(0)
    model = Separable()
    g = read_graph(model)
    stream = g.layer("stem.weight").out
    assert [lay.name for lay in plan(g, "pw.weight")] == ["stem.weight", "pw.weight"] and g.layer("pw.weight").inp == stream
    assert {"dw.weight", "dw.bias"} <= set(g.spaces[stream].params)
    assert same_function_after_permuting(model, Separable(), torch.randn(2, 3, 8, 8))
    with pytest.raises(UsageError, match="'dw.weight' is a per-channel parameter"):
        WeightsEmbedder(tiny_key(8, seed=1), model, layer="dw")


def test_fold_batchnorm_without_affine_folds_and_without_running_statistics_is_refused() -> None:
    """BatchNorm(affine=False) failed with a TypeError, one without running statistics with an AssertionError."""
    x = torch.randn(2, 3, 8, 8)
    for kwargs in ({"affine": False}, {"track_running_stats": False}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, **kwargs), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 36, 2))
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
        model.eval()
        if kwargs.get("affine") is False:
            folded = fold_batchnorm(model)
            assert torch.allclose(folded(x), model(x), atol=1e-5)
            assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        else:
            with pytest.raises(UsageError, match="keeps no running statistics"):
                fold_batchnorm(model)
