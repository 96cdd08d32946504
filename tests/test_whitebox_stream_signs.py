"""Sign flips of a MobileNetV2 linear-bottleneck stream: when no activation reads the residual stream (only
projections + BatchNorm write it, adds and average pooling carry it, expansion convs and the head read it),
each stream channel's sign may flip with its writers' BatchNorms and its readers' columns, keeping the
function. The graph marks such a stream signed, and the aligner reads the flips back from the expansion convs'
columns (their rows flip on their own through their BatchNorm) against the anchor: the mark survives, twins
stay at chance, and the plan read as before (the stream sign-blind) loses the mark."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import test_whitebox_torchvision_convnext as tv_convnext
import torch
from _whitebox_helpers import check, guarded_aligner, mark_over_anchor, tiny_key
from test_whitebox_depthwise import InvertedResidual, MobileNetish, train
from torch import nn
from torch.nn import functional as F

from wmark.attacks import prune, rename_tensors
from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors
from wmark.whitebox.graph import plan, read_graph
from wmark.whitebox.verify import verify_whitebox

MARKED = "blocks.1.project.weight"


class LinearStem(nn.Module):
    """MobileNetish with no activation after its stem: the 16-channel stream passes no ReLU6 anywhere."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(InvertedResidual(16, 8), InvertedResidual(16, 8))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def flip_stream(model: LinearStem, seed: int) -> LinearStem:
    """A random half of the stream's channels negated through the writers' BatchNorm γ and β (their conv rows
    unchanged), the expansion convs' and the head's columns."""
    out = copy.deepcopy(model)
    flip = torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], size=16)).float()
    with torch.no_grad():
        for bn in (out.stem[1], *(b.bn3 for b in out.blocks)):
            bn.weight.mul_(flip)
            bn.bias.mul_(flip)
        for b in out.blocks:
            b.expand.weight.mul_(flip[None, :, None, None])
        out.head.weight.mul_(flip)
    return out


def attacked(model: LinearStem, seed: int) -> LinearStem:
    """Every space permuted, the stream's and every BatchNorm-owned row's signs flipped, then the stream again
    through γ and β."""
    out = LinearStem(99)
    out.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed, signs=True))
    return flip_stream(out.eval(), seed + 1)


class DropPathResidual(InvertedResidual):
    """EfficientNet's MBConv layout: torchvision's stochastic depth (a stand-in) on the projection before the add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        # Called through its module, whose globals torch.fx patches to keep it a call_function.
        return x + tv_convnext.stochastic_depth(self.bn3(self.project(h)), 0.5, "row", self.training)


def test_stochastic_depth_on_the_branch_keeps_the_stream_signed() -> None:
    model = LinearStem(0)
    model.blocks = nn.Sequential(DropPathResidual(16, 8), DropPathResidual(16, 8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.normal_()
    g = read_graph(model.eval())
    stream = g.layer("stem.0.weight").out
    assert g.spaces[stream].kind == "signed" and g.layer("blocks.1.expand.weight").inp == stream
    x = torch.randn(8, 3, 16, 16)
    for seed in range(2):
        other = flip_stream(copy.deepcopy(model), seed)
        other.load_state_dict(permute_spaces(other.state_dict(), graph=g, seed=seed, signs=True))
        assert torch.allclose(other(x), model(x), atol=1e-5)
        torch.manual_seed(seed)
        want = model.train()(x)
        torch.manual_seed(seed)
        assert torch.allclose(other.train()(x), want, atol=1e-4)
        model.eval()


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """(key, marked LinearStem, folder with ref.safetensors and its unmarked base anchor.safetensors)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("stream")
    key = tiny_key(32, seed=41)
    model, emb = mark_over_anchor(key, train(LinearStem(0), 0, steps=30), d, train)
    assert emb.bit_errors() == 0 and emb.layer == MARKED
    return key, model, d


