"""Weight mark read from the real graph: residual CNNs (stream permutation, BatchNorm folding) and BERT-style
transformers (hidden/head/MLP permutations, fused QKV, norm absorption, LoRA merge), each attack
function-preserving, each detected; independent models never; graphs that cannot be aligned refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _whitebox_helpers import check, guarded_aligner, tiny_key
from _whitebox_helpers import train as _train
from click.testing import CliRunner
from torch import nn
from transformers import BertConfig, BertModel

from wmark.attacks import prune, quantize, rename_tensors
from wmark.attacks.symmetry import (
    absorb_final_norm,
    fold_batchnorm,
    fuse_qkv,
    lora_merge,
    permute_heads,
    permute_spaces,
    split_qkv,
)
from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import load_tensors, save_model, save_tensors
from wmark.keys import save_key
from wmark.resnet import ResNet
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.align import Aligner, plan_layers
from wmark.whitebox.graph import binormalize, plan, read_graph


def resnet(seed: int) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(num_classes=10, input_shape=(3, 16, 16), widths=(8, 16, 32))


class TinyBert(nn.Module):
    """A tiny random BERT encoder, mean-pooled, with a linear head (128 MLP neurons: room for 32 bits at margin)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        self.encoder = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))


def image_task(seed: int, n: int = 384) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=gen)
    teacher = torch.randn(48, 10, generator=torch.Generator().manual_seed(7))
    return x, ((nn.functional.avg_pool2d(x, 4).flatten(1) - 0.5) @ teacher).argmax(1)


def text_task(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 120, (n, 12), generator=torch.Generator().manual_seed(seed))
    return ids, ids[:, 0] % 4


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], *, steps: int, seed: int,
          embedder: WeightsEmbedder | None = None, lr: float = 3e-3) -> nn.Module:
    return _train(model, data=data, steps=steps, seed=seed, embedder=embedder, lr=lr)


def mark(base: nn.Module, key, data, d, *, steps: int, lr: float) -> nn.Module:
    save_model(base, d / "anchor.safetensors")
    model = copy.deepcopy(base)
    emb = WeightsEmbedder(key, model)
    train(model, data, steps=steps, seed=1, embedder=emb, lr=lr)
    assert emb.bit_errors() == 0
    save_model(model, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return model


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("resnet")
    key = tiny_key(64, seed=31)
    base = train(resnet(0), image_task(0), steps=30, seed=0)
    return key, mark(base, key, image_task(1), d, steps=50, lr=3e-3), d


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bert")
    key = tiny_key(32, seed=32)
    return key, mark(TinyBert(0), key, text_task(1), d, steps=120, lr=2e-3), d


def test_residual_adds_join_the_stream_across_blocks_and_downsample_convs() -> None:
    g = read_graph(resnet(0))
    layer = {lay.name: lay for lay in g.layers}
    assert layer["stem.weight"].out == layer["blocks.0.conv2.weight"].out
    assert layer["blocks.1.down.0.weight"].out == layer["blocks.1.conv2.weight"].out
    assert layer["blocks.2.down.0.weight"].out == layer["blocks.2.conv2.weight"].out == layer["blocks.3.conv2.weight"].out
    assert layer["blocks.3.conv1.weight"].out != layer["blocks.3.conv2.weight"].out
    stream = g.spaces[layer["stem.weight"].out]
    assert {"bn.weight", "blocks.0.bn2.running_var"} <= set(stream.params)
    names = [lay.name for lay in plan(g, "blocks.3.conv2.weight")]
    assert names[-2:] == ["blocks.3.conv1.weight", "blocks.3.conv2.weight"] and "stem.weight" in names


def test_bert_rules_place_embeddings_mlp_and_norms_in_the_hidden_space() -> None:
    g = read_graph(TinyBert(0))
    assert g.family == "bert"
    layer = {lay.name: lay for lay in g.layers}
    word = layer["encoder.embeddings.word_embeddings.weight"]
    assert word.transpose and word.out == "hidden" and g.spaces[word.inp].kind == "fixed"
    assert layer["encoder.encoder.layer.1.output.dense.weight"].inp == "mlp1"
    assert g.spaces[layer["encoder.encoder.layer.0.attention.output.dense.weight"].inp].kind == "opaque"
    assert "encoder.encoder.layer.1.output.LayerNorm.weight" in g.spaces["hidden"].params
    names = [lay.name for lay in plan(g, "encoder.encoder.layer.1.output.dense.weight")]
    assert not any("attention" in n for n in names)


def test_resnet_permutations_and_folding_keep_the_function() -> None:
    model = train(resnet(3), image_task(0), steps=10, seed=0)
    x = image_task(5, 32)[0]
    permuted = resnet(9)
    permuted.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model), seed=1))
    assert torch.allclose(permuted.eval()(x), model(x), atol=1e-4)
    assert not torch.equal(permuted.stem.weight, model.stem.weight)
    folded = fold_batchnorm(permuted)
    assert torch.allclose(folded(x), model(x), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_fold_batchnorm_refuses_a_model_without_batchnorm() -> None:
    """A BERT-style encoder failed in torch.fx's tracer; a plain CNN came back unchanged, as if folded."""
    for model in (TinyBert(4), nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))):
        with pytest.raises(UsageError, match="no BatchNorm layer to fold"):
            fold_batchnorm(model)


