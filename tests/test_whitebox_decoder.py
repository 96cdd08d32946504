"""Weight mark of a Llama-style decoder (RMSNorm, SwiGLU, RoPE): read by explicit rules, aligned through signed
permutations of the hidden stream and SwiGLU neurons and per-norm gain signs, detected after every
function-preserving rewrite plus fine-tuning, pruning and int8; independent decoders and the unmarked anchor
never; unknown layouts refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _whitebox_helpers import check, guarded_aligner, tiny_key
from _whitebox_helpers import train as _train
from click.testing import CliRunner
from scipy import stats
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from wmark.attacks import prune, quantize, rename_tensors
from wmark.attacks.symmetry import absorb_final_norm, flip_gain_signs, permute_decoder_heads, permute_spaces
from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import load_tensors, save_model, save_tensors
from wmark.keys import save_key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.graph import plan, read_graph
from wmark.whitebox.verify import verify_whitebox

VOCAB = 200


class TinyLlama(LlamaForSequenceClassification):
    """A tiny random Llama classifier (hidden 64, 2 layers, 4 query and 2 key/value heads, 128 SwiGLU neurons),
    called on token ids alone so the shared training helper can drive it."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     pad_token_id=0, num_labels=4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids=ids).logits


def text_task(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))
    return ids, ids[:, 0] % 4


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], *, steps: int, seed: int,
          embedder: WeightsEmbedder | None = None, lr: float = 2e-3) -> nn.Module:
    return _train(model, data=data, steps=steps, seed=seed, embedder=embedder, lr=lr)


