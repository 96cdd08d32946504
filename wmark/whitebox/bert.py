"""Explicit graph rules for BERT-style encoders, whose Hugging Face ``forward`` cannot be traced.

Detected from the module tree (``embeddings.word_embeddings`` and ``encoder.layer.N`` with
``intermediate.dense`` / ``output.dense``): one hidden space shared by the word/position/token-type
embeddings (as writers: their columns are hidden units), every ``attention.output.dense`` and
``output.dense`` (rows) and every Q/K/V, ``intermediate.dense``, pooler and head input (columns), with every
LayerNorm in it, *negatable* (``LN(−x) = −LN(x)`` once the norm's bias is negated, so a thief may negate the
whole stream); one MLP space per layer (``intermediate.dense`` rows, ``output.dense`` columns). Attention
heads are opaque for alignment (heads permute and each head's factors admit invertible maps, not a
permutation). A layout the rules do not describe is refused.
"""

from __future__ import annotations

import re

from torch import nn

from wmark.errors import UsageError
from wmark.whitebox.spaces import FIXED, NEGATABLE, Graph, _assemble, _Spaces

_BERT_LAYER = re.compile(r"^(.*?)encoder\.layer\.(\d+)\.intermediate\.dense$")


def bert_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(prefix, index)`` of each encoder layer of a BERT-style model (empty: not one)."""
    found = []
    for name, _ in model.named_modules():
        m = _BERT_LAYER.match(name)
        if m:
            found.append((m.group(1), m.group(2)))
    if not found:
        return []
    prefixes = {p for p, _ in found}
    names = {n for n, _ in model.named_modules()}
    if len(prefixes) != 1 or f"{found[0][0]}embeddings.word_embeddings" not in names:
        return []
    return found


def read_bert(model: nn.Module) -> Graph:
    """Explicit rules for a BERT-style encoder (module docstring); refuses a layout they do not describe."""
    blocks = bert_layers(model)
    prefix = blocks[0][0]
    params = dict(model.named_parameters())
    sp = _Spaces()
    hidden = int(params[f"{prefix}embeddings.word_embeddings.weight"].shape[1])
    stream = sp.new("hidden", hidden, NEGATABLE)
    layers: list[tuple[str, str, str, str | None]] = []
    transposed = set()

    def need(name: str) -> str:
        if name not in params:
            raise UsageError(f"The BERT-style model has no parameter {name!r}; its layout is not one wmark can "
                             "align (expected Hugging Face BertModel parameter names).")
        return name

    def bias(name: str) -> str | None:
        b = name[: -len("weight")] + "bias"
        return b if b in params else None

    for part in ("word", "position", "token_type"):
        name = f"{prefix}embeddings.{part}_embeddings.weight"
        if name in params:
            layers.append((name, sp.new(f"{part}s", 0, FIXED), stream, None))
            transposed.add(name)
    norms = [f"{prefix}embeddings.LayerNorm"]
    for _, i in blocks:
        base = f"{prefix}encoder.layer.{i}."
        heads_qk = sp.new(f"heads{i}.qk", hidden, "opaque", why="attention heads")
        heads_v = sp.new(f"heads{i}.v", hidden, "opaque", why="attention heads")
        for qkv, space in (("query", heads_qk), ("key", heads_qk), ("value", heads_v)):
            w = need(f"{base}attention.self.{qkv}.weight")
            layers.append((w, stream, space, bias(w)))
        w = need(f"{base}attention.output.dense.weight")
        layers.append((w, heads_v, stream, bias(w)))
        mlp = sp.new(f"mlp{i}", int(params[need(f"{base}intermediate.dense.weight")].shape[0]))
        w = f"{base}intermediate.dense.weight"
        layers.append((w, stream, mlp, bias(w)))
        w = need(f"{base}output.dense.weight")
        layers.append((w, mlp, stream, bias(w)))
        norms += [f"{base}attention.output.LayerNorm", f"{base}output.LayerNorm"]
    for norm in norms:
        sp.info[stream].params += [need(f"{norm}.{p}") for p in ("weight", "bias")]
    for name, _, out, _ in layers:  # every layer so far reads or writes the hidden stream
        shape = params[name].shape
        if shape[0 if out == stream and name not in transposed else 1] != hidden:
            raise UsageError(f"{name} has shape {tuple(shape)} but the word embeddings give {hidden} hidden units, so "
                             "something the BERT rules do not place (an ELECTRA-style embedding projection) sits between "
                             "them; wmark cannot align this layout, use black-box verification.")
    embedding_names = {f"{prefix}embeddings.{p}_embeddings.weight" for p in ("word", "position", "token_type")}
    used = {name for name, *_ in layers}
    head_input = sp.new("head input", hidden, "opaque", why="a head the rules cannot place (pooled hidden states or "
                        "pooler output)")
    for name, p in params.items():
        # 2-D weights outside the encoder: the pooler reads the hidden space; a classifier may read pooled
        # hidden states or the pooler's output, which the rules do not guess.
        if name.endswith(".weight") and p.dim() == 2 and name not in used and name not in embedding_names \
                and not name.startswith(f"{prefix}encoder."):
            src = stream if name == f"{prefix}pooler.dense.weight" else head_input
            layers.append((name, src, sp.new(name, int(p.shape[0])), bias(name)))
    return _assemble(sp, layers, params, family="bert", transposed=frozenset(transposed))
