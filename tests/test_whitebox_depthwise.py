"""Weight mark through depthwise convs: a MobileNetV2-style inverted residual net (BatchNorm, ReLU6) and a
ConvNeXt-style net (7×7 depthwise conv, channels-last LayerNorm and MLP, layer scale, GroupNorm(1, C) stem).
Each keeps its function under `permute_spaces`, its mark survives permutation + fine-tune + 30 % pruning, an
independent twin is not detected; what cannot be aligned (grouped convs, channel multipliers, group norms of
several multi-channel groups, LayerNorms not over the units) is refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _whitebox_helpers import check, guarded_aligner, tiny_key
from _whitebox_helpers import train_on_images as train
from torch import nn
from torch.nn import functional as F

from wmark.attacks import prune, rename_tensors
from wmark.attacks.symmetry import flip_gain_signs, fold_batchnorm, free_spaces, permute_spaces
from wmark.errors import UsageError
from wmark.io import load_tensors, save_model, save_tensors
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.graph import plan, read_graph
from wmark.whitebox.verify import verify_whitebox


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion, 3×3 depthwise conv, linear 1×1 projection, residual add."""

    def __init__(self, c: int, t: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, c * t, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c * t)
        self.dw = nn.Conv2d(c * t, c * t, 3, padding=1, groups=c * t, bias=False)
        self.bn2 = nn.BatchNorm2d(c * t)
        self.project = nn.Conv2d(c * t, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        return x + self.bn3(self.project(h))


class MobileNetish(nn.Module):
    """Stem (stride 2), two inverted residual blocks of 16 channels expanded 8× (128: room for 32 bits), head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 8), InvertedResidual(16, 8))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: 7×7 depthwise conv, channels-last LayerNorm, 4× linear MLP, layer scale, residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.permute(self.dw(x), (0, 2, 3, 1))
        h = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """Patchify stem with GroupNorm(1, C) (ConvNeXt's channels-first LayerNorm), two blocks of 32 channels, head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 2, stride=2), nn.GroupNorm(1, 32))
        self.blocks = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


ARCHS = {"mobilenet": MobileNetish, "convnext": ConvNeXtish}
# Per architecture: the layer writing a block's hidden units, the marked one reading them, and the per-channel
# parameters the graph must place (a misplaced one would break the permuted model).
FIRST = {"mobilenet": "expand", "convnext": "pw1"}
INNER = {"mobilenet": "project", "convnext": "pw2"}
PARAMS = {"mobilenet": ("hidden", {"blocks.1.dw.weight", "blocks.1.bn2.weight", "blocks.1.bn2.running_mean"}),
          "convnext": ("stream", {"blocks.1.dw.weight", "blocks.1.dw.bias", "blocks.1.norm.weight",
                                  "blocks.1.norm.bias", "blocks.1.gamma", "stem.1.weight"})}




@pytest.fixture(scope="module", params=list(ARCHS))
def marked(request, tmp_path_factory):
    """(key, arch, marked model, folder with ref.safetensors and its unmarked base anchor.safetensors)."""
    torch.set_num_threads(1)
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    key = tiny_key(32, seed=41)
    base = train(ARCHS[arch](0), 0, steps=30)
    save_model(base, d / "anchor.safetensors")
    model = copy.deepcopy(base)
    emb = WeightsEmbedder(key, model)
    train(model, 1, steps=80, embedder=emb)
    assert emb.bit_errors() == 0 and emb.layer == f"blocks.1.{INNER[arch]}.weight"
    save_model(model, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return key, arch, model, d


def permuted(model: nn.Module, arch: str, seed: int, *, signs: bool = False) -> nn.Module:
    out = ARCHS[arch](99)
    out.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed, signs=signs))
    return out.eval()


def flip_stream(model: nn.Module, seed: int) -> nn.Module:
    """A ConvNeXt-style net with a random half of its stream's channels negated: the stem norm's gain and bias,
    each block's depthwise filters (whose outputs then do not change) and layer scale, and the head's columns
    follow. Aligned layers show it only in rows whose signs a layer scale owns (``pw2``)."""
    out = copy.deepcopy(model)
    flip = torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], size=32)).float()
    with torch.no_grad():
        for t in (out.stem[1].weight, out.stem[1].bias, *(b.gamma for b in out.blocks)):
            t.mul_(flip)
        for b in out.blocks:
            b.dw.weight.mul_(flip[:, None, None, None])
        out.head.weight.mul_(flip)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_depthwise_nets_read_as_spaces_and_permuting_them_keeps_the_function(arch) -> None:
    model = ARCHS[arch](0)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a misplaced one would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = read_graph(model)
    stream = g.layer("stem.0.weight").out
    inner, first = INNER[arch], FIRST[arch]
    assert [lay.name for lay in g.writers(stream)] == ["stem.0.weight", *(f"blocks.{i}.{inner}.weight" for i in (0, 1))]
    assert g.layer(f"blocks.1.{first}.weight").inp == stream
    hidden = g.layer(f"blocks.1.{inner}.weight").inp
    assert g.writers(hidden) == [g.layer(f"blocks.1.{first}.weight")] and {stream, hidden} <= set(free_spaces(g))
    where, names = PARAMS[arch]
    assert names <= set(g.spaces[hidden if where == "hidden" else stream].params)
    assert [lay.name for lay in plan(g, f"blocks.1.{inner}.weight")] == [
        "stem.0.weight", *(f"blocks.{i}.{n}.weight" for i in (0, 1) for n in (first, inner))]
    x = torch.randn(4, 3, 16, 16)
    for seed in range(3):
        other = permuted(model, arch, seed, signs=seed > 0)
        assert not torch.equal(other.blocks[1].dw.weight, model.blocks[1].dw.weight)
        assert torch.allclose(other(x), model(x), atol=1e-5)
    marked = g.layer(f"blocks.1.{inner}.weight")
    assert marked.own == "rows" and marked.absorbers == (
        ("blocks.1.bn3.weight", "blocks.1.bn3.running_mean") if arch == "mobilenet" else ("blocks.1.gamma",))
    if arch == "convnext":
        assert g.layer("stem.0.weight").own == "whole"
        assert torch.allclose(flip_stream(model, 1)(x), model(x), atol=1e-5)
    with pytest.raises(UsageError, match="'blocks.1.dw.weight' is a per-channel parameter .* cannot carry the mark"):
        WeightsEmbedder(tiny_key(8, seed=1), model, layer="blocks.1.dw")


