"""Attacks on weights: permutation with rescaling, renaming and noise (predictions, files, errors)."""

from __future__ import annotations

import pytest
import torch
from _whitebox_helpers import tiny_model
from click.testing import CliRunner

from wmark.attacks import finetune, noise, permute, prune, quantize, rename_tensors
from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import load_tensors, save_model, wmark_metadata
from wmark.models import build_model


@pytest.mark.parametrize("arch", ["fmnist-cnn", "fmnist-mlp"])
def test_permute_keeps_predictions_of_builtin_models(arch) -> None:
    model = build_model(arch, num_classes=10, input_shape=(1, 28, 28), seed=0)
    attacked = permute(model, seed=1)
    x = torch.rand(32, 1, 28, 28)
    torch.testing.assert_close(attacked(x), model(x), rtol=1e-4, atol=1e-5)
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, attacked.state_dict()[n])]
    assert len(changed) >= 4


def test_permute_refuses_models_that_are_not_chains() -> None:
    odd = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(UsageError, match="plain conv/linear"):
        permute(odd)
    normed = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    with pytest.raises(UsageError, match="normalisation layers"):
        permute(normed)


def test_rename_keeps_tensors_and_drops_every_name() -> None:
    state = tiny_model(0).state_dict()
    renamed = rename_tensors(state, seed=2)
    assert len(renamed) == len(state) and not set(renamed) & set(state)
    assert sorted(t.numel() for t in renamed.values()) == sorted(t.numel() for t in state.values())
    assert rename_tensors(state, seed=2).keys() == renamed.keys()


def test_noise_is_relative_to_each_weight() -> None:
    model = tiny_model(0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), noise(model, std=0.0).parameters()))
    noisy = noise(model, std=0.5, seed=1)
    delta = noisy.fc1.weight - model.fc1.weight
    rms = model.fc1.weight.pow(2).mean().sqrt()
    assert delta.pow(2).mean().sqrt().item() == pytest.approx(0.5 * rms.item(), rel=0.05)
    assert torch.equal(noisy.fc1.bias, model.fc1.bias)
    with pytest.raises(UsageError, match="noise std must be between 0 and 10"):
        noise(model, std=-1.0)


def test_finetune_last_only_changes_the_head() -> None:
    model = tiny_model(0)
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,))
    tuned = finetune(model, x=x, y=y, epochs=1, layers="last")
    assert torch.equal(tuned.fc1.weight, model.fc1.weight)
    assert not torch.equal(tuned.fc2.weight, model.fc2.weight)


