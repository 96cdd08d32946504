"""Weight watermark (Uchida et al. 2017 style): a T-bit payload in a secret projection of one layer.

What is marked: the *mean canonical row* ``v`` of one conv/linear layer (see :mod:`wmark.whitebox.chain`:
rows normalised after undoing every earlier layer's rescaling), as the unit vector ``u = v / ||v||``. The
key derives a projection ``X`` (T×M, i.i.d. N(0, 1)), a payload and the order in which payload bits sit on
the projection's rows. Bit ``j`` reads ``1[X_j·u ≥ 0]``.

How it is embedded: a hinge regularizer ``strength · mean_j relu(margin − s_j X_j·u)`` with
``s_j = ±1`` the wanted bit. Unlike Uchida's cross-entropy it stops pushing once every bit sits ``margin``
null standard deviations on the right side, so Adam does not keep inflating the same weights (the spiky
weight histograms that give Uchida-style marks away, Cortiñas-Lorenzo & Pérez-González 2020) and the
accuracy cost stays small. The gradient is added by an optimizer *step pre-hook*, so it works in any loop
that calls ``optimizer.step()`` (plain PyTorch, HF Trainer, Lightning, DDP: after the all-reduce every rank
holds the same weights and adds the same gradient).

Why the null is exact: for a model that never saw the key, ``u`` is a fixed unit vector independent of
``X``, so the ``X_j·u`` are independent N(0, 1) and each bit matches the key's bit with probability
exactly ½, whatever the payload: matches ~ Binomial(T, ½).

Payload: T key-derived bits, or an owner message (UTF-8) repeated to fill T bits (a repetition code:
each message bit is decoded by majority vote) and XOR-ed with a key-derived pad, so the payload bits are
still uniform and the null is unchanged. The message is a public key parameter, covered by the key's
commitment; a key made with a message gets enough bits for at least three copies (``params_for_message``).

Example:
    >>> import torch
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME")
    >>> model = torch.nn.Sequential(torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> emb = WeightsEmbedder(key, model)
    >>> emb.chain
    ['0.weight']
    >>> handle = opt.register_step_pre_hook(emb.hook)
    >>> handle.remove()
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from wmark.errors import UsageError
from wmark.io import tensors_digest
from wmark.keys import Key, default_schemes
from wmark.whitebox.chain import module_chain, watermark_vector
from wmark.whitebox.graph import read_graph
from wmark.whitebox.plan import binorm_vector, default_marked, plan, plan_metadata
from wmark.whitebox.spaces import Graph, Layer

SCHEME = "weights"


def scheme_params(key: Key) -> dict[str, Any]:
    """The key's public parameters of this scheme (the defaults for keys made before it existed)."""
    params = dict(default_schemes()[SCHEME])
    params.update(key.schemes.get(SCHEME, {}))
    bits = params.get("bits")
    if not isinstance(bits, int) or bits < 8:
        raise UsageError(f"The key's weights scheme asks for {bits!r} bits; use an integer of at least 8.")
    return params


def projection(key: Key, dim: int) -> torch.Tensor:
    """The secret T×dim projection, i.i.d. standard normal, derived from the key (float32)."""
    bits = scheme_params(key)["bits"]
    return torch.from_numpy(key.normal(f"weights/projection/{dim}", (bits, dim)).astype(np.float32))


