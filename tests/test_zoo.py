"""The built-in architectures: what they are built for, and the dtypes they run in."""

from __future__ import annotations

import pytest
import torch

from wmark.errors import UsageError
from wmark.models import build_model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bag_of_words_runs_in_half_precision(dtype) -> None:
    """Its float32 mask promoted the pooled embeddings to float32, which the half-precision layers refused."""
    model = build_model("text-bow", num_classes=4, input_shape=(16,), seed=0).to(dtype)
    logits = model(torch.tensor([[101, 2023, 102, 0], [101, 7, 0, 0]]))
    assert logits.dtype == dtype and logits.shape == (2, 4) and torch.isfinite(logits).all()


@pytest.mark.parametrize("classes", [0, 1])
def test_a_model_needs_two_classes(classes) -> None:
    with pytest.raises(UsageError, match=f"A classifier needs at least 2 classes, got {classes}; check the data's labels"):
        build_model("fmnist-mlp", num_classes=classes, input_shape=(1, 8, 8))


def test_a_model_needs_non_empty_inputs() -> None:
    with pytest.raises(UsageError, match=r"Every input dimension must be at least 1, got \(3, 0, 8\)"):
        build_model("resnet-small", num_classes=10, input_shape=(3, 0, 8))


def test_training_on_data_with_a_single_label_is_refused_before_a_file_is_written(tmp_path) -> None:
    """All-zero labels made a 1-class model, trained and written; reading its file back was refused."""
    from wmark import api
    from wmark.io import save_tensors

    data = tmp_path / "one.safetensors"
    save_tensors({"x": torch.rand(20, 1, 8, 8), "y": torch.zeros(20, dtype=torch.int64)}, data)
    with pytest.raises(UsageError, match="at least 2 classes, got 1"):
        api.train(arch="fmnist-mlp", data=str(data), out=tmp_path / "m.safetensors", epochs=1)
    assert not (tmp_path / "m.safetensors").exists()
