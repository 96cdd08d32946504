"""The alignment plan of a marked layer, and the binormalised statistic its mark lives in.

The *plan* of a marked layer is what verification aligns: the marked layer's input space, the writers
of that space, the writers of their input spaces, and so on back to spaces that are fixed (image channels,
the vocabulary). :func:`plan` builds it from a graph (:class:`~wmark.whitebox.spaces.Graph`), refusing a layer
whose inputs, or the signs of a space it depends on, cannot be read; :func:`plan_metadata` records it in the
marked model's metadata so the verifier needs no model code; :func:`default_marked` picks the layer to mark.
:func:`binormalize` scales a weight so that every row and every unit's column block has the same norm, which
makes the marked statistic (:func:`binorm_vector`) blind to positive per-row and per-unit rescaling.

These work on a graph however it was read (:mod:`wmark.whitebox.graph`, :mod:`wmark.whitebox.bert`,
:mod:`wmark.whitebox.decoder`), so they live apart from the readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from wmark.errors import UsageError
from wmark.whitebox.spaces import FIXED, NEGATABLE, SIGNED, Graph, Layer

BINORM_ITERS = 20
_TINY = 1e-20


def plan(graph: Graph, marked: str) -> list[Layer]:
    """The layers verification aligns for ``marked`` (marked last): writers of every space it depends on.

    A marked layer whose rows flip with a signed or negatable output space (a down-projection writing an
    RMSNorm or LayerNorm hidden stream) also depends on that space: its statistic, a mean over rows, is read
    with the rows un-flipped. Every such space needs a writer other than the marked layer whose rows carry
    its signs, or, where a norm owns every writer's row signs (a linear-bottleneck stream), a reader other
    than the marked layer, one whose rows never flip if the marked layer's own rows do not absorb the
    stream's overall sign. A signed or negatable space's writers reading a norm gain need one among them
    whose rows never flip, to read the gain's signs; a free space's are matched on sign-blind magnitudes.

    Raises:
        UsageError: If the marked layer's inputs cannot be aligned (opaque, or written by nothing that
            can be aligned), or the signs of a space it depends on cannot be read.
    """
    target = graph.layer(marked)
    first = graph.spaces[target.inp]
    if first.kind == "opaque":
        raise UsageError(f"{marked} reads the output of {first.why or 'an op'} that wmark cannot align through; "
                         "mark a layer fed only by conv/linear layers, normalisation, activations, pooling and "
                         "residual adds.")
    needed: list[str] = []
    todo = [target.inp]
    if graph.spaces[target.out].kind in (SIGNED, NEGATABLE) and target.signs:
        todo.append(target.out)
    while todo:
        s = todo.pop()
        if s in needed or graph.spaces[s].kind == FIXED:
            continue
        needed.append(s)
        writers = [w for w in graph.writers(s) if w.name != marked and graph.spaces[w.inp].kind != "opaque"]
        if not writers:
            raise UsageError(f"Space {s!r} feeding {marked} is written by no layer wmark can align (only through "
                             "opaque ops or the marked layer itself); mark another layer.")
        if graph.spaces[s].kind in (SIGNED, NEGATABLE) and not any(w.signs for w in writers):
            raise UsageError(f"The sign flips of space {s!r}, which {marked} depends on, show only in {marked} "
                             "itself; mark another layer.")
        # A free space's writers reading a gain no row-fixed writer resolves are matched blind to its signs.
        gained = {w.gain for w in writers if w.gain} if graph.spaces[s].kind in (SIGNED, NEGATABLE) else set()
        if any(all(w.signs for w in writers if w.gain == g) for g in gained):
            raise UsageError(f"The norm-gain signs of the writers of space {s!r}, which {marked} depends on, show "
                             f"only in {marked} itself; mark another layer.")
        todo.extend(w.inp for w in writers)
    chosen = [lay for lay in graph.layers if lay.out in needed and lay.name != marked
              and graph.spaces[lay.inp].kind != "opaque"]
    for s in needed:
        if graph.spaces[s].kind != SIGNED or any(w.signs and not w.own for w in chosen if w.out == s):
            continue
        # Its writers' rows are each a norm's own: its signs show only in its readers' columns.
        readers = [lay for lay in chosen if lay.inp == s and not lay.gain]
        if not readers:
            raise UsageError(f"The sign flips of space {s!r}, which {marked} depends on, show only in {marked} "
                             "itself; mark another layer.")
        if (target.inp == s or (target.out == s and target.signs)) and not target.own \
                and all(lay.own or graph.spaces[lay.out].kind in (SIGNED, NEGATABLE) for lay in readers):
            raise UsageError(f"The overall sign of space {s!r}'s flips shows in no layer wmark aligns but {marked}; "
                             "mark another layer.")
    if target.gain and not any(lay.gain == target.gain and not lay.signs for lay in chosen):
        raise UsageError(f"The signs {marked} reads through {target.gain} show in no other layer wmark aligns; mark "
                         "another layer.")
    return [*chosen, target]


def plan_metadata(graph: Graph, layers: Sequence[Layer]) -> dict[str, Any]:
    """The plan as JSON for the marked model's metadata."""
    spaces = {s for lay in layers for s in (lay.inp, lay.out)}
    return {
        "family": graph.family,
        "form": "binorm",
        "iters": BINORM_ITERS,
        "spaces": {s: {"size": graph.spaces[s].size, "kind": graph.spaces[s].kind} for s in sorted(spaces)},
        "layers": [{"name": lay.name, "shape": list(lay.shape), "in": lay.inp, "out": lay.out,
                    "transpose": lay.transpose, "signs": lay.signs, "gain": lay.gain, "own": lay.own}
                   for lay in layers],
    }


