"""White-box verification of a mark recorded with a graph plan (residual CNNs, BERT encoders, Llama decoders).

The marked model's ``wmark.weights.graph`` metadata (:func:`wmark.whitebox.plan.plan_metadata`) lists the
layers to align: writers of the marked layer's input space, writers of *their* input spaces, back to
fixed spaces (image channels, the vocabulary). The suspect's tensors are found by shape (names may be
scrambled), then each space's permutation is recovered by optimal assignment on the binormalised rows of
its writers (every writer of a space, summed: a residual stream is matched across all the blocks that
write it at once), after their own inputs have been put in the reference order. Binormalisation
(:func:`~wmark.whitebox.plan.binormalize`) makes the comparison blind to positive per-row and per-input
rescaling, so BatchNorm folded into a conv, norm gains absorbed into the next layer or int8 row scales do
not disturb it.

A *signed* space (an RMSNorm decoder's hidden stream or SwiGLU neurons, :mod:`wmark.whitebox.decoder`)
may also have its units' signs flipped. Its assignment maximises ``|Σ s| + Σ g``, with ``s`` the summed
similarity of the writers whose rows carry the signs and ``g`` that of the others (a SwiGLU gate), and each
unit's sign is the sign of its matched ``s``. The signs are applied with the permutation wherever the
space is read (input columns) and, when the marked layer's rows carry them, to its rows before the mean
the mark is read from. A *negatable* space (a BERT encoder's LayerNorm stream) may only be negated as a
whole: its assignment maximises ``Σ g ± Σ s`` for the better sign, which then applies to every unit. The
layers reading a signed space through a norm gain (a decoder's ``gate_proj`` and ``up_proj``) may carry
that gain's own signs on their columns; they are read from the writers whose rows never flip (the gate):
neurons matched on sign-blind magnitudes, each column's sign from the matched rows, matched again with
those signs, kept only if they fit the rows better than no extra signs; a writer of a free space reading a
gain that no such writer resolves (MobileNetV2's expansion after a linear projection) is matched on sign-blind
magnitudes. A signed space whose writers' row
signs are each a norm's own (MobileNetV2's linear-bottleneck stream) shows its signs only in the columns of
the layers reading it, whose rows may flip on their own: a rank-one sign fit of matched rows reads them.

Resolution goes in two passes: first each space from the writers whose inputs are already aligned
(the stem or the embeddings come first because their inputs are fixed), then every space again from all
of its writers, now that every input is aligned.

A writer whose row signs a norm right after it absorbs (a conv read only by a BatchNorm) is matched on
absolute similarity; the marked layer's own row signs are read against the anchor's unmarked copy of it
(:meth:`Aligner.own_row_signs`), and left unread without an anchor.

The null stays exact with an anchor: every similarity reads the suspect and the *anchor's* copies of the
plan's layers, never the reference's marked layer, so the permutation and signs applied to the suspect's
marked vector are a function of two key-independent files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError
from wmark.keys import Key
from wmark.schemes.weights import anchor_digest, payload_bits, projection, scheme_params
from wmark.stats import binomial_log10_sf
from wmark.verify import Verdict, decide
from wmark.whitebox.plan import BINORM_ITERS, binorm_vector, binormalize
from wmark.whitebox.spaces import FIXED, NEGATABLE, SIGNED, Layer
from wmark.whitebox.verify import anchor_refusal, match_neurons, read_bits, weights_test_result

Loader = Callable[[str], torch.Tensor]


def plan_layers(info: dict[str, Any]) -> tuple[list[Layer], dict[str, dict[str, Any]], int]:
    """The recorded plan as layers (marked last), its spaces, and the binormalisation iterations.

    Raises:
        UsageError: If the metadata is not a plan.
    """
    graph = info.get("graph")
    try:
        layers = [Layer(d["name"], tuple(int(s) for s in d["shape"]), d["in"], d["out"], bool(d["transpose"]),
                        signs=bool(d.get("signs", True)), gain=d.get("gain") or None, own=str(d.get("own") or ""))
                  for d in graph["layers"]]  # type: ignore[index]
        spaces = {k: dict(v) for k, v in graph["spaces"].items()}  # type: ignore[index]
        iters = int(graph.get("iters", BINORM_ITERS))  # type: ignore[union-attr]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UsageError("The reference's wmark.weights.graph metadata is malformed; pass the model written by "
                         "`wmark embed`.") from None
    if not layers or any(s.get("kind") not in (FIXED, "free", NEGATABLE, SIGNED) for s in spaces.values()) \
            or any(lay.own not in ("", "rows", "whole") for lay in layers):
        raise UsageError("The reference's weight plan is empty or names a space that cannot be aligned; pass the "
                         "model written by `wmark embed`.")
    return layers, spaces, iters


def view2d(tensor: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The tensor as ``(rows, columns)`` in float32: an embedding table transposed, a conv flattened."""
    t = tensor.to(torch.float32)
    return t.T.contiguous() if layer.transpose else t.reshape(t.shape[0], -1)


