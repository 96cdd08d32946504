"""The fx graph reader judges every op with the rank of its input known: an op that does not read the units
where they sit (a linear layer over a conv's width axis, a flatten stopping short, a mean over dimension -3)
makes its output opaque, and a layer reading it is refused rather than aligned on the wrong axis."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from wmark.attacks.symmetry import permute_spaces
from wmark.errors import UsageError
from wmark.whitebox.graph import plan, read_graph


class ConvThen(nn.Module):
    """A conv with 8 channels on 8×8 maps (width equals channels), then ``op``, then ``fc``."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], fc: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.op(torch.relu(self.conv(x))))


def _read(model: nn.Module) -> tuple[object, str]:
    model(torch.randn(2, 3, 8, 8))  # the forward is real: each case runs on 8×8 maps
    g = read_graph(model)
    return g, g.spaces[g.layer("fc.weight").inp].kind


@pytest.mark.parametrize(("op", "fc", "why"), [
    (nn.Identity(), nn.Linear(8, 2), "linear layer over the last axis of a rank-4 tensor"),
    (lambda h: h.flatten(1, 2), nn.Linear(8, 2), "flatten of dimensions 1 to 2 of a rank-4 tensor"),
    (lambda h: torch.flatten(h, 1, 2).mean(-1), nn.Linear(64, 2), "flatten of dimensions 1 to 2"),
    (nn.Flatten(1, 2), nn.Linear(8, 2), "flatten of dimensions 1 to 2"),
    (lambda h: h.mean(-3).mean(-1), nn.Linear(8, 2), "reduction over the batch or the units' dimension 1"),
    (lambda h: h.sum(-3).amax(-1), nn.Linear(8, 2), "reduction over the batch or the units' dimension 1"),
    (lambda h: h.mean(0).flatten(1), nn.Linear(64, 2), "reduction over the batch"),
    (lambda h: h.mean((2, 3)).unsqueeze(1), nn.Conv1d(1, 2, 1), "unsqueeze"),
])
def test_an_op_that_does_not_read_the_channels_is_refused(op: Callable[[torch.Tensor], torch.Tensor],
                                                          fc: nn.Module, why: str) -> None:
    """Each of these read as the conv's channel space (8 units) though it reads the width, rows or a mix."""
    g, kind = _read(ConvThen(op, fc))
    assert kind == "opaque"
    with pytest.raises(UsageError, match=f"fc.weight reads the output of (a )?{why}"):
        plan(g, "fc.weight")  # type: ignore[arg-type]


@pytest.mark.parametrize(("op", "fc"), [
    (lambda h: h.mean((-2, -1)), nn.Linear(8, 2)),
    (lambda h: h.amax(-1).sum(2), nn.Linear(8, 2)),
    (lambda h: h.mean(-1, keepdim=True).flatten(1), nn.Linear(64, 2)),
    (lambda h: h.flatten(1, 3), nn.Linear(512, 2)),
    (lambda h: h.flatten(1, -1), nn.Linear(512, 2)),
    (lambda h: h.view(h.size(0), -1), nn.Linear(512, 2)),
    (lambda h: h.reshape(h.shape[0], -1), nn.Linear(512, 2)),
    (nn.Flatten(), nn.Linear(512, 2)),
])
def test_an_op_that_keeps_the_channels_is_read_as_their_space(op: Callable[[torch.Tensor], torch.Tensor],
                                                              fc: nn.Module) -> None:
    g, kind = _read(ConvThen(op, fc))
    assert kind == "free"
    assert g.layer("fc.weight").inp == g.layer("conv.weight").out  # type: ignore[attr-defined]


def test_a_reshape_by_a_constant_is_refused_not_taken_as_the_batch() -> None:
    """``h.view(2, -1)`` flattens dimension 1 on only when the batch is 2; nothing in the graph says it is."""
    g, kind = _read(ConvThen(lambda h: h.view(2, -1), nn.Linear(512, 2)))
    assert kind == "opaque"
    with pytest.raises(UsageError, match=r"a view other than x.view\(x.size\(0\), -1\)"):
        plan(g, "fc.weight")  # type: ignore[arg-type]