def test_transformer_rewrites_keep_the_function() -> None:
    model = TinyBert(4).eval()
    ids = text_task(5, 16)[0]
    sd = permute_spaces(model.state_dict(), graph=read_graph(model), seed=1, extra_readers={"hidden": ["head.weight"]})
    sd = permute_heads(sd, num_heads=4, prefix="encoder.", seed=2)
    sd = absorb_final_norm(sd, norm="encoder.encoder.layer.1.output.LayerNorm", readers=["head"])
    other = TinyBert(5)
    other.load_state_dict(sd)
    assert torch.allclose(other.eval()(ids), model(ids), atol=1e-4)
    fused = fuse_qkv(sd, prefix="encoder.")
    assert "encoder.encoder.layer.0.attention.self.query.weight" not in fused
    h = torch.randn(5, 32)
    qkv = nn.functional.linear(h, fused["encoder.encoder.layer.0.attention.self.qkv.weight"],
                               fused["encoder.encoder.layer.0.attention.self.qkv.bias"])
    q = nn.functional.linear(h, sd["encoder.encoder.layer.0.attention.self.query.weight"],
                             sd["encoder.encoder.layer.0.attention.self.query.bias"])
    assert torch.allclose(qkv[:, :32], q, atol=1e-5)
    back = split_qkv(fused, prefix="encoder.")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    captured = {}

    def adapt(wrapped: nn.Module) -> None:
        for name, p in wrapped.named_parameters():
            if p.requires_grad and name.endswith(".b"):
                p.data.normal_()
        captured["out"] = wrapped(ids).detach()

    merged = lora_merge(model, train=adapt, rank=2)
    assert torch.allclose(merged(ids), captured["out"], atol=1e-4)
    assert not torch.allclose(merged(ids), model(ids), atol=1e-3)


def test_binormalize_ignores_row_and_unit_scales_and_follows_permutations() -> None:
    w = torch.randn(24, 8, 9, dtype=torch.float64)
    rows = torch.rand(24, dtype=torch.float64) + 0.2
    units = torch.rand(8, dtype=torch.float64) * 3 + 0.1
    scaled = w * rows[:, None, None] * units[None, :, None]
    assert torch.allclose(binormalize(scaled, 8, iters=60), binormalize(w, 8, iters=60), atol=1e-6)
    perm = torch.randperm(8)
    assert torch.allclose(binormalize(w[:, perm], 8), binormalize(w, 8)[:, perm])


def resnet_attacks(model: ResNet):
    graph = read_graph(model)

    def permuted(m: nn.Module) -> ResNet:
        out = resnet(99)
        out.load_state_dict(permute_spaces(m.state_dict(), graph=graph, seed=7))
        return out.eval()

    return {
        "stream+block permutation, renamed": lambda: rename_tensors(permuted(model).state_dict(), seed=1),
        "BN folded": lambda: fold_batchnorm(model).state_dict(),
        "fine-tune, prune 30%, int8, permuted, BN folded": lambda: rename_tensors(fold_batchnorm(quantize(prune(
            permuted(train(copy.deepcopy(model), image_task(2), steps=40, seed=2)), sparsity=0.3))).state_dict(),
            seed=2),
    }


@pytest.mark.parametrize("attack", ["stream+block permutation, renamed", "BN folded",
                                    "fine-tune, prune 30%, int8, permuted, BN folded"])