def marked_vector(tensor: torch.Tensor, layer: Layer, units: int, *, iters: int = BINORM_ITERS) -> torch.Tensor:
    """The statistic the projection reads from the marked layer, in the tensor's own unit order."""
    return binorm_vector(view2d(tensor, layer), units, iters=iters)


def _signature(w: torch.Tensor, units: int, perm: torch.Tensor | None, sign: torch.Tensor | None,
               iters: int) -> torch.Tensor:
    b = binormalize(w, units, iters=iters)
    if perm is not None:
        b = b[:, perm, :]
    if sign is not None:
        b = b * sign[None, :, None]
    flat = b.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _magnitude_signature(w: torch.Tensor, units: int, perm: torch.Tensor | None, iters: int) -> torch.Tensor:
    """Centred magnitudes of the binormalised rows: blind to every sign of rows and columns."""
    b = binormalize(w, units, iters=iters)
    if perm is not None:
        b = b[:, perm, :]
    flat = b.abs().flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Aligner:
    """Recovers the suspect's permutation of every space of a plan (see the module docstring).

    Args:
        layers: The plan (marked layer last; it is never read).
        spaces: Space sizes and kinds.
        source: Loads the anchor's (or reference's) tensor of a plan layer by its name.
        suspect_shapes: Every suspect tensor's shape.
        suspect: Loads a suspect tensor by name.
        iters: Binormalisation iterations.
        anchor_marked: The unmarked anchor's copy of the marked layer, which the row signs the marked layer owns
            are read against (see :meth:`own_row_signs`); None (no anchor) leaves them unread. Never the
            reference's: its rows carry the mark.
    """

    def __init__(self, *, layers: Sequence[Layer], spaces: dict[str, dict[str, Any]], source: Loader,
                 suspect_shapes: dict[str, tuple[int, ...]], suspect: Loader, iters: int = BINORM_ITERS,
                 anchor_marked: torch.Tensor | None = None) -> None:
        self.writers = list(layers[:-1])
        self.marked = layers[-1]
        self.spaces = spaces
        self.source = source
        self.shapes = suspect_shapes
        self.suspect = suspect
        self.iters = iters
        self.anchor_marked = anchor_marked
        self.perms: dict[str, torch.Tensor | None] = {s: None for s, v in spaces.items() if v["kind"] == FIXED}
        # Per reference unit of a signed space: ±1, the sign of the suspect unit matched to it.
        self.signs: dict[str, torch.Tensor] = {}
        # Per norm gain: ±1 per reference unit, the extra sign its readers' columns carry.
        self.gain_signs: dict[str, torch.Tensor] = {}
        self.chosen: dict[str, str] = {}
        self.quality: dict[str, float] = {}
        self._cache: dict[str, torch.Tensor] = {}

    def _units(self, layer: Layer) -> int:
        return int(self.spaces[layer.inp]["size"])

    def _load(self, name: str, loader: Loader, layer: Layer, key: str) -> torch.Tensor:
        # One suspect tensor may be a candidate for an embedding (read transposed) and for a linear layer of the
        # same raw shape (a 64-position table and a 64-neuron MLP): each view is cached on its own.
        key = f"{key}:{'T' if layer.transpose else 'N'}"
        if key not in self._cache:
            self._cache[key] = view2d(loader(name), layer)
        return self._cache[key]

    def _similarity(self, layer: Layer, sus_name: str) -> torch.Tensor:
        units = self._units(layer)
        ref = self._load(layer.name, self.source, layer, f"ref:{layer.name}")
        sus = self._load(sus_name, self.suspect, layer, f"sus:{sus_name}")
        return _signature(ref, units, None, None, self.iters) @ _signature(
            sus, units, self.perms[layer.inp], self._column_signs(layer), self.iters).T

    def _column_signs(self, layer: Layer) -> torch.Tensor | None:
        sign = self.signs.get(layer.inp)
        extra = self.gain_signs.get(layer.gain) if layer.gain else None
        if extra is None or sign is None:
            return sign if extra is None else extra
        return sign * extra

    def _magnitude_similarity(self, layer: Layer, sus_name: str) -> torch.Tensor:
        units = self._units(layer)
        ref = self._load(layer.name, self.source, layer, f"ref:{layer.name}")
        sus = self._load(sus_name, self.suspect, layer, f"sus:{sus_name}")
        return _magnitude_signature(ref, units, None, self.iters) @ _magnitude_signature(
            sus, units, self.perms[layer.inp], self.iters).T

    def _signed(self, space: str) -> bool:
        return self.spaces[space]["kind"] == SIGNED

    def _read_from_readers(self, space: str) -> bool:
        """Whether a signed space's signs show in no writer's rows (a norm owns each), only in its readers' columns."""
        return self._signed(space) and not any(w.out == space and w.signs and not w.own for w in self.writers)

    def _flips(self, space: str) -> bool:
        """Whether the space's units may change sign (each, or all together)."""
        return self.spaces[space]["kind"] in (SIGNED, NEGATABLE)

    def _choose(self, layer: Layer) -> str:
        """The unused suspect tensor of the layer's shape whose rows best match the source's, one by one."""
        if layer.name in self.chosen:
            return self.chosen[layer.name]
        taken = set(self.chosen.values())
        options = sorted(n for n, s in self.shapes.items() if s == layer.shape and n not in taken)
        if not options:
            raise UsageError(f"The suspect has no tensor of shape {layer.shape} for {layer.name}, which the alignment "
                             "needs; white-box verification cannot apply, try black-box verification.")
        if len(options) == 1:
            pick = options[0]
        elif layer.gain or self._read_from_readers(layer.inp):
            # Its columns may carry a norm gain's or its input's signs, not known yet: choose on sign-blind magnitudes.
            pick = max(options, key=lambda n: float(self._magnitude_similarity(layer, n).amax(dim=1).mean()))
        else:
            signed = self._flips(layer.out) or bool(layer.own)
            pick = max(options, key=lambda n: float(
                (self._similarity(layer, n).abs() if signed else self._similarity(layer, n)).amax(dim=1).mean()))
        self.chosen[layer.name] = pick
        return pick

    def _fixed_row_agreement(self, fixed: Sequence[Layer], order: torch.Tensor) -> torch.Tensor:
        """Per input unit: summed product of matched rows of writers whose rows never flip (without gain signs)."""
        agree: torch.Tensor | None = None
        for layer in fixed:
            units = self._units(layer)
            ref = binormalize(self._load(layer.name, self.source, layer, f"ref:{layer.name}"), units, iters=self.iters)
            sus_name = self._choose(layer)
            sus = binormalize(self._load(sus_name, self.suspect, layer, f"sus:{sus_name}"), units, iters=self.iters)
            perm, sign = self.perms[layer.inp], self.signs.get(layer.inp)
            sus = sus[order] if perm is None else sus[order][:, perm, :]
            if sign is not None:
                sus = sus * sign[None, :, None]
            part = (ref * sus).sum(dim=(0, 2))
            agree = part if agree is None else agree + part
        assert agree is not None
        return agree

    def _resolve_gain(self, gain: str, writers: Sequence[Layer]) -> None:
        """The extra column signs of the writers reading ``gain``, from those whose rows never flip.

        Their neurons are first matched on sign-blind magnitudes, each column's sign is read from the matched
        rows, the neurons are matched again with those signs and the signs read again. The result is kept
        only if it matches the rows better than no extra signs (an unflipped gain).
        """
        fixed = [w for w in writers if w.gain == gain and not w.signs]
        group = [w for w in writers if w.gain == gain]

        def fit(order: torch.Tensor) -> tuple[torch.Tensor, float]:
            agree = self._fixed_row_agreement(fixed, order)
            return torch.where(agree < 0, -1.0, 1.0), float(agree.abs().sum())

        magnitude = sum(self._magnitude_similarity(w, self._choose(w)) for w in group)
        assert isinstance(magnitude, torch.Tensor)
        estimate, _ = fit(torch.from_numpy(match_neurons(magnitude.numpy())))
        candidates = []
        for extra in (estimate, None):
            self.gain_signs.pop(gain, None)
            if extra is not None:
                self.gain_signs[gain] = extra
            sim = sum(self._similarity(w, self._choose(w)) for w in fixed)
            assert isinstance(sim, torch.Tensor)
            order = torch.from_numpy(match_neurons(sim.numpy()))
            signs, score = fit(order)
            candidates.append((score, signs))
        self.gain_signs[gain] = max(candidates, key=lambda c: c[0])[1]

    def _resolve(self, space: str, writers: Sequence[Layer]) -> None:
        for gain in dict.fromkeys(w.gain for w in writers if w.gain):
            if any(w.gain == gain and not w.signs for w in writers):
                self._resolve_gain(gain, writers)
        total: torch.Tensor | None = None
        carried: torch.Tensor | None = None
        for layer in writers:
            if layer.gain and layer.gain not in self.gain_signs:
                # Its columns carry a gain's signs no writer resolves (only in a free space: the plan refuses the
                # rest), so it is matched blind to every sign, its rows' included.
                sim = self._magnitude_similarity(layer, self._choose(layer))
                total = sim if total is None else total + sim
                continue
            sim = self._similarity(layer, self._choose(layer))
            if layer.own:
                # Signs that a norm right after the layer absorbs show in no other tensor: match blind to them.
                sim = sim.abs() if layer.own == "rows" else sim * _better_sign(sim)
                total = sim if total is None else total + sim
            elif self._flips(space) and layer.signs:
                carried = sim if carried is None else carried + sim
            else:
                total = sim if total is None else total + sim
        whole: float | None = None
        if carried is not None and self.spaces[space]["kind"] == NEGATABLE:
            # One sign for every unit (the stream negated as a whole): keep the better of the two assignments.
            whole = max((1.0, -1.0), key=lambda s: _assigned(carried * s if total is None else total + carried * s))
            total = carried * whole if total is None else total + carried * whole
        elif carried is not None:
            total = carried.abs() if total is None else total + carried.abs()
        assert total is not None
        sim_np = total.numpy() / len(writers)
        order = match_neurons(sim_np)
        self.quality[space] = float(sim_np[np.arange(len(order)), order].mean())
        self.perms[space] = torch.from_numpy(order)
        if whole is not None:
            self.signs[space] = torch.full((len(order),), whole)
        elif carried is not None:
            matched = carried[torch.arange(len(order)), self.perms[space]]
            self.signs[space] = torch.where(matched < 0, -1.0, 1.0)
        elif self._read_from_readers(space):
            self._resolve_reader_signs(space)

    def _reader_products(self, space: str, readers: Sequence[Layer], free: Sequence[bool]) -> torch.Tensor:
        """``(Σ reader rows, units)``: per anchor row of each reader and unit of ``space``, the product of the
        anchor's binormalised column with the matched suspect row's (unflipped, in the anchor's unit order).

        Rows are matched on sign-blind magnitudes while ``space`` has no signs yet, else on the similarity with
        its signs (absolute where the row's own sign is free).
        """
        parts = []
        for layer, loose in zip(readers, free):
            name = self._choose(layer)
            if space in self.signs:
                sim = self._similarity(layer, name)
                sim = sim.abs() if loose else sim
            else:
                sim = self._magnitude_similarity(layer, name)
            order = torch.from_numpy(match_neurons(sim.numpy()))
            units = self._units(layer)
            ref = binormalize(self._load(layer.name, self.source, layer, f"ref:{layer.name}"), units, iters=self.iters)
            sus = binormalize(self._load(name, self.suspect, layer, f"sus:{name}"), units, iters=self.iters)
            perm = self.perms[space]
            parts.append((ref * (sus if perm is None else sus[:, perm, :])[order]).sum(dim=2))
        return torch.cat(parts)

    def _resolve_reader_signs(self, space: str) -> None:
        """The signs of a signed space whose writers' rows a norm owns (MobileNetV2's linear-bottleneck stream),
        read from the columns of the plan layers reading it.

        A reader's matched rows satisfy ``suspect[r, c] ≈ s_r·t_c·anchor[r, c]``, with ``t`` the space's signs and
        ``s_r`` the row's own (free where a norm owns it or its output space flips, else +1): a rank-one sign fit
        of the products reads ``t``. Rows are matched first on sign-blind magnitudes, then again with ``t``,
        which is read again; kept only if it fits the rows better than no signs. Where no row is fixed, ``t`` and
        ``−t`` fit alike and the one flipping fewer units is taken (a reader whose rows flip on their own absorbs
        the difference; :func:`wmark.whitebox.plan.plan` refuses a marked layer that would not).
        """
        # A reader through a norm gain shows the gain's signs on top: they are read from it afterwards.
        readers = [w for w in self.writers if w.inp == space and not w.gain]
        if not readers:
            return
        loose = [bool(w.own) or self._flips(w.out) for w in readers]
        free = torch.cat([torch.full((w.rows,), f) for w, f in zip(readers, loose)])
        self.signs.pop(space, None)
        estimate, _ = _sign_fit(self._reader_products(space, readers, loose), free)
        candidates = []
        for signs in (estimate, torch.ones_like(estimate)):
            self.signs[space] = signs
            products = self._reader_products(space, readers, loose)
            fit = _sign_fit(products, free) if signs is estimate else (signs, _fit_score(products, free, signs))
            candidates.append((fit[1], fit[0]))
        self.signs[space] = max(candidates, key=lambda c: c[0])[1]

    def run(self) -> None:
        """Resolve every space of the plan (two passes; see the module docstring).

        Raises:
            UsageError: If a space cannot be reached from a fixed one.
        """
        pending = list(dict.fromkeys(w.out for w in self.writers if w.out not in self.perms))
        order: list[str] = []
        while pending:
            ready = [s for s in pending if any(w.out == s and w.inp in self.perms for w in self.writers)]
            if not ready:
                raise UsageError(f"The plan's space {pending[0]!r} cannot be reached from the model's inputs; the "
                                 "reference's weight graph cannot be aligned.")
            for s in ready:
                self._resolve(s, [w for w in self.writers if w.out == s and w.inp in self.perms])
                order.append(s)
                pending.remove(s)
        for s in order:
            self._resolve(s, [w for w in self.writers if w.out == s])

    def candidates(self) -> list[str]:
        """Suspect tensors that may be the marked layer: its shape, not taken by an aligned layer."""
        taken = set(self.chosen.values())
        return sorted(n for n, s in self.shapes.items() if s == self.marked.shape and n not in taken)

    def vector(self, name: str) -> torch.Tensor:
        """The suspect tensor's marked statistic with its inputs in the source's unit order and signs.

        Raises:
            UsageError: If the marked rows follow a signed space whose signs the plan did not resolve.
        """
        units = self._units(self.marked)
        rows = self.own_row_signs(name) if self.marked.own else self._row_signs()
        if rows is None:
            v = marked_vector(self.suspect(name), self.marked, units, iters=self.iters).reshape(units, -1)
        else:
            b = binormalize(view2d(self.suspect(name), self.marked), units, iters=self.iters)
            v = (b * rows[:, None, None]).mean(dim=0)
        perm = self.perms.get(self.marked.inp)
        v = v if perm is None else v[perm]
        sign = self._column_signs(self.marked)
        return (v if sign is None else v * sign[:, None]).flatten()

    def own_row_signs(self, name: str) -> torch.Tensor | None:
        """±1 per row of suspect tensor ``name``: the signs the marked layer's rows own, None without an anchor.

        A norm right after the marked layer absorbs its rows' signs (BatchNorm: ``BN(−z) = BN(z)`` once γ and
        the running mean are negated; a layer scale), so nothing else in the graph shows them, yet the mark is
        a mean over rows. Each suspect row is matched to a row of the anchor's unmarked copy of the layer on
        absolute similarity (inputs aligned) and takes the sign of that similarity; for ``whole``, one sign,
        the better of the two assignments. The decision reads the suspect and the anchor only, never the key,
        the payload or the reference, so for a suspect that never saw the key the aligned vector stays
        independent of the key and the null stays exact. (The reference's rows would pull any suspect's
        signs toward its mark.)
        """
        if self.anchor_marked is None:
            return None
        units = self._units(self.marked)
        anchor = _signature(view2d(self.anchor_marked, self.marked), units, None, None, self.iters)
        sus = _signature(view2d(self.suspect(name), self.marked), units, self.perms.get(self.marked.inp),
                         self._column_signs(self.marked), self.iters)
        sim = anchor @ sus.T
        if self.marked.own == "whole":
            return torch.full((sim.shape[1],), _better_sign(sim))
        order = torch.from_numpy(match_neurons(sim.abs().numpy()))
        rows = torch.empty(sim.shape[1])
        rows[order] = torch.where(sim[torch.arange(len(order)), order] < 0, -1.0, 1.0)
        return rows

    def _row_signs(self) -> torch.Tensor | None:
        """±1 per suspect row of the marked layer when its rows flip with a signed space, else None."""
        out = self.marked.out
        if not (self.marked.signs and self._flips(out)):
            return None
        order, sign = self.perms.get(out), self.signs.get(out)
        if order is None or sign is None:
            raise UsageError(f"The reference's plan does not resolve the signs of {out!r}, which the marked layer's "
                             "rows follow; pass the model written by `wmark embed`.")
        rows = torch.empty_like(sign)
        rows[order] = sign
        return rows