def test_a_batchnorm_of_token_features_and_a_rank_2_layernorm() -> None:
    """BatchNorm1d normalises dimension 1, the 8 tokens, not a token-wise linear layer's 8 units; a LayerNorm
    of a rank-2 tensor normalises the channels, on the last axis and dimension 1 at once."""
    tokens = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    tokens.eval()
    tokens(torch.randn(2, 8, 4))
    g = read_graph(tokens)
    assert g.spaces[g.layers[1].inp].kind == "opaque"
    with pytest.raises(UsageError, match="reads the output of a BatchNorm of a linear layer's output"):
        plan(g, g.layers[1].name)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(32, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    g = read_graph(mlp)
    assert g.layers[1].inp == g.layers[0].out
    pooled = ConvThen(lambda h: h.mean((2, 3)), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2)))
    pooled(torch.randn(2, 3, 8, 8))
    g = read_graph(pooled)
    assert g.layer("fc.1.weight").inp == g.layer("conv.weight").out


def test_a_linear_layer_reads_any_axis_of_the_fixed_input() -> None:
    """The model's input is never permuted, so a linear layer over an image's width still has fixed inputs."""
    g = read_graph(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 4, 2)))
    assert g.spaces[g.layers[0].inp].kind == "fixed"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def test_a_batchnorm_after_a_first_linear_layer_is_read_with_the_input_rank_known() -> None:
    # the raw input's rank is unknown to the graph alone (BatchNorm1d of a rank-3 batch normalises another axis);
    # the key says it: an MLP with BatchNorm1d on vector inputs keeps its hidden space
    for rank, kind in ((None, "opaque"), (2, "free"), (3, "opaque")):
        g = read_graph(_mlp(), input_rank=rank)
        assert g.spaces[g.layer("3.weight").inp].kind == kind, rank


def test_the_weights_scheme_marks_an_mlp_with_batchnorm_on_vector_inputs() -> None:
    from wmark.keys import default_schemes, generate_key
    from wmark.schemes.weights import WeightsEmbedder

    schemes = default_schemes(10)
    schemes["weights"] = dict(schemes["weights"], bits=16)
    key = generate_key(owner="o", num_classes=10, input_shape=(64,), schemes=schemes)
    emb = WeightsEmbedder(key, _mlp(), layer="3.weight")
    assert emb.graph is not None and emb.layer == "3.weight"


class Sliced(nn.Module):
    """A conv's channels read by a 1×1 conv and, through ``op``, by another layer in a fixed order."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], fc: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.op, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), op, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h).mean((2, 3)) + self.fc(self.op(h)).flatten(1)[:, :4]


@pytest.mark.parametrize(("op", "fc"), [
    (lambda h: h.chunk(2, 1)[0], nn.Conv2d(4, 4, 1)),
    (lambda h: h[:, :4], nn.Conv2d(4, 4, 1)),
    (lambda h: torch.flatten(h, 1, 2), nn.Conv1d(64, 4, 1)),
    (nn.Flatten(1, 2), nn.Conv1d(64, 4, 1)),
    (lambda h: h.mean((2, 3)).unsqueeze(1), nn.Conv1d(1, 4, 1)),
])
def test_an_op_reading_the_units_in_a_fixed_order_makes_their_space_opaque(op, fc) -> None:
    """Only the op's output was opaque: the conv's channels were claimed permutable, though the layer after the op
    reads them in a fixed order (each permutation changed the outputs by 0.2-0.7)."""
    model = Sliced(op, fc).eval()
    g = read_graph(model)
    assert g.spaces[g.layer("a.weight").out].kind == "opaque"
    other, x = copy.deepcopy(model), torch.randn(2, 3, 8, 8)
    other.load_state_dict(permute_spaces(model.state_dict(), graph=g, seed=1))
    assert torch.allclose(other(x), model(x), atol=1e-6)