def test_resnet_mark_survives(cnn, attack) -> None:
    key, model, d = cnn
    verdict = check(key, d, resnet_attacks(model)[attack](), "attacked")
    test = verdict.tests[0]
    assert verdict.detected and test.matches >= 60, (attack, test.matches)
    assert test.null["exact_by_construction"] and test.details["form"] == "graph"


def test_alignment_matters_for_a_permuted_resnet(cnn) -> None:
    key, model, d = cnn
    permuted = resnet_attacks(model)["stream+block permutation, renamed"]()
    save_tensors(permuted, d / "perm.safetensors")
    src, _ = load_tensors(d / "anchor.safetensors")
    sus, _ = load_tensors(d / "perm.safetensors")
    info = json.loads(dict(load_tensors(d / "ref.safetensors")[1])["wmark.weights"])
    layers, spaces, iters = plan_layers(info)
    aligner = Aligner(layers=layers, spaces=spaces, source=src.__getitem__, suspect_shapes={
        n: tuple(t.shape) for n, t in sus.items()}, suspect=sus.__getitem__, iters=iters)
    aligner.run()
    found = check(key, d, permuted, "p2").tests[0].details["layer_found"]
    aligned = aligner.vector(found)
    aligner.perms[layers[-1].inp] = None
    unaligned = aligner.vector(found)
    from wmark.schemes.weights import payload_bits, projection

    x, want = projection(key, aligned.numel()), payload_bits(key)
    hits = [int(np.sum(((x @ v) >= 0).numpy() == want)) for v in (aligned, unaligned)]
    assert hits[0] >= 60 and hits[1] < 48, hits


def test_a_graph_plan_verdict_rechecks_from_its_report_and_re_reads_from_its_files(cnn, tmp_path) -> None:
    from wmark.recheck import recheck
    from wmark.report import write_report

    key, model, d = cnn
    verdict = check(key, d, resnet_attacks(model)["stream+block permutation, renamed"](), "rechecked")
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    plain = recheck(report=tmp_path / "r.json", key=key)
    files = {"suspect": d / "rechecked.safetensors", "reference": d / "ref.safetensors",
             "anchor": d / "anchor.safetensors"}
    again = recheck(report=tmp_path / "r.json", key=key, model_files=files)
    assert plain.status == again.status == "same" and plain.recomputed["decision"] == "detected", plain.message
    assert "white-box files SHA-256 and the bits re-read from them" in again.checks


def test_independent_resnets_are_not_detected(cnn) -> None:
    key, _, d = cnn
    for seed in range(3):
        verdict = check(key, d, train(resnet(100 + seed), image_task(100 + seed), steps=50, seed=seed).state_dict(),
                        "indep")
        assert not verdict.detected and verdict.tests[0].log10_p > -3


def test_alignment_never_reads_the_marked_layer(cnn) -> None:
    """With an anchor the permutations come from (anchor, suspect) only: the null is exact by construction."""
    _, _, d = cnn
    aligner, layers = guarded_aligner(d, {n: t for n, t in train(resnet(7), image_task(7), steps=20, seed=7).state_dict().items()})
    assert layers[-1].inp in aligner.perms and aligner.candidates()


def bert_attacks(model: TinyBert):
    graph = read_graph(model)

    def rewritten(m: nn.Module) -> dict[str, torch.Tensor]:
        sd = permute_spaces(m.state_dict(), graph=graph, seed=3, extra_readers={"hidden": ["head.weight"]})
        sd = permute_heads(sd, num_heads=4, prefix="encoder.", seed=4)
        return absorb_final_norm(sd, norm="encoder.encoder.layer.1.output.LayerNorm", readers=["head"])

    def as_model(sd: dict[str, torch.Tensor]) -> TinyBert:
        out = TinyBert(99)
        out.load_state_dict(sd)
        return out

    data = text_task(2)
    return {
        "hidden/head/MLP permuted, norm absorbed, QKV fused, renamed": lambda: rename_tensors(
            fuse_qkv(rewritten(model), prefix="encoder."), seed=1),
        "fine-tune, prune 30%, int8 of the rewritten model": lambda: rename_tensors(quantize(prune(train(
            as_model(rewritten(model)), data, steps=40, seed=2, lr=1e-3), sparsity=0.3)).state_dict(), seed=2),
        "LoRA merged, fp16": lambda: {n: t.half() for n, t in lora_merge(
            as_model(rewritten(model)), rank=4, trainable=["head.weight", "head.bias"],
            train=lambda w: train(w, data, steps=40, seed=3, lr=1e-3)).state_dict().items()},
    }