def _pad(key: Key, bits: int) -> np.ndarray:
    raw = np.frombuffer(key.derive("weights/pad", (bits + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw)[:bits].astype(np.int64)


def _message_bits(message: str, bits: int) -> np.ndarray:
    data = np.unpackbits(np.frombuffer(message.encode("utf-8"), dtype=np.uint8)).astype(np.int64)
    if len(data) == 0 or 3 * len(data) > bits:
        raise UsageError(
            f"The message needs {len(data)} bits and the payload holds {bits}; a repetition code needs at least "
            "3 copies, so shorten the message or raise the key's weights bits."
        )
    return data


def params_for_message(message: str, *, bits: int = 256) -> dict[str, Any]:
    """Weights-scheme parameters for a key carrying ``message``: at least ``bits`` payload bits, more when
    the message needs them for three copies (rounded up to a multiple of 64).

    Raises:
        UsageError: If the message is empty.
    """
    if not message:
        raise UsageError("The owner message is empty; give some text such as 'ACME Corp 2026'.")
    needed = 3 * 8 * len(message.encode("utf-8"))
    total = max(int(bits), -(-needed // 64) * 64)
    _message_bits(message, total)
    return dict(default_schemes()[SCHEME], bits=total, message=message)


def payload_bits(key: Key) -> np.ndarray:
    """The bit each projection row must read (0/1), in row order."""
    params = scheme_params(key)
    bits = int(params["bits"])
    data = _pad(key, bits)
    message = params.get("message")
    if message:
        msg = _message_bits(str(message), bits)
        data = data ^ msg[np.arange(bits) % len(msg)]
    order = key.permutation("weights/bit-order", bits)
    rows = np.empty(bits, dtype=np.int64)
    rows[order] = data
    return rows


def decode_message(key: Key, row_bits: np.ndarray) -> str | None:
    """Majority-vote decoding of the owner message from extracted row bits (None if the key has none)."""
    message = scheme_params(key).get("message")
    if not message:
        return None
    bits = len(row_bits)
    order = key.permutation("weights/bit-order", bits)
    data = np.asarray(row_bits, dtype=np.int64)[order] ^ _pad(key, bits)
    length = len(_message_bits(str(message), bits))
    votes = np.zeros(length)
    counts = np.zeros(length)
    np.add.at(votes, np.arange(bits) % length, data)
    np.add.at(counts, np.arange(bits) % length, 1)
    decoded = (votes * 2 > counts).astype(np.uint8)
    return np.packbits(decoded).tobytes().decode("utf-8", errors="replace")


def anchor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of the chain's earlier layers (as float32) before marking, to recognise the anchor later."""
    return tensors_digest({n: t.detach().to("cpu", torch.float32) for n, t in tensors.items()})


def projection_scores(key: Key, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``X_j·u`` for every row j of the key's projection (N(0, 1) each for an unmarked model)."""
    v = watermark_vector([w.detach().float().cpu() for w in weights])
    x = projection(key, v.numel())
    return x @ (v / v.norm().clamp_min(1e-12))


def extract_bits(key: Key, weights: Sequence[torch.Tensor]) -> np.ndarray:
    """The bits a chain of weights (marked layer last) reads under the key."""
    return (projection_scores(key, weights) >= 0).to(torch.int64).numpy()


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def _graph_form(model: nn.Module, input_rank: int | None = None) -> Graph | None:
    """The model's graph when the mark needs the graph form (normalisation, depthwise convs, embeddings or
    residual adds), None for a plain conv/linear chain, which keeps the chain form (read by module order,
    checked here against the traced graph).

    Raises:
        UsageError: If the graph cannot be read.
    """
    graph = read_graph(model, input_rank=input_rank)
    joined = any(len(graph.writers(s)) > 1 for s in graph.spaces)
    # Per-channel parameters (a depthwise conv's filters) follow a space but are no link of a chain.
    per_channel = any(space.params for space in graph.spaces.values())
    if graph.family != "fx" or joined or per_channel or any(isinstance(m, _NORMS) for m in model.modules()):
        return graph
    return None


class WeightsEmbedder:
    """Embeds the key's payload into one layer of ``model`` through an optimizer step pre-hook.

    Plain conv/linear chains (the built-in models) carry the mark in the *chain form* of
    :mod:`wmark.whitebox.chain`. Models with normalisation, embeddings or residual adds (ResNets,
    BERT-style encoders, Llama-style decoders) carry it in the *graph form*: the mean binormalised row of
    the marked layer (:func:`wmark.whitebox.plan.binorm_vector`), with the alignment plan read from the real graph
    (:mod:`wmark.whitebox.graph`) recorded in the metadata.

    Args:
        key: The owner's key.
        model: The model being trained.
        layer: Name of the layer (or its weight) to mark; default the largest conv/linear weight before the
            head.
        margin: How many null standard deviations each projection must clear (default: the key's).
        strength: Regularizer weight (default: the key's).

    Raises:
        UsageError: If the model has no layer to mark or ``layer`` is not a conv/linear layer.
    """

    def __init__(self, key: Key, model: nn.Module, *, layer: str | None = None, margin: float | None = None,
                 strength: float | None = None) -> None:
        params = scheme_params(key)
        self.key = key
        self.bits = int(params["bits"])
        # a text key's input_shape is its token count, one axis as the model sees it (ids, not embeddings)
        self.graph = _graph_form(model, len(key.input_shape) + 1)
        self._plan: list[Layer] = []
        if self.graph is None:
            self.chain = module_chain(model, layer)
            _check_chain(model, self.chain)
        else:
            name = default_marked(self.graph, bits=self.bits) if layer is None else (
                layer if layer.endswith("weight") else f"{layer}.weight")
            self._plan = plan(self.graph, name)
            if self._plan[-1].transpose:
                raise UsageError(f"{name} is an embedding table; mark a conv/linear layer.")
            self.chain = [lay.name for lay in self._plan]
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.chain]
        self.margin = float(params["margin"] if margin is None else margin)
        self.strength = float(params["strength"] if strength is None else strength)
        if self.margin < 0 or self.strength <= 0:
            raise UsageError("The weights scheme needs margin >= 0 and strength > 0.")
        dim = self._params[-1][0].numel()
        if dim < 2 * self.bits:
            raise UsageError(
                f"Layer {self.layer} has {dim} inputs per neuron, too few for {self.bits} bits (need at least "
                f"{2 * self.bits}); mark a wider layer or use a key with fewer weights bits."
            )
        self._x = projection(key, dim)
        self._signs = torch.from_numpy(2.0 * payload_bits(key) - 1.0).float()
        # Taken before any key-driven step: these layers as they are now form a key-independent anchor.
        self.anchor_digest = anchor_digest({n: p.detach() for n, p in zip(self.chain[:-1], self._params[:-1])})
        # The marked layer before marking, apart: an anchor's copy of it is read only for the row signs a norm
        # absorbs, and only an unmarked copy keeps that reading independent of the key.
        self.anchor_marked_digest = anchor_digest({self.chain[-1]: self._params[-1].detach()})

    @property
    def layer(self) -> str:
        """Name of the marked weight."""
        return self.chain[-1]

    def loss(self, weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The (unscaled) hinge loss; differentiable in the marked weight, earlier layers held fixed."""
        ws = list(self._params) if weights is None else list(weights)
        ws = [w.detach() for w in ws[:-1]] + [ws[-1]]
        v = self._vector(ws)
        u = v / v.norm().clamp_min(1e-12)
        x = self._x.to(device=u.device, dtype=u.dtype)
        z = self._signs.to(device=u.device, dtype=u.dtype) * (x @ u)
        return torch.relu(self.margin - z).mean()

    def _vector(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.graph is None:
            return watermark_vector(weights)
        marked = weights[-1]
        units = self.graph.spaces[self._plan[-1].inp].size
        return binorm_vector(marked.reshape(marked.shape[0], -1).float(), units)

    def hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: add ``strength ×`` the regularizer's gradient to the marked weight."""
        weight = self._params[-1]
        with torch.enable_grad():
            leaf = weight.detach().float().requires_grad_(True)
            value = self.loss([*self._params[:-1], leaf])
            if value.item() == 0.0:
                return
            (grad,) = torch.autograd.grad(value * self.strength, leaf)
        grad = grad.to(weight.dtype)
        if weight.grad is None:
            weight.grad = grad
        else:
            weight.grad.add_(grad)

    def bit_errors(self) -> int:
        """How many payload bits the model currently reads wrong."""
        with torch.no_grad():
            if self.graph is None:
                got = extract_bits(self.key, [p.detach().cpu() for p in self._params])
            else:
                v = self._vector([p.detach().cpu() for p in self._params])
                got = ((projection(self.key, v.numel()) @ (v / v.norm().clamp_min(1e-12))) >= 0).long().numpy()
        return int(np.sum(got != payload_bits(self.key)))

    def metadata(self) -> dict[str, Any]:
        """Public facts for the model file: which layers, their shapes, the scheme parameters."""
        return {
            "version": int(scheme_params(self.key)["version"]),
            "layer": self.layer,
            "shape": list(self._params[-1].shape),
            "chain": list(self.chain),
            "chain_shapes": [list(p.shape) for p in self._params],
            "bits": self.bits,
            "margin": self.margin,
            "strength": self.strength,
            "statistic": "mean canonical row, unit-normalised, signs of a key-derived Gaussian projection",
            "bit_errors_at_save": self.bit_errors(),
            "anchor_digest": self.anchor_digest,
            "anchor_marked_digest": self.anchor_marked_digest,
            **({"graph": plan_metadata(self.graph, self._plan)} if self.graph is not None else {}),
        }


def _check_chain(model: nn.Module, chain: Sequence[str]) -> None:
    """Refuse a chain-form chain whose layers do not feed each other in the traced graph."""
    graph = read_graph(model)
    for prev, nxt in itertools.pairwise(chain):
        if graph.layer(nxt).inp != graph.layer(prev).out:
            raise UsageError(f"{nxt} does not read {prev}'s outputs in the model's graph; mark a layer of a plain "
                             "conv/linear chain.")

