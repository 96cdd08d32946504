"""The real-graph census (``whitebox_real_graphs.py``) on tiny stand-ins for torchvision classifiers, which CI
does not have: its counts, its check that the graph's claims keep the function, and its message without
torchvision."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from whitebox_real_graphs import census


class Fire(nn.Module):
    """SqueezeNet's pattern: two convs concatenated along the channels, read by a classifier conv."""

    def __init__(self, weights: None = None) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.left, self.right, self.head = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.cat([torch.relu(self.left(h)), torch.relu(self.right(h))], 1)).mean((2, 3))


class Residual(nn.Module):
    """A BatchNorm residual block and a linear head: one stream of 8 channels, written by both convs."""

    def __init__(self, weights: None = None) -> None:
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.stem(x))
        return self.fc(torch.relu(h + self.conv(torch.relu(h))).mean((2, 3)))


MODELS = types.SimpleNamespace(fire=Fire, residual=Residual)


def test_census_counts_the_spaces_and_checks_the_claims_on_the_model() -> None:
    row = census(MODELS, "residual", None)
    assert (row["layers"], row["inp_fixed"], row["inp_free"], row["opaque_sides"]) == (3, 1, 2, 0)
    assert row["aligned_units"] == 8 and row["markable_layers"] == 3  # the stem reads the fixed input
    assert row["claims_break"] < 1e-5


def test_census_names_why_spaces_are_opaque_and_permutes_each_alone() -> None:
    row = census(MODELS, "fire", [["left.weight", "out"], ["right.weight", "out"]])
    assert row["inp_opaque"] == 1 and row["out_opaque"] == 2 and row["why"]["cat"] == 1
    assert row["newly_opaque"] == {}  # this library already reads both as opaque: nothing claimed to permute
    assert row["claims_break"] < 1e-5


def test_without_torchvision_the_script_says_so() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    script = Path(__file__).with_name("whitebox_real_graphs.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert "torchvision is not importable" in out.stdout