def default_marked(graph: Graph, *, bits: int) -> str:
    """The largest weight (ties: the latest) whose inputs can be aligned and hold ``2·bits`` columns per row.

    The last layer (the head) is never chosen.

    Raises:
        UsageError: If no layer qualifies.
    """
    best: tuple[int, int, str] | None = None
    for i, lay in enumerate(graph.layers[:-1]):
        if lay.transpose or lay.columns < 2 * bits:
            continue
        try:
            plan(graph, lay.name)
        except UsageError:
            continue
        cand = (lay.rows * lay.columns, i, lay.name)
        best = cand if best is None or cand > best else best
    if best is None:
        raise UsageError(f"No layer of this model both has {2 * bits} inputs per neuron and inputs wmark can align; "
                         "use a key with fewer weights bits or a wider model.")
    return best[2]


def binormalize(weight: torch.Tensor, units: int, *, iters: int = BINORM_ITERS) -> torch.Tensor:
    """``(out, units, rest)`` view of a weight scaled so that every row and every unit's column block has the
    same norm (Sinkhorn on squared block norms).

    Positive per-row and per-unit rescaling (BatchNorm folded in, norm gains absorbed, int8 scales, ReLU
    rescaling) leaves the result unchanged once the iteration has converged; permuting units permutes it.
    """
    v = weight.reshape(weight.shape[0], units, -1)
    a = v.pow(2).sum(2)
    rows, cols = a.shape
    c = torch.ones(cols, dtype=a.dtype, device=a.device)
    r = torch.ones(rows, dtype=a.dtype, device=a.device)
    for _ in range(iters):
        r = 1.0 / (a @ c).clamp_min(_TINY)
        c = (rows / cols) / (a.T @ r).clamp_min(_TINY)
    return v * r.sqrt()[:, None, None] * c.sqrt()[None, :, None]


def binorm_vector(weight: torch.Tensor, units: int, *, iters: int = BINORM_ITERS) -> torch.Tensor:
    """The marked statistic: the mean binormalised row, ``(units·rest,)`` (invariant to permuting rows)."""
    return binormalize(weight, units, iters=iters).mean(dim=0).flatten()