def _fit_score(products: torch.Tensor, free: torch.Tensor, signs: torch.Tensor) -> float:
    """``Σ_r s_r Σ_c t_c p[r, c]`` with each free row's ``s_r`` at its best and the others +1."""
    rows = products @ signs
    return float(torch.where(free, rows.abs(), rows).sum())


def _sign_fit(products: torch.Tensor, free: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Column signs ``t`` maximising :func:`_fit_score`: alternating maximisation over row and column signs,
    started from the fixed rows' column sums or, with none, the leading singular vector."""
    fixed = ~free
    start = products[fixed].sum(dim=0) if fixed.any() else torch.linalg.svd(products, full_matrices=False)[2][0]
    signs = torch.where(start < 0, -1.0, 1.0)
    for _ in range(100):
        rows = torch.where(free & (products @ signs < 0), -1.0, 1.0)
        new = torch.where(rows @ products < 0, -1.0, 1.0)
        if torch.equal(new, signs):
            break
        signs = new
    if not fixed.any() and signs.sum() < 0:
        signs = -signs
    return signs, _fit_score(products, free, signs)


def _assigned(sim: torch.Tensor) -> float:
    """The total similarity of the optimal assignment."""
    order = match_neurons(sim.numpy())
    return float(sim.numpy()[np.arange(len(order)), order].sum())


def _better_sign(sim: torch.Tensor) -> float:
    """The sign (±1) of ``sim`` whose optimal assignment has the larger total similarity."""
    return 1.0 if _assigned(sim) >= _assigned(-sim) else -1.0



def verify_graph(*, key: Key, info: dict[str, Any], ref: Any, sus: Any, anc: Any | None, alpha: float,
                 suspect_label: str) -> Verdict:
    """The white-box test for a graph plan; ``ref``/``sus``/``anc`` are opened safetensors files.

    Raises:
        UsageError: On a reference that does not carry the key's mark, an anchor that is not its base, or a
            suspect without the tensors the plan needs.
    """
    layers, spaces, iters = plan_layers(info)
    missing = [lay.name for lay in layers if ref.shapes.get(lay.name) != lay.shape]
    if missing:
        raise UsageError(f"The reference {ref.path} lacks {missing[0]!r} with its recorded shape; pass the "
                         "unmodified marked model.")
    bits = int(scheme_params(key)["bits"])
    marked = layers[-1]
    units = int(spaces[marked.inp]["size"])
    ref_vec = marked_vector(ref.load(marked.name), marked, units, iters=iters)
    x = projection(key, ref_vec.numel())
    expected = payload_bits(key)
    ref_errors = int(np.sum(read_bits(x, ref_vec) != expected))
    if ref_errors > bits // 4:
        raise UsageError(f"The reference reads {ref_errors} of {bits} bits wrong, so it does not carry this key's "
                         "weight watermark; check the key and the reference.")
    source = ref
    anchor_marked: torch.Tensor | None = None
    if anc is not None:
        bad = [lay.name for lay in layers[:-1] if anc.shapes.get(lay.name) != lay.shape]
        if bad:
            raise UsageError(f"The anchor {anc.path} lacks {bad[0]!r} with the reference's shape; pass the base "
                             "model the reference was fine-tuned from.")
        recorded = info.get("anchor_digest")
        if recorded and anchor_digest({lay.name: anc.load(lay.name) for lay in layers[:-1]}) != recorded:
            raise anchor_refusal(anc, [lay.name for lay in layers[:-1]])
        source = anc
        if marked.own and anc.shapes.get(marked.name) == marked.shape:
            anchor_marked = anc.load(marked.name)
            recorded_marked = info.get("anchor_marked_digest")
            if recorded_marked and anchor_digest({marked.name: anchor_marked}) != recorded_marked:
                raise anchor_refusal(anc, [marked.name])
            # an embedding older than that digest: at least refuse an anchor that carries the mark outright
            hits = int(np.sum(read_bits(x, marked_vector(anchor_marked, marked, units, iters=iters)) == expected))
            if binomial_log10_sf(hits, bits, 0.5) <= math.log10(alpha):
                raise UsageError(f"The anchor {anc.path} reads {hits} of {bits} bits of this key's mark in "
                                 f"{marked.name}, so it is not the unmarked base; pass the model the reference was "
                                 "fine-tuned from.")
    # Only suspect tensors of the plan's shapes that read as weights (an extra one of another dtype or holding
    # NaN is no candidate).
    usable: dict[str, tuple[int, ...]] = {}
    for shape in {lay.shape for lay in layers}:
        usable.update(dict.fromkeys(sus.usable(sorted(n for n, s in sus.shapes.items() if s == shape)), shape))
    aligner = Aligner(layers=layers, spaces=spaces, source=source.load, suspect_shapes=usable,
                      suspect=sus.load, iters=iters, anchor_marked=anchor_marked)
    aligner.run()
    candidates = aligner.candidates()
    if not candidates:
        raise UsageError(f"The suspect {sus.path} has no free tensor of shape {marked.shape} (the marked layer's), "
                         "so white-box verification cannot apply; try black-box verification.")
    best: tuple[int, str, np.ndarray] | None = None
    for name in candidates:
        got = read_bits(x, aligner.vector(name))
        matches = int(np.sum(got == expected))
        if best is None or matches > best[0]:
            best = (matches, name, got)
    assert best is not None
    matches, found, got = best
    test = weights_test_result(
        key=key, matches=matches, bits=bits, candidates=len(candidates), got=got, exact=anc is not None,
        details={"form": "graph", "family": info.get("graph", {}).get("family"), "layer_found": found,
                 "reference_layer": marked.name, "layers_found": dict(aligner.chosen),
                 "alignment_similarity": {s: round(v, 4) for s, v in aligner.quality.items()},
                 "anchor_recorded": bool(info.get("anchor_digest")), "reference_bit_errors": ref_errors,
                 **({"own_row_signs": "read against the anchor" if anchor_marked is not None else
                     "not read (no anchor with the marked layer)"} if marked.own else {})})
    return decide(key=key, tests=[test], alpha=alpha, suspect=suspect_label)