def test_the_mark_survives_permutation_fine_tune_and_pruning(marked) -> None:
    key, arch, model, d = marked
    attacked = prune(train(permuted(model, arch, 3), 2, steps=40), sparsity=0.3)
    if arch == "mobilenet":
        attacked = fold_batchnorm(attacked)
    verdict = check(key, d, rename_tensors(attacked.state_dict(), seed=1), "attacked")
    test = verdict.tests[0]
    assert verdict.detected and test.matches >= 30, (arch, test.matches)
    assert test.null["exact_by_construction"] and test.details["form"] == "graph"


def signed(model: nn.Module, arch: str, seed: int) -> nn.Module:
    """Every space permuted and every sign a norm absorbs flipped; a ConvNeXt's stream channels flipped too."""
    out = permuted(model, arch, seed, signs=True)
    return flip_stream(out, seed) if arch == "convnext" else out


def test_the_mark_survives_sign_flips_permutation_fine_tune_and_pruning(marked, tmp_path) -> None:
    """Not folded (folding would undo the BatchNorm flips); without the recorded signs the flipped copy is lost."""
    key, arch, model, d = marked
    attacked = prune(train(signed(model, arch, 3), 2, steps=40), sparsity=0.3)
    verdict = check(key, d, rename_tensors(attacked.state_dict(), seed=1), "attacked")
    assert verdict.detected and verdict.tests[0].matches >= 30, (arch, verdict.tests[0].matches)
    tensors, meta = load_tensors(d / "ref.safetensors")
    info = json.loads(meta["wmark.weights"])
    info["graph"]["layers"] = [dict(lay, own="") for lay in info["graph"]["layers"]]
    save_tensors(tensors, tmp_path / "blind.safetensors", metadata={"weights": info,
                                                                    "commitment": meta["wmark.commitment"]})
    save_tensors(signed(model, arch, 3).state_dict(), tmp_path / "sus.safetensors")
    verdict = verify_whitebox(key=key, reference=tmp_path / "blind.safetensors", suspect=tmp_path / "sus.safetensors",
                              anchor=d / "anchor.safetensors")
    assert not verdict.detected and verdict.tests[0].matches < 24, (arch, verdict.tests[0].matches)


def test_an_independent_twin_is_not_detected_and_alignment_never_reads_the_marked_layer(marked) -> None:
    key, arch, _, d = marked
    twin = train(ARCHS[arch](100), 100, steps=80)
    verdict = check(key, d, signed(twin, arch, 5).state_dict(), "twin")
    assert not verdict.detected and verdict.tests[0].log10_p > -3, verdict.tests[0].matches
    aligner, layers = guarded_aligner(d, dict(twin.state_dict()))
    assert layers[-1].inp in aligner.perms and aligner.candidates()


