"""A per-channel gain read directly by a conv/linear layer (a BatchNorm's γ, a 1-D layer scale, no activation
in between) admits sign flips of the gain's entries (and of the BatchNorm's β) together with the reader's
columns. The graph records such a gain like a LayerNorm's, so the aligner reads those signs back from a reader
whose rows never flip, and a marked layer that is the gain's only reader is refused."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _whitebox_helpers import tiny_key, train
from torch import nn

from wmark.attacks.symmetry import flip_gain_signs
from wmark.errors import UsageError
from wmark.io import save_model, save_tensors
from wmark.keys import Key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.graph import read_graph
from wmark.whitebox.verify import verify_whitebox


class BatchNormRead(nn.Module):
    """conv2 → BatchNorm → 1×1 conv3 with no activation between the norm and conv3 (a linear bottleneck)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(256, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv3(self.bn2(self.conv2(x)))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ScaleRead(nn.Module):
    """fc1 → layer scale ``gamma`` → fc2 with no activation between the scale and fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(256, 64)
        self.fc1 = nn.Linear(64, 128)
        self.gamma = nn.Parameter(torch.rand(128) + 0.5)
        self.fc2 = nn.Linear(128, 160)
        self.fc3 = nn.Linear(160, 160)
        self.head = nn.Linear(160, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(torch.relu(self.fc0(x.flatten(1)))) * self.gamma
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(x)))))


def _marked(d: Path, key: Key, make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    base = train(make(), steps=15, seed=0)
    save_model(base, d / "anchor.safetensors")
    model = copy.deepcopy(base)
    emb = WeightsEmbedder(key, model)
    train(model, steps=40, seed=1, embedder=emb)
    assert emb.bit_errors() <= 2
    save_model(model, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return model


def _verify(d: Path, key: Key, tensors: dict[str, torch.Tensor]):
    save_tensors(tensors, d / "suspect.safetensors")
    verdict = verify_whitebox(key=key, reference=d / "ref.safetensors", suspect=d / "suspect.safetensors",
                              anchor=d / "anchor.safetensors")
    return verdict.tests[0].matches, verdict.detected


@pytest.mark.parametrize(("make", "gain", "reader"), [(BatchNormRead, "bn2.weight", "conv3.weight"),
                                                      (ScaleRead, "gamma", "fc2.weight")], ids=["batchnorm", "scale"])
def test_flipped_signs_of_a_gain_read_directly_keep_the_mark(tmp_path, make, gain, reader) -> None:
    key = tiny_key(64, seed=5)
    model = _marked(tmp_path, key, make)
    graph = read_graph(model)
    assert graph.layer(reader).gain == gain
    flipped = flip_gain_signs(model.state_dict(), graph=graph, seed=3)
    assert (torch.sign(flipped[gain]) != torch.sign(model.state_dict()[gain])).any()
    attacked = make()
    attacked.load_state_dict(flipped)
    x = torch.rand(8, 1, 16, 16)
    torch.testing.assert_close(attacked.eval()(x), model(x), atol=1e-5, rtol=1e-4)
    matches, detected = _verify(tmp_path, key, flipped)
    assert detected and matches >= 60
    torch.manual_seed(7)
    independent = train(make(), steps=15, seed=7)
    matches, detected = _verify(tmp_path, key, flip_gain_signs(independent.state_dict(), graph=graph, seed=3))
    assert not detected and matches <= 46


def test_marking_the_only_reader_of_a_gain_is_refused() -> None:
    with pytest.raises(UsageError, match=r"^The signs fc2\.weight reads through gamma show in no other layer"):
        WeightsEmbedder(tiny_key(64, seed=5), ScaleRead(), layer="fc2")
