"""Tensors follow the model's device: the function-preserving attacks, LoRA adapters and training keep a model's
tensors where they are. CI has no GPU, so the model lives on PyTorch's ``meta`` device, which, like CUDA, refuses
to mix with CPU tensors in arithmetic: a helper that builds a CPU scale or sign vector and multiplies it in
fails here as it would on CUDA."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_whitebox_decoder import TinyLlama
from test_whitebox_graph import TinyBert, resnet
from torch import nn

from wmark.attacks import permute_state_dict
from wmark.attacks.symmetry import LoRALinear, absorb_final_norm, flip_gain_signs, permute_spaces
from wmark.cli import main
from wmark.contract import host_array, to_device
from wmark.errors import UsageError
from wmark.training import default_device, resolve_device, train_epochs
from wmark.whitebox.graph import read_graph

META = torch.device("meta")


def on_meta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.to(META) for n, t in sd.items()}


def all_on_meta(sd: dict[str, torch.Tensor]) -> bool:
    return all(t.device == META for t in sd.values())


def test_neuron_permutation_keeps_the_device() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    out = permute_state_dict(on_meta(model.state_dict()), chain=["0.weight", "2.weight"], seed=1)
    assert all_on_meta(out)


def test_residual_stream_permutation_keeps_the_device() -> None:
    model = resnet(0)
    out = permute_spaces(on_meta(model.state_dict()), graph=read_graph(model), seed=1)
    assert all_on_meta(out)


def test_signed_permutations_and_gain_flips_keep_the_device() -> None:
    model = TinyLlama(0)
    graph = read_graph(model)
    sd = permute_spaces(on_meta(model.state_dict()), graph=graph, seed=1, signs=True)
    assert all_on_meta(flip_gain_signs(sd, graph=graph, seed=2))


def test_absorbing_a_layernorm_into_a_bias_free_reader_keeps_the_device() -> None:
    model = TinyBert(0)
    model.head = nn.Linear(32, 4, bias=False)
    sd = on_meta(model.state_dict())
    out = absorb_final_norm(sd, norm="encoder.encoder.layer.1.output.LayerNorm", readers=["head"])
    assert all_on_meta(out) and "head.bias" in out


def test_lora_adapters_live_with_their_base_layer() -> None:
    base = nn.Linear(5, 4, device=META, dtype=torch.float64)
    lora = LoRALinear(base, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert {p.device for p in lora.parameters()} == {META}
    assert {p.dtype for p in lora.parameters()} == {torch.float64}


def test_training_leaves_an_accelerator_placed_model_where_it_is() -> None:
    model = nn.Linear(3, 2, device=META)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert train_epochs(model, [], epochs=0, optimizer=optimizer) == 0
    assert model.weight.device == META


def test_host_arrays_detach_and_a_move_to_where_a_tensor_is_keeps_it() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert to_device({"x": x}, torch.device("cpu"))["x"] is x
    assert host_array(x.requires_grad_()).tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_a_named_device_is_checked_before_anything_is_served() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == default_device()
    with pytest.raises(UsageError, match="is not a device; use cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(UsageError, match="not a device wmark serves on"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="not available here .*use --device cpu"):
            resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_serve_refuses_a_missing_accelerator_in_one_sentence(tmp_path) -> None:
    result = CliRunner().invoke(main, ["serve", "--name", "m", "--arch", "fmnist-mlp", "--weights",
                                       str(tmp_path / "absent.safetensors"), "--device", "cuda"])
    assert result.exit_code == 2
    assert "is not available here" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["verify", "file", "--arch", "fmnist-mlp", "--suspect", "{tmp}/absent.safetensors"],
    ["verify", "extraction", "--arch", "fmnist-mlp", "--suspect", "{tmp}/absent.safetensors", "--rule",
     "{tmp}/absent.rule"],
    ["tiebreak", "build", "--arch", "fmnist-mlp", "--weights", "{tmp}/absent.safetensors", "--data", "digits",
     "--out", "{tmp}/rule.safetensors"],
    ["monitor", "calibrate", "--arch", "fmnist-mlp", "--weights", "{tmp}/absent.safetensors", "--data", "digits",
     "--streams", "{tmp}/absent.streams", "--out", "{tmp}/profile.safetensors"],
])
def test_verifiers_refuse_a_missing_accelerator_before_reading_anything(tmp_path, command) -> None:
    args = [part.format(tmp=tmp_path) for part in command]
    key = [] if args[0] == "monitor" else ["--key", str(tmp_path / "absent.key")]
    result = CliRunner().invoke(main, [*args, *key, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "is not available here" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
