"""Explicit graph rules for Llama-style decoders (Llama, Mistral, Qwen2 parameter names, RMSNorm, SwiGLU).

Hugging Face decoders cannot be traced, so their spaces are read from parameter names, as for BERT in
:mod:`wmark.whitebox.bert`. The layout the rules describe (``P`` the prefix, ``model.`` in a
``LlamaForSequenceClassification``, empty in a ``LlamaModel``):

* ``P.embed_tokens`` (its columns), every ``self_attn.o_proj`` and ``mlp.down_proj`` (rows) write one
  *hidden* space, which every ``q/k/v_proj``, ``gate_proj``, ``up_proj`` and the head (``score`` or
  ``lm_head``, after the final norm, tied to the embedding or not) read (columns); the gains of every
  ``input_layernorm``, ``post_attention_layernorm`` and ``P.norm`` are indexed by it, and each reader
  records the gain it reads through;
* one MLP space per layer: ``gate_proj`` and ``up_proj`` rows write it, ``down_proj`` columns read it;
* attention heads are opaque, as in BERT: heads permute, each head's factors admit invertible maps, and
  RoPE rotates pairs of query/key rows, so no row of Q/K/V/O is aligned on its own.

Why both spaces are *signed*: RMSNorm divides by the root mean square without subtracting the mean, so
``norm(x·P·S) = norm(x)·P·S`` for a permutation ``P`` and a ±1 diagonal ``S`` once the gains are permuted
(a sign passes through an elementwise gain). A thief may therefore move and flip every hidden unit, if
every writer's rows and every reader's columns follow. In the SwiGLU MLP ``down(silu(gate·x) ⊙ up·x)`` a
neuron flips when its ``up`` row and ``down`` column flip together; its ``gate`` row cannot (SiLU is not
odd), so gate layers are marked as writers whose rows do not carry the signs.

A gain adds signs of its own: negating entry ``j`` of one norm's gain and column ``j`` of the layers
reading that norm keeps the function too, independently for every norm. The aligner reads those signs
from the readers whose rows never flip, the gates (:class:`wmark.whitebox.align.Aligner`).

Any parameter outside this layout (a norm with a bias or one that subtracts the mean, per-head norms, a
head the rules cannot place) is refused rather than guessed.
"""

from __future__ import annotations

import re

from torch import nn

from wmark.errors import UsageError
from wmark.whitebox.spaces import FIXED, SIGNED, Graph, _assemble, _Spaces

_DECODER_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.mlp\.gate_proj$")
_HEADS = ("score", "lm_head")


def decoder_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(prefix, index)`` of each decoder layer of a Llama-style model (empty: not one)."""
    found = []
    for name, _ in model.named_modules():
        m = _DECODER_LAYER.match(name)
        if m:
            found.append((m.group(1), m.group(2)))
    if not found:
        return []
    names = {n for n, _ in model.named_modules()}
    if len({p for p, _ in found}) != 1 or f"{found[0][0]}embed_tokens" not in names:
        return []
    return found


def read_decoder(model: nn.Module) -> Graph:
    """The spaces and layers of a Llama-style decoder (module docstring).

    Raises:
        UsageError: If a parameter the rules need is missing, a norm is not a bias-free RMSNorm, or a
            parameter is not one the rules place.
    """
    blocks = decoder_layers(model)
    prefix = blocks[0][0]
    # Duplicates kept: a head tied to the embedding is still a reader of the hidden stream.
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    sp = _Spaces()
    embed = f"{prefix}embed_tokens.weight"
    stream = sp.new("hidden", int(params[embed].shape[1]), SIGNED)
    layers: list[tuple[str, str, str, str | None]] = [(embed, sp.new("tokens", 0, FIXED), stream, None)]
    unsigned: set[str] = set()
    gains: dict[str, str] = {}
    placed = {embed}

    def need(name: str) -> str:
        if name not in params:
            raise UsageError(f"The Llama-style model has no parameter {name!r}; its layout is not one wmark can "
                             "align (expected Hugging Face LlamaModel parameter names).")
        placed.add(name)
        return name

    def linear(name: str, inp: str, out: str) -> str:
        w = need(f"{name}.weight")
        bias = f"{name}.bias" if f"{name}.bias" in params else None
        if bias:
            placed.add(bias)
        layers.append((w, inp, out, bias))
        return w

    def norm(name: str) -> str:
        module = modules.get(name)
        if module is None or not type(module).__name__.endswith("RMSNorm") or getattr(module, "bias", None) is not None:
            raise UsageError(f"{name} is not a bias-free RMSNorm, so the hidden units of this decoder may not flip "
                             "sign; wmark reads only Llama-style decoders normalised by RMSNorm.")
        sp.info[stream].params.append(need(f"{name}.weight"))
        return f"{name}.weight"

    for _, i in blocks:
        base = f"{prefix}layers.{i}."
        width = int(params[need(f"{base}self_attn.o_proj.weight")].shape[1])
        heads_qk = sp.new(f"heads{i}.qk", width, "opaque", why="attention heads")
        heads_v = sp.new(f"heads{i}.v", width, "opaque", why="attention heads")
        gain = norm(f"{base}input_layernorm")
        for part, space in (("q", heads_qk), ("k", heads_qk), ("v", heads_v)):
            gains[linear(f"{base}self_attn.{part}_proj", stream, space)] = gain
        linear(f"{base}self_attn.o_proj", heads_v, stream)
        gain = norm(f"{base}post_attention_layernorm")
        mlp = sp.new(f"mlp{i}", int(params[need(f"{base}mlp.up_proj.weight")].shape[0]), SIGNED)
        gate, up = linear(f"{base}mlp.gate_proj", stream, mlp), linear(f"{base}mlp.up_proj", stream, mlp)
        unsigned.add(gate)
        gains[gate] = gains[up] = gain
        linear(f"{base}mlp.down_proj", mlp, stream)
    gain = norm(f"{prefix}norm")
    for name, p in params.items():
        module = name.removesuffix(".weight")
        if name not in placed and name.endswith(".weight") and p.dim() == 2 and module.rsplit(".", 1)[-1] in _HEADS \
                and not name.startswith(f"{prefix}layers."):
            gains[linear(module, stream, sp.new(name, int(p.shape[0])))] = gain
    stray = [n for n in params if n not in placed]
    if stray:
        raise UsageError(f"The Llama-style model's parameter {stray[0]!r} is not one the decoder rules place (they "
                         "describe embed_tokens, q/k/v/o, gate/up/down, RMSNorm gains and a score or lm_head); "
                         "wmark cannot align this layout.")
    return _assemble(sp, layers, params, family="decoder", transposed=frozenset({embed}),
                     unsigned=frozenset(unsigned), gains=gains)