def test_a_stream_no_activation_reads_is_signed_and_its_flips_keep_the_function() -> None:
    model = LinearStem(0)
    with torch.no_grad():  # non-trivial BatchNorm statistics and biases, so one left unflipped would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_()
    model.eval()
    g = read_graph(model)
    stream = g.layer("stem.0.weight").out
    assert g.spaces[stream].kind == "signed" and g.layer("blocks.1.expand.weight").inp == stream
    assert {"stem.1.bias", "blocks.1.bn3.running_mean"} <= set(g.spaces[stream].negated)
    assert not {"stem.1.weight", "blocks.1.bn3.running_var"} & set(g.spaces[stream].negated)
    # the stream of the MobileNet whose stem ends in ReLU6 has no such symmetry, nor has a block's hidden space
    assert read_graph(MobileNetish(0)).spaces[stream].kind == "free"
    assert g.spaces[g.layer(MARKED).inp].kind == "free"
    x = torch.randn(4, 3, 16, 16)
    for seed in range(3):
        other = attacked(model, seed)
        assert (other.stem[1].weight < 0).any() and (other.blocks[0].bn3.bias * model.blocks[0].bn3.bias < 0).any()
        assert torch.allclose(other(x), model(x), atol=1e-5)


def test_the_mark_survives_stream_sign_flips_permutation_fine_tune_and_pruning(marked) -> None:
    key, model, d = marked
    for seed in (0, 1):
        verdict = check(key, d, rename_tensors(attacked(model, seed).state_dict(), seed=seed), "flipped")
        assert verdict.detected and verdict.tests[0].matches >= 31, verdict.tests[0].matches
    tuned = prune(train(attacked(model, 3), 2, steps=40), sparsity=0.3)
    verdict = check(key, d, rename_tensors(tuned.state_dict(), seed=2), "attacked")
    test = verdict.tests[0]
    assert verdict.detected and test.matches >= 30 and test.null["exact_by_construction"], test.matches


def test_reading_the_stream_sign_blind_loses_the_mark(marked, tmp_path) -> None:
    """The plan as the graph reader recorded it before it marked such streams signed."""
    key, model, d = marked
    tensors, meta = load_tensors(d / "ref.safetensors")
    info = json.loads(meta["wmark.weights"])
    info["graph"]["spaces"] = {s: dict(v, kind="free" if v["kind"] == "signed" else v["kind"])
                               for s, v in info["graph"]["spaces"].items()}
    save_tensors(tensors, tmp_path / "blind.safetensors", metadata={"weights": info,
                                                                    "commitment": meta["wmark.commitment"]})
    save_tensors(attacked(model, 1).state_dict(), tmp_path / "sus.safetensors")
    verdict = verify_whitebox(key=key, reference=tmp_path / "blind.safetensors", suspect=tmp_path / "sus.safetensors",
                              anchor=d / "anchor.safetensors")
    assert not verdict.detected and verdict.tests[0].matches < 24, verdict.tests[0].matches


def test_independent_twins_stay_at_chance_and_alignment_never_reads_the_marked_layer(marked) -> None:
    key, _, d = marked
    for seed in (100, 101, 102):
        twin = train(LinearStem(seed), seed, steps=80)
        verdict = check(key, d, attacked(twin, seed).state_dict(), "twin")
        assert not verdict.detected and verdict.tests[0].log10_p > -3, verdict.tests[0].matches
    aligner, layers = guarded_aligner(d, dict(attacked(twin, 5).state_dict()))
    stream = read_graph(twin).layer("stem.0.weight").out
    assert layers[-1].inp in aligner.perms and aligner.signs[stream].shape == (16,)


class PooledMLP(nn.Module):
    """A linear stream (stem + BatchNorm, one linear bottleneck block) read by ``fc`` (ReLU after) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.block = InvertedResidual(16, 8)
        self.fc = nn.Linear(16, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.block(self.stem(x)).mean((2, 3)))))


def test_a_marked_layer_alone_pinning_a_streams_signs_is_refused() -> None:
    """``fc`` reads the stream and owns no row signs: the stream's overall sign (which the expansion conv, its
    rows flipping on their own, cannot show) would decide whether its mark reads as the mark or its negation;
    with the stem alone writing the stream nothing but ``fc`` shows the signs at all."""
    g = read_graph(PooledMLP())
    with pytest.raises(UsageError, match=r"^The overall sign of space 'stem.0'.s flips shows in no layer wmark "
                                         r"aligns but fc.weight; mark another layer\.$"):
        plan(g, "fc.weight")
    bare = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(UsageError, match=r"^The sign flips of space '0', which 4.weight depends on, show only in "
                                         r"4.weight itself"):
        plan(read_graph(bare), "4.weight")