def test_norm_gain_sign_flips_before_the_mlp_are_undone(marked) -> None:
    """A ConvNeXt block's LayerNorm feeds only ``pw1``: negating entries of its gain and bias with ``pw1``'s columns
    keeps the function, and took the mark to chance (17/32) when the graph did not record that gain."""
    key, arch, model, d = marked
    g = read_graph(model)
    if arch == "mobilenet":
        with pytest.raises(UsageError, match="records no norm gains"):
            flip_gain_signs(model.state_dict(), graph=g)
        return
    assert g.layer("blocks.1.pw1.weight").gain == "blocks.1.norm.weight" and not g.layer("blocks.1.pw1.weight").signs
    flipped = ARCHS[arch](99)
    flipped.load_state_dict(flip_gain_signs(signed(model, arch, 4).state_dict(), graph=g, seed=2))
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(flipped.eval()(x), model(x), atol=1e-5)
    verdict = check(key, d, rename_tensors(flipped.state_dict(), seed=2), "gains")
    assert verdict.detected and verdict.tests[0].matches >= 30, verdict.tests[0].matches


class Refused(nn.Module):
    """A residual stem feeding one of the ops wmark cannot align through, then a 1×1 conv and a head."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.conv = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        return self.fc(self.conv(h + self.op(h)).mean((2, 3)))


class Permuted(nn.Module):
    """A permute that moves the channels to dimension 2 (neither dimension 1 nor the last axis)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3).permute(0, 2, 1, 3)


class ChannelsFirstNorm(nn.Module):
    """A LayerNorm over the last axis of a channels-first tensor: it normalises across width, not channels."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ChannelsLast(nn.Module):
    """A linear layer over the channels left channels-last: the residual add meets its units with the width's
    (with one unit, broadcast over the width)."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.fc = nn.Linear(8, units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.permute(0, 2, 3, 1))


@pytest.mark.parametrize(("op", "why"), [
    (nn.Conv2d(8, 8, 3, padding=1, groups=2), "a grouped conv"),
    (ChannelsLast(8), "an add of a channels-last and a channels-first tensor"),
    (ChannelsLast(1), "an add of a channels-last and a channels-first tensor"),
    (nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.Conv2d(16, 8, 1)),
     "a depthwise conv with channel multiplier 2"),
    (nn.GroupNorm(2, 8), "a GroupNorm of 2 groups of several channels"),
    (ChannelsFirstNorm(), "a LayerNorm not over exactly the units on the last axis"),
    (Permuted(), "a permute that moves the units off dimension 1 and the last axis"),
])
def test_what_cannot_be_aligned_through_is_refused_and_left_unpermuted(op, why) -> None:
    """Grouped convs and group norms tie channels into groups; the refusal reaches the stream they read."""
    model = Refused(op).eval()
    g = read_graph(model)
    with pytest.raises(UsageError, match=f"conv.weight reads the output of {why} that wmark cannot align through"):
        plan(g, "conv.weight")
    assert g.spaces[g.layer("stem.weight").out].kind == "opaque"
    x = torch.randn(2, 3, 8, 8)
    other = Refused(copy.deepcopy(op)).eval()
    for seed in range(3):
        other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=seed))
        assert torch.allclose(other(x), model(x), atol=1e-5)


@pytest.mark.parametrize("norm", [nn.GroupNorm(1, 8), nn.GroupNorm(8, 8)])
def test_a_group_norm_pooling_all_channels_or_each_alone_keeps_the_space(norm) -> None:
    model = Refused(norm).eval()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    g = read_graph(model)
    stream = g.layer("stem.weight").out
    assert g.layer("conv.weight").inp == stream and "op.weight" in g.spaces[stream].params
    x, other = torch.randn(2, 3, 8, 8), Refused(copy.deepcopy(norm)).eval()
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1))
    assert torch.allclose(other(x), model(x), atol=1e-5)


def test_a_plain_chain_with_a_depthwise_conv_is_marked_in_the_graph_form() -> None:
    """A conv/linear chain without norms or adds took the chain form, whose check then failed on the depthwise
    conv's weight (a per-channel parameter, no link of a chain) instead of aligning through it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 32),
                          nn.ReLU(), nn.Linear(32, 10))
    emb = WeightsEmbedder(tiny_key(16, seed=1), model)
    assert emb.graph is not None and emb.chain == ["0.weight", "4.weight", "7.weight"]
    assert "2.weight" in emb.graph.spaces[emb.graph.layer("4.weight").inp].params


class OneAxisPermute(nn.Module):
    """A permute of a 1-D tensor: no dimension 1 for the units to be on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3))) + self.conv.weight.flatten().permute(0).sum()


def test_a_permute_of_one_axis_is_opaque() -> None:
    """The unit axis was looked up among the permute's dimensions and raised ValueError."""
    g = read_graph(OneAxisPermute())
    assert [lay.name for lay in g.layers] == ["conv.weight", "fc.weight"] and g.layer("fc.weight").inp == "conv"
