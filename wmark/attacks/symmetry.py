"""Function-preserving rewrites of residual CNNs and transformers (BERT, Llama), read from the real graph.

What a thief can do to a stolen model's weights without changing one prediction:

* :func:`permute_spaces` — permute every space of the graph (:mod:`wmark.whitebox.graph`): channels inside
  each residual block, the residual stream's channels together across every block and downsample conv
  that writes it (BatchNorm statistics and parameters, depthwise conv filters, LayerNorm / GroupNorm
  parameters and layer scales follow), a transformer's hidden dimension across embeddings, every
  Q/K/V/up-projection input and output/down-projection output and every LayerNorm, and its MLP neurons;
  with ``signs=True`` also a random sign flip of every unit of a *signed* space (an RMSNorm decoder's
  hidden stream, SwiGLU neurons through ``up`` rows and ``down`` columns, a MobileNetV2 linear-bottleneck
  stream through its writers' rows and BatchNorms), the negation of every
  *negatable* one (a BERT encoder's LayerNorm stream, its norms' biases negated too) and the sign flips a
  norm absorbs (conv rows with their BatchNorm's γ and running mean, ConvNeXt's rows with their layer scale);
* :func:`flip_gain_signs` — flip signs of each RMSNorm gain and of the columns reading it (per norm);
* :func:`fold_batchnorm` — fold each BatchNorm into the conv before it (``w·γ/σ``, shifted bias);
* :func:`permute_heads` — permute the attention heads of every layer of a BERT-style encoder;
  :func:`permute_decoder_heads` the same for a Llama-style decoder (whole heads, so RoPE is unaffected;
  grouped key/value heads move with their query groups);
* :func:`fuse_qkv` / :func:`split_qkv` — one fused QKV tensor per layer, under new names, and back;
* :func:`absorb_final_norm` — the last LayerNorm's gain and bias absorbed into the linear layer(s) that
  read it (in a post-LN encoder only the last norm feeds nothing but linear readers); in a pre-norm
  decoder every RMSNorm gain can be absorbed so;
* :func:`lora_merge` — a LoRA fine-tune (low-rank adapters trained by the caller) merged into the weights.

All but the last keep the function exactly (up to float rounding); tests check outputs to 1e-4.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from wmark.errors import UsageError
from wmark.whitebox.graph import read_graph
from wmark.whitebox.spaces import NEGATABLE, SIGNED, Graph


@torch.no_grad()
def permute_spaces(tensors: Mapping[str, torch.Tensor], *, graph: Graph, seed: int = 0,
                   spaces: Sequence[str] | None = None,
                   extra_readers: Mapping[str, Sequence[str]] | None = None,
                   signs: bool = False) -> dict[str, torch.Tensor]:
    """Permute the units of spaces (default: every free space that some layer reads), keeping the function.

    Args:
        tensors: The model's state dict.
        graph: Its graph (:func:`wmark.whitebox.graph.read_graph`).
        seed: Seed of the permutations.
        spaces: Names of the spaces to permute.
        extra_readers: Space name → weights that read it but that the graph could not place (e.g. a
            classifier on mean-pooled hidden states of a BERT-style encoder): their columns are permuted too.
        signs: Also flip the sign of a random half of the units of every signed space: the rows of its
            writers that carry signs (not a SwiGLU gate's) and their biases, and the columns of its readers.
            Its per-unit parameters (RMSNorm gains) are only permuted: a sign passes through a gain; those a
            flip negates (:attr:`wmark.whitebox.spaces.Space.negated`: the biases and running means of the
            BatchNorms on a linear-bottleneck stream) are negated with their units. Negate
            every negatable space whole the same way, with its LayerNorms' biases (``LN(−x) = −LN(x)`` then).
            And flip the signs a layer owns (:attr:`wmark.whitebox.spaces.Layer.own`): a random half of the rows
            (and biases) of each layer followed by a BatchNorm, with the norm's γ and running mean, or by a layer
            scale, with the scale; every row of one followed by a LayerNorm or GroupNorm(1, C), with its gain.

    Raises:
        UsageError: If a named space is fixed or opaque, or a tensor is missing.
    """
    names = list(spaces) if spaces is not None else free_spaces(graph)
    out = {n: t.clone() for n, t in tensors.items()}
    rng = np.random.default_rng(seed)
    for s in names:
        space = graph.spaces.get(s)
        if space is None or space.kind not in ("free", NEGATABLE, SIGNED):
            raise UsageError(f"Space {s!r} is not a permutable space of this graph.")
        perm = torch.from_numpy(rng.permutation(space.size))
        flip = torch.ones(space.size)
        if signs and space.kind == SIGNED:
            flip = torch.from_numpy(rng.choice([-1.0, 1.0], size=space.size)).float()
        elif signs and space.kind == NEGATABLE:
            flip = -flip
        for lay in graph.layers:
            if lay.out == s:
                row = flip if lay.signs else torch.ones(space.size)
                w = _need(out, lay.name)
                out[lay.name] = (w[:, perm] * row.to(w)) if lay.transpose else _scale_rows(w[perm], row)
                if lay.bias:
                    out[lay.bias] = out[lay.bias][perm] * row.to(out[lay.bias])
            if lay.inp == s:
                out[lay.name] = _permute_columns(_need(out, lay.name), perm, flip)
        for p in space.params:
            out[p] = _need(out, p)[perm]
            if (space.kind == NEGATABLE and p.endswith(".bias")) or p in space.negated:
                out[p] = _scale_rows(out[p], flip)
        for name in (extra_readers or {}).get(s, ()):
            out[name] = _permute_columns(_need(out, name), perm, flip)
    for lay in graph.layers if signs else ():
        if lay.own:
            own = torch.from_numpy(rng.choice([-1.0, 1.0], size=lay.rows)).float() if lay.own == "rows" \
                else -torch.ones(lay.rows)
            out[lay.name] = _scale_rows(_need(out, lay.name), own)
            for name in (lay.bias, *lay.absorbers) if lay.bias else lay.absorbers:
                out[name] = _scale_rows(_need(out, name), own)
    return out


@torch.no_grad()
def flip_gain_signs(tensors: Mapping[str, torch.Tensor], *, graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flip the sign of a random half of every norm gain's entries and of the columns that read them.

    A norm gain multiplies each unit elementwise, so negating entry ``j`` of the gain (and of a LayerNorm's,
    GroupNorm's or BatchNorm's bias) and column ``j`` of every layer reading the norm's output keeps the
    function; each norm gets its own flips, independent of the hidden stream's. The gains are those the graph
    records for its layers (Llama-style decoders; a ConvNeXt block's LayerNorm read by its MLP; a BatchNorm or
    a layer scale read by a conv/linear layer with no activation between).

    Raises:
        UsageError: If the graph records no gains, or a tensor is missing.
    """
    gains = list(dict.fromkeys(lay.gain for lay in graph.layers if lay.gain))
    if not gains:
        raise UsageError("The graph records no norm gains read by its layers; pass a Llama-style decoder's graph.")
    out = {n: t.clone() for n, t in tensors.items()}
    rng = np.random.default_rng(seed)
    for gain in gains:
        flip = torch.from_numpy(rng.choice([-1.0, 1.0], size=int(_need(out, gain).shape[0]))).float()
        out[gain] = _scale_rows(out[gain], flip)
        bias = gain.removesuffix("weight") + "bias"
        if gain.endswith(".weight") and bias in out:
            out[bias] = _scale_rows(out[bias], flip)
        for lay in graph.layers:
            if lay.gain == gain:
                out[lay.name] = _permute_columns(_need(out, lay.name), torch.arange(len(flip)), flip)
    return out


def _scale_rows(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w * scale.to(w).view(-1, *[1] * (w.dim() - 1))


def _need(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise UsageError(f"The state dict has no tensor {name!r}; pass the state dict of the model the graph was "
                         "read from.")
    return tensors[name]


def _permute_columns(w: torch.Tensor, perm: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    units = len(perm)
    v = w.reshape(w.shape[0], units, -1)[:, perm, :]
    if flip is not None:
        v = v * flip.to(w)[None, :, None]
    return v.reshape(w.shape).contiguous()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm that follows a conv folded into it.

    The conv's weight becomes ``w·γ/σ`` (σ from the running variance), its bias ``(b − μ)·γ/σ + β``, and the
    BatchNorm becomes an identity.

    Raises:
        UsageError: If the model has no BatchNorm, the graph cannot be traced, a BatchNorm follows something
            other than a conv, or one keeps no running statistics.
    """
    # a model without one (a BERT-style encoder: read by rules, not by torch.fx) failed in fx's tracer, or
    # came back unchanged
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
        raise UsageError("The model has no BatchNorm layer to fold; fold the BatchNorms of a model that has them.")
    read_graph(model)
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    pairs: list[tuple[str, str]] = []
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
            src = node.args[0]
            ok = (isinstance(src, torch.fx.Node) and src.op == "call_module"
                  and isinstance(modules[src.target], (nn.Conv1d, nn.Conv2d, nn.Linear)) and len(src.users) == 1)
            if not ok:
                raise UsageError(f"BatchNorm {node.target} does not directly follow a conv used only by it; it cannot "
                                 "be folded.")
            if modules[node.target].running_var is None:
                raise UsageError(f"BatchNorm {node.target} keeps no running statistics (it normalises every batch by "
                                 "its own), so it cannot be folded into a conv.")
            pairs.append((str(src.target), str(node.target)))
    attacked = copy.deepcopy(model).eval()
    for conv_name, bn_name in pairs:
        conv, bn = attacked.get_submodule(conv_name), attacked.get_submodule(bn_name)
        assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.running_var is not None
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Linear)) and bn.running_mean is not None
        with torch.no_grad():
            # affine=False: no γ, β (1 and 0)
            scale = torch.rsqrt(bn.running_var + bn.eps) * (1.0 if bn.weight is None else bn.weight)
            old = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            shift = (old - bn.running_mean) * scale
            conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(shift if bn.bias is None else shift + bn.bias)
        _set(attacked, bn_name, nn.Identity())
    return attacked


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _layer_bases(tensors: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    bases = sorted({n[: n.index("attention.self.")] for n in tensors
                    if n.startswith(f"{prefix}encoder.layer.") and "attention.self." in n})
    if not bases:
        raise UsageError(f"No BERT-style encoder layers under {prefix!r}encoder.layer.*; pass the model's prefix.")
    return bases


@torch.no_grad()
def permute_heads(tensors: Mapping[str, torch.Tensor], *, num_heads: int, prefix: str = "",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Permute the attention heads of every encoder layer (Q/K/V row blocks and output columns together)."""
    out = {n: t.clone() for n, t in tensors.items()}
    rng = np.random.default_rng(seed)
    for base in _layer_bases(tensors, prefix):
        o = f"{base}attention.output.dense.weight"
        hidden = int(_need(out, o).shape[1])
        if hidden % num_heads:
            raise UsageError(f"{hidden} hidden units do not split into {num_heads} heads; pass the model's head count.")
        size = hidden // num_heads
        idx = torch.from_numpy(rng.permutation(num_heads))
        units = (idx[:, None] * size + torch.arange(size)[None, :]).flatten()
        for part in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                name = f"{base}attention.self.{part}.{kind}"
                if name in out:
                    out[name] = out[name][units]
        out[o] = out[o][:, units]
    return out


@torch.no_grad()
def permute_decoder_heads(tensors: Mapping[str, torch.Tensor], *, num_heads: int,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Permute the attention heads of every layer of a Llama-style decoder, keeping the function.

    Whole heads move (``q/k/v_proj`` row blocks, ``o_proj`` column blocks), so the rotary embedding, which
    rotates the same pairs of rows in every head, is unaffected. With grouped key/value heads the
    key/value heads are permuted and each query group follows its key/value head, its own heads shuffled.

    Raises:
        UsageError: If the state dict has no ``self_attn.q_proj`` weights or the head count does not divide them.
    """
    out = {n: t.clone() for n, t in tensors.items()}
    bases = sorted(n[: -len("q_proj.weight")] for n in tensors if n.endswith("self_attn.q_proj.weight"))
    if not bases:
        raise UsageError("The state dict has no self_attn.q_proj weights; pass a Llama-style decoder's state dict.")
    rng = np.random.default_rng(seed)
    for base in bases:
        rows, kv_rows = int(out[f"{base}q_proj.weight"].shape[0]), int(_need(out, f"{base}k_proj.weight").shape[0])
        size = rows // num_heads
        if rows % num_heads or kv_rows % size or num_heads % (kv_rows // size):
            raise UsageError(f"{rows} query rows and {kv_rows} key rows do not split into {num_heads} heads; pass "
                             "the model's head count.")
        kv_heads = kv_rows // size
        group = num_heads // kv_heads
        kv_order = rng.permutation(kv_heads)
        q_order = np.concatenate([k * group + rng.permutation(group) for k in kv_order])
        for part, order in (("q", q_order), ("k", kv_order), ("v", kv_order)):
            for kind in ("weight", "bias"):
                name = f"{base}{part}_proj.{kind}"
                if name in out:
                    out[name] = out[name][_head_units(order, size)]
        o = f"{base}o_proj.weight"
        out[o] = _need(out, o)[:, _head_units(q_order, size)]
    return out


def _head_units(order: np.ndarray, size: int) -> torch.Tensor:
    """Row indices of whole heads of ``size`` rows, in ``order``."""
    idx = torch.from_numpy(order)
    return (idx[:, None] * size + torch.arange(size)[None, :]).flatten()


def fuse_qkv(tensors: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Replace each layer's query/key/value tensors by one ``attention.self.qkv`` tensor (rows Q, K, V)."""
    out = dict(tensors)
    for base in _layer_bases(tensors, prefix):
        for kind in ("weight", "bias"):
            names = [f"{base}attention.self.{p}.{kind}" for p in ("query", "key", "value")]
            if all(n in out for n in names):
                out[f"{base}attention.self.qkv.{kind}"] = torch.cat([out.pop(n) for n in names])
    return out


def split_qkv(tensors: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Undo :func:`fuse_qkv`: three equal row blocks back into query, key and value."""
    out = dict(tensors)
    for name in [n for n in tensors if n.startswith(prefix) and ".attention.self.qkv." in n]:
        base, _, kind = name.rpartition(".qkv.")
        for part, chunk in zip(("query", "key", "value"), out.pop(name).chunk(3)):
            out[f"{base}.{part}.{kind}"] = chunk.clone()
    return out


@torch.no_grad()
def absorb_final_norm(tensors: Mapping[str, torch.Tensor], *, norm: str,
                      readers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Absorb a norm's gain (and a LayerNorm's bias) into the linear layers that read its output (gain 1, bias 0
    after).

    Exact when the norm's output reaches ``readers`` only through linear ops (e.g. mean pooling) — in a
    post-LN encoder, the last layer's output norm; in a pre-norm decoder, every RMSNorm (it has no bias).
    """
    g, b = _need(tensors, f"{norm}.weight"), tensors.get(f"{norm}.bias")
    out = {n: t.clone() for n, t in tensors.items()}
    for r in readers:
        w = _need(out, f"{r}.weight")
        if b is not None:
            bias = out.get(f"{r}.bias")
            out[f"{r}.bias"] = (bias if bias is not None else torch.zeros_like(w[:, 0])) + w @ b
        out[f"{r}.weight"] = w * g[None, :]
    out[f"{norm}.weight"] = torch.ones_like(g)
    if b is not None:
        out[f"{norm}.bias"] = torch.zeros_like(b)
    return out


class LoRALinear(nn.Module):
    """``base(x) + scale · B A x`` with the base frozen; ``B`` starts at zero so training starts at the base."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        # drawn on the CPU (the generator's device), then placed with the base layer
        a = torch.randn(rank, base.in_features, generator=generator) / base.in_features ** 0.5
        self.a = nn.Parameter(a.to(base.weight))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight.add_((self.b @ self.a) * self.scale)
        return self.base


def lora_merge(model: nn.Module, *, train: Callable[[nn.Module], None], rank: int = 8, alpha: float = 16.0,
               targets: Callable[[str, nn.Linear], bool] | None = None, trainable: Sequence[str] = (),
               seed: int = 0) -> nn.Module:
    """A copy of ``model`` fine-tuned through LoRA adapters, which are then merged into its weights.

    Args:
        model: The stolen model.
        train: Trains the wrapped copy in place (only adapter parameters and ``trainable`` ones require grad).
        rank: Adapter rank.
        alpha: LoRA scaling numerator (the update is ``alpha / rank · B A``).
        targets: Which ``nn.Linear`` layers get an adapter (default: all but the last one, the head).
        trainable: Names of parameters trained in full alongside the adapters (e.g. the head).
        seed: Seed of the adapters' initialisation.
    """
    if rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {rank}.")
    attacked = copy.deepcopy(model)
    linears = [(n, m) for n, m in attacked.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n, m in linears if (targets(n, m) if targets else n != linears[-1][0])]
    if not chosen:
        raise UsageError("No linear layer was chosen for LoRA adapters.")
    for name, p in attacked.named_parameters():
        p.requires_grad_(name in trainable)
    gen = torch.Generator().manual_seed(seed)
    for name in chosen:
        base = attacked.get_submodule(name)
        assert isinstance(base, nn.Linear)
        _set(attacked, name, LoRALinear(base, rank=rank, alpha=alpha, generator=gen))
    train(attacked)
    for name in chosen:
        wrapped = attacked.get_submodule(name)
        assert isinstance(wrapped, LoRALinear)
        _set(attacked, name, wrapped.merged())
    for p in attacked.parameters():
        p.requires_grad_(True)
    return attacked


def free_spaces(graph: Graph) -> list[str]:
    """Spaces a thief may permute: free and read by some layer (outputs of the model are not)."""
    readers = {lay.inp for lay in graph.layers}
    return [s for s, sp in graph.spaces.items() if sp.kind in ("free", NEGATABLE, SIGNED) and s in readers]
