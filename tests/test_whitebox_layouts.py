"""Real-world layouts of the weight mark's model: layers without bias, BatchNorm without affine parameters or
running statistics, channels_last memory, half-precision files, wrapper prefixes (``module.``, ``_orig_mod.``),
and TorchScript or ``torch.compile``'d modules. Each either carries the mark through to a detection (with an
independent model at chance) or is refused in one sentence."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _whitebox_helpers import tiny_key, train
from torch import nn

from wmark.errors import UsageError
from wmark.io import load_tensors, save_model, save_tensors
from wmark.keys import Key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.verify import verify_whitebox


class NormCNN(nn.Module):
    """conv1 (8) → BN → pool → conv2 (16) → BN → pool → fc1 (32) → fc2 (10) on 1×16×16; the norm is optional."""

    def __init__(self, *, bias: bool = True, bn: dict[str, bool] | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.Identity() if bn is None else nn.BatchNorm2d(8, **bn)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=bias)
        self.bn2 = nn.Identity() if bn is None else nn.BatchNorm2d(16, **bn)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32, bias=bias)
        self.fc2 = nn.Linear(32, 10, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _cast(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _prefix(prefix: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda sd: {prefix + k: v for k, v in sd.items()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mark(d: Path, key: Key, make: Callable[[], nn.Module],
          wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
    """Train a base (saved as the anchor), mark a copy of it through ``wrap`` and save it as the reference."""
    torch.manual_seed(0)
    base = train(make(), steps=15, seed=0)
    save_model(wrap(copy.deepcopy(base)), d / "anchor.safetensors")
    model = copy.deepcopy(base)
    wrapped = wrap(model)
    emb = WeightsEmbedder(key, wrapped)
    # the wrapper shares the model's parameters: training the model itself marks the wrapper's tensors
    train(model, steps=40, seed=1, embedder=emb)
    assert emb.bit_errors() == 0
    save_model(wrapped, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return model


def _matches(d: Path, key: Key, tensors: dict[str, torch.Tensor], name: str) -> tuple[int, bool]:
    save_tensors(tensors, d / f"{name}.safetensors")
    verdict = verify_whitebox(key=key, reference=d / "ref.safetensors", suspect=d / f"{name}.safetensors",
                              anchor=d / "anchor.safetensors")
    return verdict.tests[0].matches, verdict.detected


def _independent(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(7)
    return train(make(), steps=15, seed=7)


LAYOUTS = {
    "no bias": (lambda: NormCNN(bias=False), None),
    "batchnorm without affine": (lambda: NormCNN(bn={"affine": False}), None),
    "batchnorm without running stats": (lambda: NormCNN(bn={"track_running_stats": False}), None),
    "batchnorm, no bias, channels_last": (
        lambda: NormCNN(bias=False, bn={}).to(memory_format=torch.channels_last), None),
    "float16 suspect": (lambda: NormCNN(bn={}), _cast(torch.float16)),
    "bfloat16 suspect of a chain": (NormCNN, _cast(torch.bfloat16)),
    "data-parallel prefix": (lambda: NormCNN(bn={}), _prefix("module.")),
    "torch.compile prefix": (NormCNN, _prefix("_orig_mod.")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_real_layouts_keep_the_mark_and_leave_independent_models_at_chance(tmp_path, layout) -> None:
    make, change = LAYOUTS[layout]
    change = change or (lambda sd: sd)
    key = tiny_key(64, seed=5)
    model = _mark(tmp_path, key, make)
    matches, detected = _matches(tmp_path, key, change(_state(model)), "copy")
    assert detected and matches >= 60
    matches, detected = _matches(tmp_path, key, change(_state(_independent(make))), "independent")
    assert not detected and matches <= 46


def test_a_half_precision_reference_and_suspect_verify_without_an_anchor(tmp_path) -> None:
    key = tiny_key(64, seed=5)
    model = _mark(tmp_path, key, lambda: NormCNN(bn={}))
    tensors, meta = load_tensors(tmp_path / "ref.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _cast(torch.bfloat16)(tensors).items()},
              str(tmp_path / "ref.safetensors"), metadata=meta)
    save_tensors(_cast(torch.float16)(_state(model)), tmp_path / "copy.safetensors")
    verdict = verify_whitebox(key=key, reference=tmp_path / "ref.safetensors", suspect=tmp_path / "copy.safetensors")
    assert verdict.detected and verdict.tests[0].matches >= 60


@pytest.mark.parametrize("make", [NormCNN, lambda: NormCNN(bn={})], ids=["chain", "graph"])
def test_a_compiled_model_is_marked_under_its_orig_mod_names(tmp_path, make) -> None:
    key = tiny_key(64, seed=5)
    model = _mark(tmp_path, key, make, wrap=torch.compile)
    _, ref_meta = load_tensors(tmp_path / "ref.safetensors")
    assert '"_orig_mod.fc1.weight"' in ref_meta["wmark.weights"]
    # a thief saving the plain module drops the prefix: alignment finds the layers by shape
    matches, detected = _matches(tmp_path, key, _state(model), "copy")
    assert detected and matches >= 60
    matches, detected = _matches(tmp_path, key, _state(_independent(make)), "independent")
    assert not detected and matches <= 46


def test_a_scripted_model_is_refused_in_one_sentence_and_its_weights_verify_as_a_suspect(tmp_path) -> None:
    key = tiny_key(64, seed=5)
    with pytest.raises(UsageError, match=r"^The model is a TorchScript module, .*script it after marking\.$"):
        WeightsEmbedder(key, torch.jit.script(NormCNN(bn={})))
    model = _mark(tmp_path, key, lambda: NormCNN(bn={}))
    matches, detected = _matches(tmp_path, key, _state(torch.jit.script(model)), "copy")
    assert detected and matches >= 60
