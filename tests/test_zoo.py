"""The built-in architectures: what they are built for, and the dtypes they run in."""

from __future__ import annotations

import pytest
import torch

from wmark.models import build_model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bag_of_words_runs_in_half_precision(dtype) -> None:
    """Its float32 mask promoted the pooled embeddings to float32, which the half-precision layers refused."""
    model = build_model("text-bow", num_classes=4, input_shape=(16,), seed=0).to(dtype)
    logits = model(torch.tensor([[101, 2023, 102, 0], [101, 7, 0, 0]]))
    assert logits.dtype == dtype and logits.shape == (2, 4) and torch.isfinite(logits).all()
