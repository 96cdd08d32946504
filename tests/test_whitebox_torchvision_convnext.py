"""torchvision's ConvNeXt layout, reproduced (torchvision is not a dependency): ``LayerNorm2d`` (an
``nn.LayerNorm`` subclass that permutes the channels last and calls ``F.layer_norm`` with its own parameters)
on the stem and before the downsampling conv, ``CNBlock``'s ``(C, 1, 1)`` layer scale multiplied onto a
channels-first tensor, and its ``stochastic_depth`` on the branch (an ``fx``-wrapped function, so a call_function
in the trace). All three were opaque, so the stream and every block were refused; the graph now reads them,
permuting and flipping them keeps the function, and a mark in the last block survives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _whitebox_helpers import check, mark_over_anchor, tiny_key
from test_whitebox_depthwise import train
from torch import nn
from torch.nn import functional as F

from wmark.attacks import prune, rename_tensors
from wmark.attacks.symmetry import flip_gain_signs, permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph

MARKED = "stage2.0.block.5.weight"


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth.stochastic_depth, defined where torchvision defines it."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    return input * torch.empty(size, dtype=input.dtype).bernoulli_(1.0 - p).div_(1.0 - p)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """timm.layers.drop.drop_path (per sample), defined where timm defines it."""
    return stochastic_depth(x, drop_prob, "row", training)


def look_alike(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """The same code and name under another module: the reader cannot know what it does."""
    return stochastic_depth(input, p, mode, training)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
drop_path.__module__ = "timm.layers.drop"
look_alike.__module__, look_alike.__name__, look_alike.__qualname__ = "mylib.ops", "stochastic_depth", \
    "stochastic_depth"
for _name in ("stochastic_depth", "drop_path", "look_alike"):
    torch.fx.wrap(_name)  # kept as a call_function in the trace, as torchvision wraps its own


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision's CNBlock; ``drop`` names the stochastic depth its branch calls, with ``p`` and ``mode``."""

    def __init__(self, c: int, p: float = 0.0, mode: str = "row", drop: str = "stochastic_depth") -> None:
        super().__init__()
        self.p, self.mode, self.drop = p, mode, drop
        self.block = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(c, eps=1e-6), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c),
                                   Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        if self.drop == "stochastic_depth":
            result = stochastic_depth(result, self.p, self.mode, self.training)
        elif self.drop == "drop_path":
            result = drop_path(result, self.p, self.training)
        else:
            result = look_alike(result, self.p, self.mode, self.training)
        result += x
        return result


class TorchvisionConvNeXt(nn.Module):
    """Stem (patchify conv + LayerNorm2d), a 16-channel stage, LayerNorm2d + downsampling conv, a 32-channel stage
    (MLP 128: room for 32 bits), LayerNorm2d and head."""

    def __init__(self, seed: int, **drop: Any) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, stride=2), LayerNorm2d(16, eps=1e-6))
        self.stage1 = nn.Sequential(CNBlock(16, **drop))
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, stride=2))
        self.stage2 = nn.Sequential(CNBlock(32, **drop))
        self.norm = LayerNorm2d(32, eps=1e-6)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stage2(self.down(self.stage1(self.stem(x))))).mean((2, 3)))


def rewritten(model: nn.Module, seed: int, **drop: Any) -> TorchvisionConvNeXt:
    """Every space permuted, every sign a norm absorbs flipped and every norm gain's signs with its readers'."""
    g = read_graph(model)
    out = TorchvisionConvNeXt(99, **drop)
    out.load_state_dict(flip_gain_signs(permute_spaces(model.state_dict(), graph=g, seed=seed, signs=True),
                                        graph=g, seed=seed))
    return out.eval()


def test_layernorm2d_and_a_channels_first_layer_scale_keep_the_stream() -> None:
    model = TorchvisionConvNeXt(0)
    with torch.no_grad():  # gains and biases away from 1 and 0, so a misplaced one would show
        for name, p in model.named_parameters():
            if "layer_scale" in name or p.ndim == 1:
                p.normal_()
    model.eval()
    g = read_graph(model)
    stream, wide = g.layer("stem.0.weight").out, g.layer("down.1.weight").out
    assert [lay.name for lay in g.writers(stream)] == ["stem.0.weight", "stage1.0.block.5.weight"]
    assert {"stem.1.weight", "stem.1.bias", "stage1.0.layer_scale", "down.0.weight"} <= set(g.spaces[stream].params)
    assert {"norm.weight", "stage2.0.layer_scale"} <= set(g.spaces[wide].params)
    assert g.layer("stem.0.weight").own == "whole" and g.layer(MARKED).absorbers == ("stage2.0.layer_scale",)
    assert g.layer("down.1.weight").gain == "down.0.weight" and g.layer("head.weight").inp == wide
    assert [lay.name for lay in plan(g, MARKED)] == [
        "stem.0.weight", "stage1.0.block.3.weight", "stage1.0.block.5.weight", "down.1.weight",
        "stage2.0.block.3.weight", MARKED]
    x = torch.randn(4, 3, 16, 16)
    for seed in range(3):
        other = rewritten(model, seed)
        assert (other.stage2[0].layer_scale * model.stage2[0].layer_scale < 0).any()
        assert torch.allclose(other(x), model(x), atol=1e-5)