@pytest.mark.parametrize("kind,extra", [("permute", []), ("rename", []), ("noise", ["--std", "0.2"])])
def test_attack_cli_writes_safetensors(tmp_path, kind, extra) -> None:
    src, out = tmp_path / "m.safetensors", tmp_path / "a.safetensors"
    save_model(build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28), seed=0), src,
               metadata={"arch": "fmnist-cnn", "num_classes": 10, "input_shape": [1, 28, 28]})
    result = CliRunner().invoke(main, ["attack", kind, "--arch", "fmnist-cnn", "--weights", str(src),
                                       "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    tensors, meta = load_tensors(out)
    assert f'"kind": "{kind}"' in meta["wmark.attack"]
    assert ("conv1.weight" in tensors) == (kind != "rename")


def test_attack_cli_bad_input_writes_nothing(tmp_path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    out = tmp_path / "a.safetensors"
    result = CliRunner().invoke(main, ["attack", "permute", "--arch", "fmnist-cnn", "--weights",
                                       str(tmp_path / "bad.safetensors"), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]


def test_attack_cli_keeps_a_text_model_s_modality(tmp_path) -> None:
    """An attacked text model still records its tokenizer: without it the copy was served as an image model."""
    src, out = tmp_path / "m.safetensors", tmp_path / "a.safetensors"
    modality = {"kind": "text", "tokenizer": {"name": "all-MiniLM-L6-v2", "vocab_sha256": "0" * 64}, "max_length": 16}
    save_model(build_model("text-bow", num_classes=4, input_shape=(16,), seed=0), src,
               metadata={"arch": "text-bow", "num_classes": 4, "input_shape": [16], "modality": modality})
    result = CliRunner().invoke(main, ["attack", "prune", "--arch", "text-bow", "--weights", str(src),
                                       "--out", str(out), "--sparsity", "0.3"])
    assert result.exit_code == 0, result.output
    meta = wmark_metadata(load_tensors(out)[1])
    assert meta["modality"] == modality and meta["attack"] == {"kind": "prune", "sparsity": 0.3}


@pytest.mark.parametrize("bits", [None, 4])
def test_prune_zeroes_exactly_the_asked_fraction(bits) -> None:
    """Quantized weights share magnitudes; pruning by a threshold zeroed every weight tied with the cut-off."""
    model = build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8), seed=0)
    model = model if bits is None else quantize(model, bits=bits)
    pruned = prune(model, sparsity=0.1)
    weights = [m.weight for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == int(0.1 * total)
    kept = torch.cat([w.flatten() for w in weights])
    assert kept.abs().max() == max(m.weight.abs().max() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_permute_refuses_a_residual_network_naming_the_permutation_that_fits_it():
    """The refusal called the plain chains 'the built-in models', while the built-in resnet-small is refused."""
    import re

    model = build_model("resnet-small", num_classes=10, input_shape=(3, 32, 32))
    with pytest.raises(UsageError, match=re.escape("permute supports plain conv/linear chains (fmnist-mlp, fmnist-cnn), "
                                                   "and a residual network's permutation is "
                                                   "wmark.attacks.symmetry.permute_spaces.")):
        permute(model, seed=0)


class _AttentionNet(torch.nn.Module):
    """Attention (its input projection is a raw parameter, not an nn.Linear), a transposed conv and a GPT-2-style
    Conv1D (weight in × out), the layers pruning, quantization and noise skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.att = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.up = torch.nn.ConvTranspose1d(16, 8, 3)
        self.proj = Conv1D(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.att(x, x, x)[0].transpose(1, 2)).mean(2)
        return h @ self.proj.weight


class Conv1D(torch.nn.Module):
    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))


def test_weight_attacks_reach_attention_and_transposed_convs() -> None:
    torch.manual_seed(0)
    model = _AttentionNet()
    named = {"in_proj": model.att.in_proj_weight, "out_proj": model.att.out_proj.weight, "up": model.up.weight,
             "proj": model.proj.weight}
    total = sum(w.numel() for w in named.values())
    pruned = prune(model, sparsity=0.3)
    pruned_w = [pruned.att.in_proj_weight, pruned.att.out_proj.weight, pruned.up.weight, pruned.proj.weight]
    assert sum(int((w == 0).sum()) for w in pruned_w) == int(0.3 * total)
    assert all((w == 0).any() for w in pruned_w)
    quantized = quantize(model, bits=3)
    # three levels either side of zero per output channel: in_proj rows, the transposed conv's and Conv1D's columns
    assert all(len(row.unique()) <= 7 for row in quantized.att.in_proj_weight)
    assert all(len(quantized.up.weight[:, j].unique()) <= 7 for j in range(8))
    assert all(len(quantized.proj.weight[:, j].unique()) <= 7 for j in range(4))
    noisy = noise(model, std=0.5, seed=0)
    assert not torch.equal(noisy.att.in_proj_weight, model.att.in_proj_weight)
    assert not torch.equal(noisy.up.weight, model.up.weight) and not torch.equal(noisy.proj.weight, model.proj.weight)


def test_prune_counts_a_tied_weight_once() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].weight = model[0].weight
    pruned = prune(model, sparsity=0.25)
    assert pruned[0].weight is pruned[1].weight and int((pruned[0].weight == 0).sum()) == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_keeps_a_low_precision_model_finite(dtype) -> None:
    """In float16 the scale's floor (1e-12) rounded to 0: a pruned (all-zero) channel quantized to NaN."""
    model = prune(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8), seed=0), sparsity=0.2).to(dtype)
    with torch.no_grad():
        model.fc2.weight[3] = 0
    quantized = quantize(model, bits=8)
    assert quantized.fc2.weight.dtype == dtype
    assert all(torch.isfinite(p).all() for p in quantized.parameters())
    assert torch.equal(quantized.fc2.weight[3], torch.zeros_like(quantized.fc2.weight[3]))


def test_finetune_of_a_float16_model_stays_finite_and_float16() -> None:
    """Adam's float16 steps are NaN where a gradient is 0 (its eps rounds to 0): the copy came back all NaN."""
    model = build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8), seed=0).half()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    tuned = finetune(model, x=x, y=y, epochs=2)
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in tuned.parameters())
    assert not torch.equal(tuned.fc1.weight, model.fc1.weight)
    assert model.fc1.weight.dtype == torch.float16 and torch.isfinite(model.fc1.weight).all()


@pytest.mark.parametrize("norm", [torch.nn.GroupNorm(2, 6), torch.nn.RMSNorm(6), torch.nn.BatchNorm3d(6)])
def test_permute_refuses_every_normalisation_layer(norm) -> None:
    """Only BatchNorm1d/2d and LayerNorm were refused: behind a GroupNorm or RMSNorm the 'unchanged' predictions moved."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), norm, torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with pytest.raises(UsageError, match="Permuting models with normalisation layers is not supported"):
        permute(model)


@pytest.mark.parametrize("kind,classes,shape", [("finetune", 10, (1, 28, 28)), ("finetune", 3, (1, 8, 8)),
                                                ("prune", 3, (1, 8, 8))])
def test_attack_refuses_data_unlike_the_model_s(tmp_path, kind, classes, shape) -> None:
    """Fine-tuning on other-shaped images or more classes failed deep in PyTorch; pruning measured a meaningless accuracy."""
    src, out = tmp_path / "m.safetensors", tmp_path / "a.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=classes, input_shape=shape, seed=0), src,
               metadata={"arch": "fmnist-mlp", "num_classes": classes, "input_shape": list(shape)})
    result = CliRunner().invoke(main, ["attack", kind, "--arch", "fmnist-mlp", "--weights", str(src), "--out", str(out),
                                       "--data", "digits", *(["--epochs", "1"] if kind == "finetune" else [])])
    assert result.exit_code == 2 and not out.exists()
    assert (f"The data digits has 10 classes of inputs shaped (1, 8, 8) but the model {src} has {classes} classes and "
            f"takes inputs shaped {shape}; give data like the model's.") in result.output