@pytest.mark.parametrize("attack", ["hidden/head/MLP permuted, norm absorbed, QKV fused, renamed",
                                    "fine-tune, prune 30%, int8 of the rewritten model", "LoRA merged, fp16"])
def test_transformer_mark_survives(bert, attack) -> None:
    key, model, d = bert
    verdict = check(key, d, bert_attacks(model)[attack](), "attacked")
    assert verdict.detected and verdict.tests[0].details["family"] == "bert", verdict.tests[0].matches


def test_a_negated_layernorm_stream_keeps_the_function_and_the_mark(bert) -> None:
    """LN(-x) = -LN(x) once the norm's bias is negated, so a thief may negate BERT's whole hidden stream; it was
    aligned as if it could not be, and the verdict read about half the bits (18 of 32)."""
    key, model, d = bert
    sd = permute_spaces(model.state_dict(), graph=read_graph(model), seed=5, signs=True,
                        extra_readers={"hidden": ["head.weight"]})
    ids = text_task(5, 16)[0]
    other = TinyBert(9)
    other.load_state_dict(sd)
    assert torch.allclose(other.eval()(ids), model(ids), atol=1e-4)
    word = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(sd[word].abs().sort(1).values, model.state_dict()[word].abs().sort(1).values)
    assert not torch.equal(sd[word].sort(1).values, model.state_dict()[word].sort(1).values)
    aligner, _ = guarded_aligner(d, sd)
    assert torch.equal(aligner.signs["hidden"], -torch.ones(32))
    verdict = check(key, d, rename_tensors(sd, seed=3), "negated")
    assert verdict.detected and verdict.tests[0].matches >= 30, verdict.tests[0].matches


def test_extra_tensors_of_another_dtype_or_holding_nan_are_no_candidates(bert) -> None:
    """An extra int64 or NaN tensor shaped like a plan layer aborted graph verification (exit 2 or 3)."""
    key, model, d = bert
    sd = dict(model.state_dict())
    mlp_in, mlp_out = (sd[f"encoder.encoder.layer.0.{p}.dense.weight"] for p in ("intermediate", "output"))
    decoys = {"x.ids": torch.zeros_like(mlp_out, dtype=torch.int64), "y.nan": torch.full_like(mlp_out, float("nan")),
              "z.nan": torch.full_like(mlp_in, float("nan"))}
    verdict = check(key, d, {**sd, **decoys}, "decoys")
    assert verdict.detected and verdict.tests[0].details["candidates"] == 1


