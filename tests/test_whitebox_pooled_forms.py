"""End to end: a CNN written the usual way, with a functional PReLU of per-channel slopes (``F.prelu(x, a)``) and
the pooled map squeezed before the classifier (``F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)``), marked in
its first classifier layer. Both forms were opaque, so that layer could not be marked. A thief who permutes every
channel (the slopes with them), flips the signs the BatchNorm absorbs, fine-tunes and prunes is still detected;
an independently trained twin is not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _whitebox_helpers import (
    assert_reads_back,
    assert_twins_near_chance,
    check,
    mark_over_anchor,
    tiny_key,
    train_gray,
)
from torch import nn

from wmark.attacks import prune, rename_tensors
from wmark.attacks.symmetry import permute_spaces
from wmark.whitebox.graph import read_graph


class PooledNet(nn.Module):
    """stem (16, BatchNorm) → conv (64) → F.prelu (64 slopes) → pool → squeeze → fc1 (32) → torch.prelu (one slope)
    → head (10), on 1×16×16."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem, self.bn = nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.conv, self.fc1, self.head = nn.Conv2d(16, 64, 3, padding=1), nn.Linear(64, 32), nn.Linear(32, 10)
        self.slopes = nn.Parameter(torch.empty(64).uniform_(-0.5, 0.5))
        self.slope = nn.Parameter(torch.full((1,), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.prelu(self.conv(torch.relu(self.bn(self.stem(x)))), self.slopes)
        h = F.adaptive_avg_pool2d(h, 1).squeeze(-1).squeeze(-1)
        return self.head(torch.prelu(self.fc1(h), self.slope))


def permuted(model: PooledNet, seed: int) -> PooledNet:
    out = PooledNet(99)
    out.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model, input_rank=4), seed=seed,
                                       signs=True))
    return out.eval()


def test_the_mark_survives_permutation_fine_tune_and_pruning(tmp_path) -> None:
    torch.set_num_threads(1)
    key = tiny_key(32, seed=41)
    model, emb = mark_over_anchor(key, train_gray(PooledNet(0), 0, steps=30), tmp_path, train_gray, layer="fc1")
    assert emb.chain == ["stem.weight", "conv.weight", "fc1.weight"]
    assert emb.bit_errors() <= 1
    thief = permuted(model, 3)
    assert not torch.equal(thief.slopes, model.slopes)
    x = torch.rand(8, 1, 16, 16)
    assert torch.allclose(thief(x), model(x), atol=1e-5)
    print("pooled forms permuted matches", assert_reads_back(key, tmp_path, model, permuted))
    attacked = prune(train_gray(thief, 2, steps=40), sparsity=0.2)
    verdict = check(key, tmp_path, rename_tensors(attacked.state_dict(), seed=2), "attacked")
    assert verdict.detected and verdict.tests[0].matches >= 28, verdict.tests[0].matches
    print("pooled forms fine-tuned and pruned matches", verdict.tests[0].matches)
    assert_twins_near_chance(key, tmp_path, {100: train_gray(PooledNet(100), 100, steps=80)}, permuted)