@pytest.mark.parametrize("drop", [{"p": 0.5}, {"p": 0.5, "mode": "batch"}, {"p": 0.5, "drop": "drop_path"}])
def test_stochastic_depth_keeps_the_stream_in_eval_and_train_mode(drop) -> None:
    model = TorchvisionConvNeXt(0, **drop)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name or p.ndim == 1:
                p.normal_()
    g = read_graph(model.eval())
    stream = g.layer("stem.0.weight").out
    assert g.spaces[stream].kind == "free"
    assert [lay.name for lay in g.writers(stream)] == ["stem.0.weight", "stage1.0.block.5.weight"]
    assert g.layer("down.1.weight").inp == stream and g.layer(MARKED).absorbers == ("stage2.0.layer_scale",)
    x = torch.randn(8, 3, 16, 16)
    for seed in range(2):
        other = rewritten(model, seed, **drop)
        assert torch.allclose(other(x), model(x), atol=1e-5)
        model.train(), other.train()
        torch.manual_seed(seed)
        want = model(x)
        torch.manual_seed(seed)
        got = other(x)
        model.eval()
        assert not torch.allclose(want, model(x), atol=1e-3)  # some sample was dropped: the scale is live
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("drop", "why"), [
    ({"drop": "look_alike"}, "stochastic_depth"),
    ({"mode": "column"}, "a stochastic depth of an unknown mode"),
])
def test_a_look_alike_or_unknown_stochastic_depth_stays_opaque(drop, why) -> None:
    g = read_graph(TorchvisionConvNeXt(0, p=0.5, **drop))
    assert g.spaces[g.layer("stem.0.weight").out].kind == "opaque"
    with pytest.raises(UsageError, match=f"^stage2.0.block.3.weight reads the output of {why} that wmark cannot"):
        plan(g, "stage2.0.block.3.weight")


class Misread(nn.Module):
    """``F.layer_norm`` over the width of a channels-first map and a ``(C, 1)`` scale on one: neither is over the
    channels."""

    def __init__(self, scale: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(8, 1)) if scale else None
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h * self.scale if self.scale is not None else F.layer_norm(h, (8,), self.norm.weight, self.norm.bias)
        return self.conv(h).mean((2, 3))


@pytest.mark.parametrize(("scale", "why"), [(False, "a LayerNorm not over exactly the units on the last axis"),
                                            (True, "a mul of rank-4 and rank-2 tensors")])
def test_a_functional_norm_or_scale_not_over_the_channels_is_refused(scale, why) -> None:
    g = read_graph(Misread(scale))
    with pytest.raises(UsageError, match=f"^conv.weight reads the output of {why} that wmark cannot align through"):
        plan(g, "conv.weight")


def test_the_mark_survives_rewrites_fine_tune_and_pruning_and_a_twin_is_not_detected(tmp_path) -> None:
    torch.set_num_threads(1)
    key = tiny_key(32, seed=41)
    model, emb = mark_over_anchor(key, train(TorchvisionConvNeXt(0), 0, steps=30), tmp_path, train)
    assert emb.bit_errors() == 0 and emb.layer == MARKED
    verdict = check(key, tmp_path, rename_tensors(rewritten(model, 1).state_dict(), seed=1), "rewritten")
    assert verdict.detected and verdict.tests[0].matches == 32, verdict.tests[0].matches
    attacked = prune(train(rewritten(model, 2), 2, steps=40), sparsity=0.3)
    verdict = check(key, tmp_path, rename_tensors(attacked.state_dict(), seed=2), "attacked")
    assert verdict.detected and verdict.tests[0].matches >= 30, verdict.tests[0].matches
    twin = train(TorchvisionConvNeXt(100), 100, steps=80)
    verdict = check(key, tmp_path, rewritten(twin, 3).state_dict(), "twin")
    assert not verdict.detected and verdict.tests[0].log10_p > -3, verdict.tests[0].matches