def test_independent_transformers_are_not_detected(bert) -> None:
    key, _, d = bert
    for seed in range(3):
        model = TinyBert(200 + seed)
        if seed:
            train(model, text_task(200 + seed), steps=40, seed=seed, lr=1e-3)
        verdict = check(key, d, model.state_dict(), "indep")
        assert not verdict.detected and verdict.tests[0].log10_p > -3


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv1(x))
        h = h * torch.sigmoid(h.mean())  # a tensor-by-tensor product: not an op wmark aligns through
        return self.fc(self.conv2(h).mean((2, 3)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(self.bn(x))


def test_graphs_that_cannot_be_aligned_are_refused() -> None:
    key = tiny_key(8, seed=1)
    with pytest.raises(UsageError, match="conv2.weight reads the output of .* that wmark cannot align through"):
        WeightsEmbedder(key, Gated(), layer="conv2")
    with pytest.raises(UsageError, match="torch.fx cannot trace the model's forward"):
        WeightsEmbedder(key, Branchy())
    with pytest.raises(UsageError, match="is an embedding table"):
        WeightsEmbedder(key, TinyBert(0), layer="encoder.embeddings.word_embeddings")


class TokenMLP(nn.Module):
    """A linear layer over each of 10 tokens, then a flatten: its units sit on the last axis, not dimension 1."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(8, 16)
        self.mix = nn.Linear(160, 64)
        self.conv = nn.Conv1d(10, 4, 3)
        self.fc = nn.Linear(64 + 4 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.tok(x))
        return self.fc(torch.cat([torch.relu(self.mix(h.flatten(1))), self.conv(h).flatten(1)], 1))


def test_a_flatten_or_conv_of_a_linear_layers_output_is_refused_not_misread() -> None:
    """The 160 columns of mix were read as 16 units of 10 columns each; they are 10 tokens of 16 units."""
    g = read_graph(TokenMLP())
    assert TokenMLP()(torch.randn(2, 10, 8)).shape == (2, 3)
    for name in ("mix.weight", "conv.weight"):
        assert g.spaces[g.layer(name).inp].kind == "opaque"
        with pytest.raises(UsageError, match="units sit on the last axis"):
            plan(g, name)
    mlp = read_graph(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 2)))
    assert mlp.layers[1].inp == mlp.layers[0].out


def test_an_electra_style_embedding_projection_is_refused_not_misread() -> None:
    """The word embeddings' width was taken as the hidden stream's: 16 units read as 16 blocks of 2 columns."""
    from transformers import ElectraConfig, ElectraModel

    torch.manual_seed(0)
    model = ElectraModel(ElectraConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=32))
    with pytest.raises(UsageError, match="ELECTRA-style embedding projection"):
        read_graph(model)


def test_cli_refuses_a_reference_plan_it_cannot_align(bert, tmp_path) -> None:
    key, _, d = bert
    tensors, meta = load_tensors(d / "ref.safetensors")
    info = json.loads(meta["wmark.weights"])
    info["graph"]["spaces"]["hidden"]["kind"] = "opaque"
    save_tensors(tensors, tmp_path / "bad.safetensors", metadata={**meta, "wmark.weights": json.dumps(info)})
    save_key(key, tmp_path / "k.key")
    result = CliRunner().invoke(main, ["verify", "file", "--whitebox", "--key", str(tmp_path / "k.key"), "--reference",
                                       str(tmp_path / "bad.safetensors"), "--suspect", str(d / "ref.safetensors")])
    assert result.exit_code == 2 and "names a space that cannot be aligned" in result.stderr
    ok = CliRunner().invoke(main, ["verify", "file", "--whitebox", "--key", str(tmp_path / "k.key"), "--reference",
                                   str(d / "ref.safetensors"), "--suspect", str(d / "ref.safetensors"), "--anchor",
                                   str(d / "anchor.safetensors"), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["decision"] == "detected"


def test_resnet_small_is_a_builtin_arch_marked_inside_its_last_block() -> None:
    from wmark.models import build_model

    model = build_model("resnet-small", num_classes=10, input_shape=(3, 32, 32), seed=0)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert WeightsEmbedder(tiny_key(64, seed=2), model).layer == "blocks.3.conv2.weight"


@pytest.mark.slow
def test_rgb32_fashion_mnist_is_padded_and_replicated() -> None:
    from wmark.data import FASHION_MNIST_DIR, load_dataset

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    rgb, grey = load_dataset("fashion-mnist-rgb32"), load_dataset("fashion-mnist")
    x = rgb.x_train[:3]
    assert rgb.input_shape == (3, 32, 32) and len(rgb.x_test) == len(grey.x_test)
    assert torch.equal(x[:, 0], x[:, 2]) and float(x[:, :, :2].abs().sum()) == 0.0
    assert torch.equal(x[:, 1, 2:30, 2:30], grey.x_train[:3, 0])


def test_a_tensor_that_is_a_candidate_for_an_embedding_and_a_linear_layer_is_viewed_for_each(tmp_path) -> None:
    """tiny-bert's 64-position table and its 64-neuron MLP weights share the raw shape (64, 32)."""
    from wmark.models import build_model

    torch.set_num_threads(1)
    model = build_model("tiny-bert", num_classes=8, input_shape=(64,), seed=0)
    ids = torch.randint(1, 1000, (256, 12), generator=torch.Generator().manual_seed(0))
    _train(model, steps=200, seed=0, lr=2e-3, data=(ids, ids[:, 0] % 8))
    key = tiny_key(32, seed=3)
    marked = mark(model, key, (ids, ids[:, 1] % 8), tmp_path, steps=120, lr=3e-4)
    assert {tuple(p.shape) for n, p in marked.named_parameters() if "position" in n or "intermediate.dense.w" in n} \
        == {(64, 32)}
    verdict = check(key, tmp_path, marked.state_dict(), "itself")
    assert verdict.detected and verdict.tests[0].matches >= 30

