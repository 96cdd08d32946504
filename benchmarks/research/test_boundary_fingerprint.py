"""The IPGuard-style boundary fingerprint baseline (``benchmarks/extraction.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.models import build_model
from wmark.training import make_loader, train_epochs

SHAPE = (1, 6, 6)
C = 4


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=gen)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long() * 2 + (x[:, 0, :, :3].mean((1, 2)) > 0.5).long()
    return x, y


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    x, y = _data(1500)
    model = build_model("fmnist-mlp", num_classes=C, input_shape=SHAPE, seed=0)
    train_epochs(model, make_loader(x, y, seed=0), epochs=8, optimizer=torch.optim.Adam(model.parameters(), 3e-3))
    return model


def test_boundary_fingerprint_points_sit_on_the_boundary_and_calibration_is_reported(victim):
    from boundary_fingerprint import craft_boundary_fingerprint, fingerprint_test, match_count

    key = generate_key(owner="Owner", num_classes=C, input_shape=SHAPE)
    x, _ = _data(300, seed=6)
    fp = craft_boundary_fingerprint(model=victim, x=x, key=key, n=40, steps=80)
    again = craft_boundary_fingerprint(model=victim, x=x, key=key, n=40, steps=80)
    assert torch.equal(fp.x, again.x)  # seed points come from the key, not from a choice made later
    with torch.no_grad():
        top2 = victim(fp.x).topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).median()) < 0.5  # near the top-two boundary
    assert match_count(victim, fp) == 40
    test = fingerprint_test(suspect_matches=40, n=40, reference_matches=[20, 25, 30])
    assert test["rank_log10_p"] == pytest.approx(np.log10(1 / 4))
    assert 75 / 120 < test["reference_upper"] < 1 and test["log10_p"] < -1
    with pytest.raises(UsageError, match="held-out reference"):
        fingerprint_test(suspect_matches=1, n=40, reference_matches=[])
