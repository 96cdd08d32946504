"""The data model of a network's weight graph: its spaces of units, its layers as maps between them, and the
union-find that joins spaces while a graph is read.

A :class:`Space` is a set of units that a thief may permute together (``fixed``, ``free``, ``negatable``,
``signed`` or ``opaque``); a :class:`Layer` is one weight tensor read as a map from one space to another; a
:class:`Graph` holds both, layers in forward order. Every reader builds one with :class:`_Spaces` and
:func:`_assemble`: the ``torch.fx`` reader (:mod:`wmark.whitebox.graph`) and the explicit rules of BERT-style
encoders (:mod:`wmark.whitebox.bert`) and Llama-style decoders (:mod:`wmark.whitebox.decoder`); the plan
(:mod:`wmark.whitebox.plan`), the alignment and the symmetry attacks read it. It lives apart from the readers
so that the rules depend on the data model, not on the ``torch.fx`` reader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wmark.errors import UsageError

FIXED = "fixed"
SIGNED = "signed"
NEGATABLE = "negatable"


@dataclass(frozen=True)
class Layer:
    """One weight tensor as a map from one space to another.

    Attributes:
        name: The weight's parameter name.
        shape: Its shape.
        inp: The space its columns read (``fixed``-kind spaces are never permuted).
        out: The space its rows write.
        transpose: True for an embedding table, whose *columns* are the units of ``out`` (rows: tokens).
        bias: The bias parameter (permuted with the rows), if any.
        signs: Whether its rows flip with the sign flips of a signed ``out`` space (False for a SwiGLU gate,
            whose output passes through the non-odd SiLU before the product that carries the sign, and for a
            reader of a norm gain that no norm after it owns: its rows show the gain's signs).
        gain: The per-unit gain (an RMSNorm weight, an affine LayerNorm's, GroupNorm's or BatchNorm's, a 1-D
            layer scale) its columns read ``inp`` through with no activation between, if any: a thief may flip
            the signs of that gain (and its bias) and of its readers' columns, on top of the space's own.
        own: Signs of its rows that the op right after it absorbs, so that no other tensor of the graph shows
            them: ``rows`` (each row on its own: a BatchNorm, whose γ and running mean flip with the row, or a
            per-unit gain such as a layer scale), ``whole`` (all rows together: a LayerNorm or GroupNorm(1, C),
            whose gain flips), or empty.
        absorbers: The per-unit tensors negated with those rows (the norm's γ and running mean, the gain).
    """

    name: str
    shape: tuple[int, ...]
    inp: str
    out: str
    transpose: bool = False
    bias: str | None = None
    signs: bool = True
    gain: str | None = None
    own: str = ""
    absorbers: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transpose else self.shape[0]

    @property
    def columns(self) -> int:
        if self.transpose:
            return self.shape[0]
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


@dataclass
class Space:
    """A set of units that permute together.

    Attributes:
        size: Number of units.
        kind: ``fixed`` (input channels, vocabulary: never permuted), ``free`` (permutable), ``negatable``
            (permutable and negated as a whole: a hidden stream normalised by LayerNorm), ``signed``
            (permutable with sign flips: a hidden stream normalised by RMSNorm, SwiGLU neurons) or ``opaque``.
        params: 1-D tensors indexed by the space's units (BatchNorm / LayerNorm gains, biases, statistics).
        why: For an opaque space, the op that made it so.
        negated: Those of ``params`` that a unit's sign flip negates (a BatchNorm's bias and running mean, a
            depthwise conv's bias) where the space is signed because every op on it is odd in each unit.
    """

    size: int
    kind: str = "free"
    params: list[str] = field(default_factory=list)
    why: str = ""
    negated: list[str] = field(default_factory=list)


@dataclass
class Graph:
    """Spaces and layers of a model, in forward order."""

    spaces: dict[str, Space]
    layers: list[Layer]
    family: str

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        if any(name in space.params for space in self.spaces.values()):
            raise UsageError(f"{name!r} is a per-channel parameter (a depthwise conv or a norm) that only follows its "
                             f"channels, so it cannot carry the mark; choose one of "
                             f"{', '.join(lay.name for lay in self.layers)}.")
        raise UsageError(f"{name!r} is not the weight of a conv/linear layer the graph reader found; choose one of "
                         f"{', '.join(lay.name for lay in self.layers)}.")

    def units(self, layer: Layer) -> tuple[int, int]:
        """``(units, rest)`` of the layer's input side."""
        size = self.spaces[layer.inp].size
        if layer.columns % size:
            raise UsageError(f"{layer.name} has {layer.columns} inputs, not a multiple of the {size} units feeding it; "
                             "the graph cannot be aligned.")
        return size, layer.columns // size

    def writers(self, space: str) -> list[Layer]:
        return [lay for lay in self.layers if lay.out == space]


class _Spaces:
    """Union-find over space names, with sizes, kinds and per-unit parameters."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.info: dict[str, Space] = {}

    def new(self, name: str, size: int, kind: str = "free", why: str = "") -> str:
        self.parent[name] = name
        self.info[name] = Space(size, kind, why=why)
        return name

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ia, ib = self.info[ra], self.info[rb]
        if ia.size and ib.size and ia.size != ib.size:
            raise UsageError(f"A residual add joins {ia.size} and {ib.size} channels; the graph cannot be aligned.")
        kinds = (ia.kind, ib.kind)
        # The most constrained kind wins: a joined space may flip signs only if every part may.
        kind = next(k for k in ("opaque", FIXED, "free", NEGATABLE, SIGNED) if k in kinds)
        self.parent[rb] = ra
        self.info[ra] = Space(ia.size or ib.size, kind, ia.params + ib.params, ia.why or ib.why,
                              ia.negated + ib.negated)
        return ra


def _assemble(sp: _Spaces, layers: Sequence[tuple[str, str, str, str | None]], params: dict[str, Any], *,
              family: str, transposed: frozenset[str] = frozenset(), unsigned: frozenset[str] = frozenset(),
              gains: Mapping[str, str] | None = None,
              owns: Mapping[str, tuple[str, tuple[str, ...]]] | None = None) -> Graph:
    out: list[Layer] = []
    for name, inp, outp, bias in layers:
        shape = tuple(int(d) for d in params[name].shape)
        own, absorbers = (owns or {}).get(name, ("", ()))
        out.append(Layer(name, shape, sp.find(inp), sp.find(outp), name in transposed, bias, name not in unsigned,
                         (gains or {}).get(name), own, absorbers))
    spaces: dict[str, Space] = {}
    for name in sp.parent:
        root = sp.find(name)
        spaces.setdefault(root, sp.info[root])
    for space in spaces.values():
        space.params = list(dict.fromkeys(space.params))  # a norm applied twice in one space permutes its gain once
    for layer in out:
        space = spaces[layer.inp]
        if space.kind == FIXED and not space.size:
            space.size = layer.columns if layer.transpose else layer.shape[1]
    return Graph(spaces, out, family)