def rewritten(model: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """Signed permutation of the hidden stream and every SwiGLU space, sign flips of every norm gain with its
    readers' columns, then a head permutation."""
    graph = read_graph(model)
    sd = permute_spaces(model.state_dict(), graph=graph, seed=seed, signs=True)
    sd = flip_gain_signs(sd, graph=graph, seed=seed + 1)
    return permute_decoder_heads(sd, num_heads=4, seed=seed + 2)


def absorbed(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every RMSNorm gain absorbed into the layers reading it (each norm feeds only linear layers)."""
    graph = read_graph(model)
    for gain in dict.fromkeys(lay.gain for lay in graph.layers if lay.gain):
        readers = [lay.name.removesuffix(".weight") for lay in graph.layers if lay.gain == gain]
        sd = absorb_final_norm(sd, norm=gain.removesuffix(".weight"), readers=readers)
    return sd


def as_model(sd: dict[str, torch.Tensor]) -> TinyLlama:
    out = TinyLlama(99)
    out.load_state_dict(sd)
    return out.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("llama")
    key = tiny_key(32, seed=33)
    base = TinyLlama(0)
    save_model(base, d / "anchor.safetensors")
    model = copy.deepcopy(base)
    emb = WeightsEmbedder(key, model)
    assert emb.layer == "model.layers.1.mlp.down_proj.weight"
    train(model, text_task(1), steps=120, seed=1, embedder=emb)
    assert emb.bit_errors() == 0
    save_model(model, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return key, model.eval(), base.eval(), d


def test_decoder_rules_read_signed_hidden_and_swiglu_spaces() -> None:
    g = read_graph(TinyLlama(0))
    assert g.family == "decoder"
    assert (g.spaces["hidden"].kind, g.spaces["hidden"].size) == ("signed", 64)
    assert (g.spaces["mlp1"].kind, g.spaces["mlp1"].size) == ("signed", 128)
    assert g.spaces["heads0.qk"].kind == "opaque"
    assert "model.norm.weight" in g.spaces["hidden"].params and len(g.spaces["hidden"].params) == 5
    assert not g.layer("model.layers.1.mlp.gate_proj.weight").signs
    assert g.layer("model.layers.1.mlp.up_proj.weight").signs
    assert g.layer("score.weight").inp == "hidden" and g.layer("model.embed_tokens.weight").transpose
    # Each reader records the norm gain it reads through (whose signs a thief may flip with its columns).
    assert g.layer("model.layers.1.mlp.gate_proj.weight").gain == "model.layers.1.post_attention_layernorm.weight"
    assert g.layer("score.weight").gain == "model.norm.weight"
    assert g.layer("model.layers.1.mlp.down_proj.weight").gain is None
    # The down-projection's rows write the hidden stream, so its plan also resolves the stream's signs.
    names = [lay.name for lay in plan(g, "model.layers.1.mlp.down_proj.weight")]
    assert names[0] == "model.embed_tokens.weight" and "model.layers.0.mlp.down_proj.weight" in names

    def small(**kw: bool) -> LlamaConfig:
        return LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, **kw)

    bare = read_graph(LlamaModel(small()))
    assert bare.family == "decoder" and bare.layers[0].name == "embed_tokens.weight"
    # A language-model head tied to the embedding still reads the hidden stream (and is the last layer).
    tied = read_graph(LlamaForCausalLM(small(tie_word_embeddings=True)))
    assert (tied.layers[-1].name, tied.layers[-1].inp) == ("lm_head.weight", "hidden")


def test_signed_permutation_and_head_permutation_keep_the_function() -> None:
    model = TinyLlama(4).eval()
    sd = rewritten(model)
    embed = model.state_dict()["model.embed_tokens.weight"]
    flipped = sd["model.embed_tokens.weight"]
    # Each new hidden unit is an old one, and about half of them changed sign.
    match = (flipped.T @ embed) / (flipped.norm(dim=0)[:, None] * embed.norm(dim=0)[None, :])
    best = match.abs().max(dim=1)
    assert bool((best.values > 0.9999).all())
    assert 16 <= int((match[torch.arange(64), best.indices] < 0).sum()) <= 48
    assert 16 <= int((sd["model.layers.1.post_attention_layernorm.weight"] < 0).sum()) <= 48
    ids = text_task(5, n=16)[0]
    with torch.no_grad():
        assert torch.allclose(as_model(sd)(ids), model(ids), atol=1e-5)
        assert torch.allclose(as_model(absorbed(model, sd))(ids), model(ids), atol=1e-5)
        assert not torch.allclose(TinyLlama(5).eval()(ids), model(ids), atol=1e-3)


def test_alignment_recovers_the_signs_and_never_reads_the_marked_layer(llama) -> None:
    """Aligned to the anchor, the recovered signed permutation undoes the rewrite exactly; the marked layer is
    never read (the null is exact by construction)."""
    _, _, base, d = llama
    sus = rewritten(base)
    src, _ = load_tensors(d / "anchor.safetensors")
    aligner, _ = guarded_aligner(d, sus)
    order, signs = aligner.perms["hidden"], aligner.signs["hidden"]
    assert order is not None and bool((signs < 0).any())
    assert torch.allclose(sus["model.embed_tokens.weight"][:, order] * signs, src["model.embed_tokens.weight"])
    order, signs = aligner.perms["mlp1"], aligner.signs["mlp1"]
    hidden = aligner.perms["hidden"]
    assert order is not None and hidden is not None
    gain = aligner.gain_signs["model.layers.1.post_attention_layernorm.weight"]
    assert bool((gain < 0).any())
    for part, row_signs in (("up", signs), ("gate", torch.ones(128))):
        name = f"model.layers.1.mlp.{part}_proj.weight"
        undone = sus[name][order][:, hidden] * row_signs[:, None] * (aligner.signs["hidden"] * gain)[None, :]
        assert torch.allclose(undone, src[name], atol=1e-6), part


@pytest.mark.parametrize("attack", ["none", "signed + gain signs + head permutation, renamed",
                                    "signed rewrite, every norm gain absorbed",
                                    "fine-tune, prune 30%, int8 of the signed rewrite, renamed"])
def test_decoder_mark_survives(llama, attack) -> None:
    key, model, _, d = llama
    if attack == "none":
        tensors = model.state_dict()
    elif attack.startswith("signed + gain"):
        tensors = rename_tensors(rewritten(model), seed=1)
    elif attack.startswith("signed rewrite"):
        tensors = absorbed(model, rewritten(model))
        assert all(bool((tensors[p] == 1).all()) for p in read_graph(model).spaces["hidden"].params)
    else:
        thief = train(as_model(rewritten(model)), text_task(2), steps=40, seed=2, lr=1e-3)
        tensors = rename_tensors(quantize(prune(thief, sparsity=0.3)).state_dict(), seed=2)
    verdict = check(key, d, tensors, "attacked")
    test = verdict.tests[0]
    assert verdict.detected and test.details["family"] == "decoder" and test.matches >= 30, test.matches
    assert test.null["exact_by_construction"]


def test_cli_verifies_a_signed_rewrite(llama, tmp_path) -> None:
    key, model, _, d = llama
    save_key(key, tmp_path / "k.key")
    save_tensors(rename_tensors(rewritten(model, seed=11), seed=3), tmp_path / "sus.safetensors")
    result = CliRunner().invoke(main, ["verify", "file", "--whitebox", "--key", str(tmp_path / "k.key"), "--reference",
                                       str(d / "ref.safetensors"), "--suspect", str(tmp_path / "sus.safetensors"),
                                       "--anchor", str(d / "anchor.safetensors"), "--json"])
    assert result.exit_code == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["decision"] == "detected" and verdict["tests"][0]["details"]["family"] == "decoder"


def test_signs_must_be_recovered(llama, tmp_path) -> None:
    """A sign-blind alignment (the same plan with its spaces declared merely permutable) loses the mark to the
    signed rewrite that the signed alignment reads in full."""
    key, model, _, d = llama
    tensors, meta = load_tensors(d / "ref.safetensors")
    info = json.loads(meta["wmark.weights"])
    info["graph"]["spaces"] = {s: dict(v, kind="free" if v["kind"] == "signed" else v["kind"])
                               for s, v in info["graph"]["spaces"].items()}
    blind = tmp_path / "blind.safetensors"
    save_tensors(tensors, blind, metadata={"weights": info, "commitment": meta["wmark.commitment"]})
    save_tensors(rewritten(model), tmp_path / "sus.safetensors")
    verdict = verify_whitebox(key=key, reference=blind, suspect=tmp_path / "sus.safetensors",
                              anchor=d / "anchor.safetensors")
    assert not verdict.detected and verdict.tests[0].matches < 28


def test_anchor_and_independent_decoders_are_not_detected(llama) -> None:
    key, _, base, d = llama
    assert not check(key, d, base.state_dict(), "anchor").detected
    other = train(TinyLlama(200), text_task(200), steps=40, seed=3, lr=1e-3)
    for name, tensors in (("indep", other.state_dict()), ("indep-signed", rewritten(other, seed=8))):
        verdict = check(key, d, tensors, name)
        assert not verdict.detected and verdict.tests[0].log10_p > -3, name


def test_null_is_calibrated_over_independent_decoders(llama) -> None:
    """Random decoders of the same shape, half of them signed-rewritten: p-values no smaller than a calibrated
    test allows, and none near detection."""
    key, _, _, d = llama
    n = 24
    log10_ps = []
    for i in range(n):
        model = TinyLlama(300 + i)
        tensors = rewritten(model, seed=i) if i % 2 else model.state_dict()
        log10_ps.append(check(key, d, tensors, "null").tests[0].details["log10_p_uncorrected"])
    p = 10 ** np.asarray(log10_ps)
    for t in (0.05, 0.25, 0.5):
        assert np.sum(p <= t) <= stats.binom.ppf(0.999, n, t), (t, np.sum(p <= t))
    assert min(log10_ps) > -3


def test_layouts_the_decoder_rules_do_not_describe_are_refused() -> None:
    missing = TinyLlama(0)
    missing.model.layers[0].mlp.up_proj = nn.Identity()  # type: ignore[assignment]
    with pytest.raises(UsageError, match=r"has no parameter 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        read_graph(missing)
    layernorm = TinyLlama(0)
    layernorm.model.norm = nn.LayerNorm(64)  # type: ignore[assignment]
    with pytest.raises(UsageError, match=r"model\.norm is not a bias-free RMSNorm"):
        read_graph(layernorm)
    extra = TinyLlama(0)
    extra.model.layers[1].self_attn.q_norm = nn.LayerNorm(16, bias=False)  # type: ignore[assignment]
    with pytest.raises(UsageError, match=r"'model\.layers\.1\.self_attn\.q_norm\.weight' is not one the decoder"):
        read_graph(extra)
    with pytest.raises(UsageError, match="sign flips of space 'mlp1'.* show only in"):
        WeightsEmbedder(tiny_key(32, seed=1), TinyLlama(0), layer="model.layers.1.mlp.up_proj")
    with pytest.raises(UsageError, match="norm-gain signs of the writers of space 'mlp1'.* show only in"):
        WeightsEmbedder(tiny_key(32, seed=1), TinyLlama(0), layer="model.layers.1.mlp.gate_proj")
