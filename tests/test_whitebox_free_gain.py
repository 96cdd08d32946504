"""A norm gain read only by the writers of a free space (MobileNetV2 / EfficientNet: a linear 1×1 projection and
its BatchNorm, no activation, read by the next block's expansion conv, whose rows a BatchNorm owns): a thief may
flip each gain entry's sign with that column of the expansion conv, and nothing the plan aligns shows those
signs. They matter only for the permutation of the expanded space, which the aligner matches on sign-blind
magnitudes, so layers downstream stay markable: the mark survives every permutation, sign flip and gain flip the
graph allows, and independent models stay at chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _whitebox_helpers import check, mark_over_anchor, tiny_key
from test_whitebox_depthwise import InvertedResidual, train
from torch import nn
from torch.nn import functional as F

from wmark.attacks import rename_tensors
from wmark.attacks.symmetry import flip_gain_signs, permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph
from wmark.whitebox.spaces import Graph, Space

MARKED = "blocks.1.project.weight"


class Down(nn.Module):
    """A non-residual inverted residual block (``c`` → ``out`` channels), its projection linear."""

    def __init__(self, c: int, out: int, t: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, c * t, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c * t)
        self.dw = nn.Conv2d(c * t, c * t, 3, padding=1, groups=c * t, bias=False)
        self.bn2 = nn.BatchNorm2d(c * t)
        self.project = nn.Conv2d(c * t, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        return self.bn3(self.project(h))


class Net(nn.Module):
    """Stem with ReLU6, a linear projection (``proj``: its BatchNorm gain read only by ``down.expand``), a block
    into a 16-channel linear stream and two residual blocks on it, head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.proj = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.down = Down(8, 16, 8)
        self.blocks = nn.Sequential(InvertedResidual(16, 8), InvertedResidual(16, 8))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.down(self.proj(self.stem(x)))).mean((2, 3)))


def attacked(model: Net, seed: int) -> Net:
    """Every space permuted with every sign flip the graph allows, ``proj``'s gain flipped with ``down.expand``'s
    columns, then the stream flipped again through its writers' γ and β and its readers' columns."""
    g = read_graph(model)
    out = Net(99)
    out.load_state_dict(flip_gain_signs(permute_spaces(model.state_dict(), graph=g, seed=seed, signs=True), graph=g,
                                        seed=seed + 7))
    flip = torch.from_numpy(np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=16)).float()
    with torch.no_grad():
        for bn in (out.down.bn3, *(b.bn3 for b in out.blocks)):
            bn.weight.mul_(flip)
            bn.bias.mul_(flip)
        for b in out.blocks:
            b.expand.weight.mul_(flip[None, :, None, None])
        out.head.weight.mul_(flip)
    return out.eval()


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """(key, marked Net, folder with ref.safetensors and its unmarked base anchor.safetensors)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("free_gain")
    key = tiny_key(32, seed=41)
    model, emb = mark_over_anchor(key, train(Net(0), 0, steps=30), d, train, layer=MARKED)
    assert emb.bit_errors() == 0
    return key, model, d


def test_the_pattern_is_read_and_the_attack_keeps_the_function() -> None:
    model = Net(0)
    with torch.no_grad():  # non-trivial BatchNorm statistics and gains, so a flip left undone would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    g = read_graph(model.eval())
    expand = g.layer("down.expand.weight")
    assert expand.gain == "proj.1.weight" and expand.own == "rows" and g.spaces[expand.out].kind == "free"
    assert g.spaces[g.layer(MARKED).out].kind == "signed"
    assert [lay.name for lay in plan(g, MARKED)][-1] == MARKED
    x = torch.randn(4, 3, 16, 16)
    for seed in range(3):
        other = attacked(model, seed)
        assert (other.proj[1].weight * model.proj[1].weight < 0).any()
        assert torch.allclose(other(x), model(x), atol=1e-5)


def test_the_same_gain_on_a_signed_space_is_still_refused() -> None:
    """Where the expanded space flips too, its writer's rows carry signs that sign-blind matching would lose."""
    g = read_graph(Net(0))
    space = g.layer("down.expand.weight").out
    signed = Graph({s: Space(v.size, "signed" if s == space else v.kind, v.params, v.why, v.negated)
                    for s, v in g.spaces.items()}, g.layers, g.family)
    with pytest.raises(UsageError, match=r"^The norm-gain signs of the writers of space 'down\.expand', which "
                                         r"blocks\.1\.project\.weight depends on, show only in"):
        plan(signed, MARKED)


def test_the_mark_survives_gain_and_stream_sign_flips_and_permutations(marked) -> None:
    key, model, d = marked
    for seed in (0, 1, 2):
        verdict = check(key, d, rename_tensors(attacked(model, seed).state_dict(), seed=seed), f"flipped{seed}")
        test = verdict.tests[0]
        assert verdict.detected and test.matches >= 31 and test.null["exact_by_construction"], test.matches


def test_independent_models_stay_at_chance(marked) -> None:
    key, _, d = marked
    for seed in (100, 101):
        twin = train(Net(seed), seed, steps=80)
        verdict = check(key, d, attacked(twin, seed).state_dict(), f"twin{seed}")
        assert not verdict.detected and verdict.tests[0].log10_p > -3, verdict.tests[0].matches
