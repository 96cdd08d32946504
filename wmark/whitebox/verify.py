"""White-box verification: read a suspect's weights, undo what thieves do to them, test the key's bits.

The verifier needs the owner's key, the owner's marked model (the *reference*, whose ``wmark.weights``
metadata names the marked layer and the chain of layers feeding it) and the suspect's safetensors file.
It never needs the suspect's architecture code:

1. **Find the layers.** Every suspect tensor whose shape equals the marked layer's is a candidate (names
   may have been scrambled); each earlier layer of the chain is the same-shaped tensor that aligns best. An
   extra tensor of the same shape that does not read as finite weights (an int64 buffer, a NaN decoy) is
   skipped when another one does.
2. **Undo rescaling.** Both models are put in the canonical form of :mod:`wmark.whitebox.chain` (rows
   normalised after undoing earlier layers' scales), which positive per-neuron rescaling cannot change;
   int8 tensors without their scales are per-row rescalings too, so they read correctly.
3. **Undo permutations.** Layer by layer, the suspect's hidden neurons are matched to the reference's by
   ``scipy.optimize.linear_sum_assignment`` on the cosine similarity of their canonical *incoming*
   weights, and each layer's matching is propagated to the next layer's inputs (blocks of ``H·W`` columns
   after a flatten). The marked layer's own output order needs no alignment: the watermark reads the mean
   of its rows.
4. **Test.** Bits are the signs of the key's projection of the suspect's aligned mean canonical row;
   the statistic is the number of bits that match the key's payload, with an exact binomial tail in log
   space, Bonferroni-corrected for the number of candidate tensors tried.

The null after alignment
------------------------
Binomial(T, ½) is exact when the vector the projection reads is independent of the key: each bit is then
the sign of an independent N(0, 1). Alignment could break this, because the reference carries the
watermark: choosing among the n! permutations of a suspect's neurons the one that makes its marked layer
look most like the reference's marked layer would copy part of the watermark into any model. So the
alignment here is *blind to what the projection reads*: it matches neurons only on the weights of the
layers *before* the marked one (their incoming weights) and never looks at the marked layer, whose
rows' mean is the only thing the projection touches.

For an independent suspect the aligned vector is then a function of the suspect and of the reference's
earlier layers. Those layers were trained together with the marked one, so they are not independent of the
key in the strict sense. To remove even that coupling, pass the unmarked base model the reference was
fine-tuned from as ``anchor`` (recommended; ``wmark embed`` records a digest of its layers, so a wrong
anchor is refused): the permutation is then a function of two key-independent files, the projection is
independent of the aligned vector, and the null is exact by construction. Without an anchor the calibration
is measured in ``benchmarks/whitebox_null.py`` (600 (independent or same-base model, fresh key) pairs: for t
from 0.001 to 0.5 the fraction with p <= t is within binomial sampling error of t, never significantly above) and checked on a small panel in
``tests/test_whitebox.py``.

Speed: large layers are never put in canonical form explicitly; row norms, the similarity sketch and the
mean marked row are matrix products with the raw weights, and a permutation is applied to the sketch or the
mean row instead of the weight (25M parameters verify in about a second of CPU).

Example:
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME")
    >>> sorted(SUPPORTED_DTYPES)[:3]
    ['BF16', 'F16', 'F32']
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from scipy.optimize import linear_sum_assignment

from wmark.errors import RuntimeFailure, UsageError
from wmark.io import wmark_metadata
from wmark.keys import Key
from wmark.schemes.weights import anchor_digest, decode_message, payload_bits, projection, scheme_params
from wmark.signing import file_sha256
from wmark.stats import binomial_log10_sf
from wmark.verify import DEFAULT_ALPHA, TestResult, Verdict, decide
from wmark.whitebox.chain import layer_units

PathLike = str | os.PathLike[str]
SUPPORTED_DTYPES = {"F16", "BF16", "F32", "F64", "I8", "I16", "I32"}
SKETCH_DIM = 256
_TINY = 1e-12
_EXACT_LIMIT = 2e8
# Why the null is not exact by construction without an anchor, by the form of the mark (a chain, or a graph plan).
NOT_EXACT_WHY = {
    "chain": "the alignment reads only the reference's layers before the marked one (never the projected layer); they "
             "were trained alongside it, so exactness is checked empirically (benchmarks/whitebox_null.py); pass the "
             "unmarked base model as anchor for a null exact by construction",
    "graph": "the alignment reads the reference's layers other than the marked one; they were trained alongside it, "
             "so pass the unmarked base model as anchor for a null exact by construction",
}


@dataclass
class _File:
    """Lazy access to a safetensors file's tensors by name, with shapes and dtypes from its header."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    _readable: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def open(cls, path: PathLike, role: str) -> _File:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"The {role} file {p} does not exist.")
        try:
            with safe_open(str(p), "pt") as f:
                names = list(f.keys())
                shapes = {n: tuple(int(d) for d in f.get_slice(n).get_shape()) for n in names}
                dtypes = {n: str(f.get_slice(n).get_dtype()) for n in names}
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"The {role} {p} is not a readable safetensors file ({first}).") from None
        return cls(p, shapes, dtypes, metadata)

    def load(self, name: str) -> torch.Tensor:
        dtype = self.dtypes[name]
        if dtype not in SUPPORTED_DTYPES:
            raise UsageError(
                f"Tensor {name!r} in {self.path} has dtype {dtype}; store weights as float16, bfloat16, float32 or int8."
            )
        try:
            with safe_open(str(self.path), "pt") as f:
                tensor = f.get_tensor(name).to(torch.float32)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"Tensor {name!r} in {self.path} cannot be read ({exc}); the file is corrupt.") from None
        if not torch.isfinite(tensor).all():
            # a NaN row would read as no bits at all: "not detected" on a file that holds no model
            raise RuntimeFailure(f"Tensor {name!r} in {self.path} holds NaN or infinite values; white-box "
                                 "verification needs finite weights.")
        return tensor

    def usable(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` (same-shaped tensors) that read as finite weights, or all of them if none does: an
        extra tensor of another dtype or holding NaN is skipped, and a lone unreadable one still says why."""
        if len(names) < 2:
            return list(names)
        for name in names:
            if name not in self._readable:
                try:
                    self.load(name)
                    self._readable[name] = True
                except (UsageError, RuntimeFailure):
                    self._readable[name] = False
        return [n for n in names if self._readable[n]] or list(names)


def anchor_refusal(anc: _File, names: Sequence[str]) -> UsageError:
    """Why an anchor whose layers do not match the recorded digest is refused; a lower-precision copy of the
    right base cannot match (the digest is of the full-precision layers), and says so."""
    low = sorted({anc.dtypes[n] for n in names if anc.dtypes.get(n) not in ("F32", "F64")})
    why = (f"its layers are stored as {', '.join(low)} and the base's were recorded in full precision; pass the base "
           "as it was saved, or no anchor" if low else
           "its layers differ from those recorded at embedding; pass that base model, or no anchor")
    return UsageError(f"The anchor {anc.path} is not the model the reference was fine-tuned from ({why}).")


@dataclass
class _Layer:
    """One chain layer in canonical form, kept implicit: raw weight, input scales and row norms.

    The canonical rows are ``weight * scale / norms``; they are never materialised for a large layer,
    which saves two full copies of every big tensor (the sketch and the mean row are matrix products with
    the raw weight).
    """

    weight: torch.Tensor
    units: int
    rest: int
    scale: torch.Tensor | None
    norms: torch.Tensor

    @property
    def inverse_norms(self) -> torch.Tensor:
        return 1.0 / self.norms.clamp_min(_TINY)

    @property
    def column_scale(self) -> torch.Tensor | None:
        return None if self.scale is None else self.scale.repeat_interleave(self.rest)

    def dense(self) -> torch.Tensor:
        """The canonical rows, ``(out, units, rest)``."""
        cs = self.column_scale
        w = self.weight if cs is None else self.weight * cs
        return (w * self.inverse_norms[:, None]).reshape(-1, self.units, self.rest)

    def mean_row(self) -> torch.Tensor:
        """Mean canonical row, ``(units, rest)``: one matrix-vector product with the raw weight."""
        m = self.weight.T @ self.inverse_norms / self.weight.shape[0]
        cs = self.column_scale
        return (m if cs is None else m * cs).reshape(self.units, self.rest)


def _row_norms(weight: torch.Tensor, column_scale: torch.Tensor | None) -> torch.Tensor:
    if column_scale is None:
        norms = torch.linalg.vector_norm(weight, dim=1)
    else:
        # Row chunks bound the temporary copy of a large weight to 16 MB.
        step = max(1, (1 << 22) // max(1, weight.shape[1]))
        norms = torch.cat([torch.linalg.vector_norm(weight[i:i + step] * column_scale, dim=1)
                           for i in range(0, weight.shape[0], step)])
    return norms


def _layers(weights: Sequence[torch.Tensor], *, after: _Layer | None = None) -> list[_Layer]:
    """The chain's layers in implicit canonical form (same maths as :func:`canonical_layers`).

    Args:
        weights: The chain's weights (float32) in forward order.
        after: The layer feeding the first weight, if it is not the chain's first layer.
    """
    out: list[_Layer] = []
    scale = None if after is None else after.norms
    previous = None if after is None else (after.weight.shape[0], after.units)
    for w in weights:
        units, rest = layer_units(w.shape, previous)
        flat = w.reshape(w.shape[0], units * rest)
        layer = _Layer(flat, units, rest, scale, torch.empty(0))
        layer.norms = _row_norms(flat, layer.column_scale)
        out.append(layer)
        scale, previous = layer.norms, (int(w.shape[0]), int(w.shape[1]))
    return out


def _sketch_matrix(dim: int) -> torch.Tensor:
    # A public, key-independent Gaussian sketch keeps inner products up to O(1/sqrt(SKETCH_DIM)).
    gen = torch.Generator().manual_seed(0)
    return torch.randn(dim, SKETCH_DIM, generator=gen) / math.sqrt(SKETCH_DIM)


def _signature(layer: _Layer, unit_order: torch.Tensor | None, sketch: torch.Tensor | None) -> torch.Tensor:
    """Canonical rows with input units in reference order (``unit_order[k]`` = own unit at position k).

    With a sketch the permutation is moved onto the sketch's rows, so the weight is read once, in place.
    """
    if sketch is None:
        dense = layer.dense()
        if unit_order is not None:
            dense = dense[:, unit_order, :]
        return dense.flatten(1)
    if unit_order is not None:
        inverse = torch.argsort(unit_order)
        sketch = sketch.reshape(layer.units, layer.rest, -1)[inverse].reshape(-1, sketch.shape[1])
    cs = layer.column_scale
    if cs is not None:
        sketch = sketch * cs[:, None]
    a = (layer.weight @ sketch) * layer.inverse_norms[:, None]
    return a / a.norm(dim=1, keepdim=True).clamp_min(_TINY)


def _similarity(ref: _Layer, sus: _Layer, unit_order: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarity of canonical rows (unit norm already), via a fixed random sketch when large."""
    dim = ref.units * ref.rest
    big = ref.weight.shape[0] * sus.weight.shape[0] * dim > _EXACT_LIMIT and dim > SKETCH_DIM
    sketch = _sketch_matrix(dim) if big else None
    return _signature(ref, None, sketch) @ _signature(sus, unit_order, sketch).T


def match_neurons(sim: np.ndarray) -> np.ndarray:
    """``perm[k]`` = the suspect neuron matched to reference neuron ``k``, maximising total similarity.

    Mutual nearest neighbours are fixed first (they are what an optimal assignment picks on a clearly
    matching pair of layers, so a copy costs two argmax passes); only the rest is solved exactly with
    ``linear_sum_assignment``.
    """
    n = sim.shape[0]
    sim = np.ascontiguousarray(sim)
    best_sus = sim.argmax(axis=1)
    # numpy's strided axis-0 pass is slow on a large matrix; torch's column reduction is not.
    best_ref = torch.from_numpy(sim).argmax(dim=0).numpy()
    mutual = best_ref[best_sus] == np.arange(n)
    perm = np.full(n, -1, dtype=np.int64)
    perm[mutual] = best_sus[mutual]
    rest_ref = np.flatnonzero(~mutual)
    if len(rest_ref):
        taken = np.zeros(n, dtype=bool)
        taken[perm[mutual]] = True
        rest_sus = np.flatnonzero(~taken)
        rows, cols = linear_sum_assignment(sim[np.ix_(rest_ref, rest_sus)], maximize=True)
        perm[rest_ref[rows]] = rest_sus[cols]
    return perm


def _match_layers(ref: Sequence[_Layer], sus: Sequence[_Layer]) -> tuple[torch.Tensor | None, list[float]]:
    """Match each layer's neurons in turn, carrying each matching into the next layer's inputs."""
    perm: torch.Tensor | None = None
    quality: list[float] = []
    for r, s in zip(ref, sus):
        sim = _similarity(r, s, perm).numpy()
        order = match_neurons(sim)
        quality.append(float(sim[np.arange(len(order)), order].mean()))
        perm = torch.from_numpy(order)
    return perm, quality


def align_chain(reference: Sequence[torch.Tensor], suspect: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    """The suspect's mean canonical marked row, with its inputs put in the reference's neuron order.

    Only the layers *before* the marked one drive the matching (see the module docstring on the null);
    ``reference[-1]`` is never read.

    Returns:
        The aligned vector, and the mean matched similarity of each aligned layer.
    """
    # alignment runs on the CPU (NumPy assignment); weights may come from a model on any device
    ref_layers = _layers([w.detach().float().cpu() for w in reference[:-1]])
    return _align(ref_layers, _layers([w.detach().float().cpu() for w in suspect]))


def _align(ref_layers: Sequence[_Layer], sus_layers: Sequence[_Layer]) -> tuple[torch.Tensor, list[float]]:
    perm, quality = _match_layers(ref_layers, sus_layers[:-1])
    # The mean over the marked layer's rows commutes with permuting its inputs: permute the mean only.
    mean = sus_layers[-1].mean_row()
    if perm is not None:
        mean = mean[perm]
    return mean.flatten(), quality


def _check_commitment(key: Key, ref: _File) -> None:
    commitment = wmark_metadata(ref.metadata).get("commitment")
    if commitment and commitment != key.commitment():
        raise UsageError(f"The reference {ref.path} was marked with another key (commitment {str(commitment)[:16]}); "
                         "use the key it was marked with.")


def _reference_chain(key: Key, ref: _File, chain: Sequence[str] | None) -> tuple[list[str], dict[str, Any]]:
    meta = wmark_metadata(ref.metadata)
    recorded_info = meta.get("weights")
    info: dict[str, Any] = recorded_info if isinstance(recorded_info, dict) else {}
    _check_commitment(key, ref)
    names = list(chain) if chain else list(info.get("chain", []))
    if not names:
        raise UsageError(f"The reference {ref.path} has no wmark.weights metadata; pass the marked model written by "
                         "`wmark embed --scheme weights`.")
    missing = [n for n in names if n not in ref.shapes]
    if missing:
        raise UsageError(f"The reference {ref.path} has no tensor {missing[0]!r}, which the key's watermark is in; "
                         "pass the marked model itself.")
    shapes = [ref.shapes[n] for n in names]
    recorded = info.get("chain_shapes")
    if recorded and [tuple(s) for s in recorded] != shapes:
        raise UsageError(f"The reference's layer shapes {shapes} differ from those it was marked with {recorded}; "
                         "pass the unmodified marked model.")
    try:
        for i, shape in enumerate(shapes):
            layer_units(shape, shapes[i - 1] if i else None)
    except UsageError:
        raise UsageError(f"The reference's layers {names} do not form a conv/linear chain; "
                         "pass the model written by `wmark embed`.") from None
    return names, info


def _candidates(sus: _File, shape: tuple[int, ...], used: set[str]) -> list[str]:
    return sus.usable(sorted(n for n, s in sus.shapes.items() if s == shape and n not in used))


def verify_whitebox(*, key: Key, reference: PathLike, suspect: PathLike, alpha: float = DEFAULT_ALPHA,
                    anchor: PathLike | None = None, chain: Sequence[str] | None = None) -> Verdict:
    """White-box verification of a suspect's weights against the owner's marked reference.

    Args:
        key: The owner's key.
        reference: The owner's marked model (safetensors with ``wmark.weights`` metadata).
        suspect: The suspect's safetensors file; layer names, neuron order, scales and dtype may differ.
        alpha: Bound on the probability of accusing a model that never saw the key.
        anchor: Optional unmarked base model to align to instead of the reference (makes the null exact
            by construction; see the module docstring).
        chain: Names of the reference's chain (marked layer last), when its metadata lacks them.

    Returns:
        A :class:`wmark.verify.Verdict` with one ``weights`` test (evidence of a copy). Its details record the
        bits read and the SHA-256 of the three files (``files``), what :mod:`wmark.whitebox.recheck` needs to
        recompute the verdict from the revealed key, or to re-read the files it names.

    Raises:
        UsageError: On unreadable files, a reference that does not carry the key's mark or whose layers do
            not match it, a suspect without a compatible tensor, or unsupported dtypes.
    """
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}.")
    verdict = _verify(key=key, reference=reference, suspect=suspect, alpha=alpha, anchor=anchor, chain=chain)
    details = verdict.tests[0].details
    details["files"] = {role: None if p is None else {"path": str(p), "sha256": file_sha256(p)}
                        for role, p in (("reference", reference), ("suspect", suspect), ("anchor", anchor))}
    if chain:
        details["chain"] = list(chain)
    return verdict


def _verify(*, key: Key, reference: PathLike, suspect: PathLike, alpha: float, anchor: PathLike | None,
            chain: Sequence[str] | None) -> Verdict:
    bits = int(scheme_params(key)["bits"])
    ref = _File.open(reference, "reference")
    recorded_info = wmark_metadata(ref.metadata).get("weights")
    if isinstance(recorded_info, dict) and "graph" in recorded_info and not chain:
        # A mark recorded with a graph plan (residual CNNs, transformers): see wmark.whitebox.align.
        from wmark.whitebox.align import verify_graph

        _check_commitment(key, ref)
        return verify_graph(key=key, info=recorded_info, ref=ref, sus=_File.open(suspect, "suspect"),
                            anc=None if anchor is None else _File.open(anchor, "anchor"), alpha=alpha,
                            suspect_label=str(suspect))
    names, info = _reference_chain(key, ref, chain)
    ref_w = [ref.load(n) for n in names]
    x = projection(key, ref_w[-1][0].numel())
    expected = payload_bits(key)

    ref_layers = _layers(ref_w)
    ref_bits = read_bits(x, ref_layers[-1].mean_row().flatten())
    ref_errors = int(np.sum(ref_bits != expected))
    if ref_errors > bits // 4:
        raise UsageError(f"The reference reads {ref_errors} of {bits} bits wrong, so it does not carry this key's "
                         "weight watermark; check the key and the reference.")
    anchor_w = ref_w
    align_to = ref_layers[:-1]
    if anchor is not None:
        anc = _File.open(anchor, "anchor")
        bad = [n for n in names[:-1] if anc.shapes.get(n) != ref.shapes[n]]
        if bad:
            raise UsageError(f"The anchor {anc.path} lacks {bad[0]!r} with the reference's shape; pass the base "
                             "model the reference was fine-tuned from.")
        anchor_w = [anc.load(n) for n in names[:-1]] + [ref_w[-1]]
        recorded = info.get("anchor_digest")
        if recorded and anchor_digest(dict(zip(names[:-1], anchor_w[:-1]))) != recorded:
            raise anchor_refusal(anc, names[:-1])
        align_to = _layers(anchor_w[:-1])

    sus = _File.open(suspect, "suspect")
    marked_shape = ref.shapes[names[-1]]
    candidates = _candidates(sus, marked_shape, set())
    if not candidates:
        raise UsageError(f"The suspect {sus.path} has no tensor of shape {marked_shape} (the marked layer's), "
                         "so white-box verification cannot apply; try black-box verification.")
    # Earlier layers may share the marked layer's shape (an MLP's equal hidden widths): each candidate
    # excludes only itself, so a permuted copy still aligns through them. The chain found without any
    # exclusion serves every candidate it does not use.
    shared = _find_predecessors(anchor_w[:-1], names[:-1], ref, sus, set())
    best: tuple[int, str, np.ndarray, list[float], list[str], list[str]] | None = None
    for name in candidates:
        predecessors, chosen, skipped = shared if name not in shared[1] else _find_predecessors(
            anchor_w[:-1], names[:-1], ref, sus, {name})
        sus_layers = _layers(predecessors)
        marked = _layers([sus.load(name)], after=sus_layers[-1] if sus_layers else None)[0]
        vector, q = _align(_layers(anchor_w[len(skipped):-1]) if skipped else align_to, [*sus_layers, marked])
        got = read_bits(x, vector)
        matches = int(np.sum(got == expected))
        if best is None or matches > best[0]:
            best = (matches, name, got, q, chosen, skipped)
    assert best is not None
    matches, found, got, q, chosen, skipped = best
    test = weights_test_result(
        key=key, matches=matches, bits=bits, candidates=len(candidates), got=got, exact=anchor is not None,
        details={"layer_found": found, "reference_layer": names[-1], "chain_found": [*chosen, found],
                 "alignment_similarity": [round(v, 4) for v in q], "unaligned_layers": skipped,
                 "anchor_recorded": bool(info.get("anchor_digest")), "reference_bit_errors": ref_errors})
    return decide(key=key, tests=[test], alpha=alpha, suspect=str(suspect))


def weights_test_result(*, key: Key, matches: int, bits: int, candidates: int, got: np.ndarray, exact: bool,
                        details: dict[str, Any]) -> TestResult:
    """The weight mark's test result: the exact Binomial(bits, 1/2) tail of the best of ``candidates``
    tensors, Bonferroni-corrected, with the null stated (exact by construction when aligned to the anchor).

    ``details`` (``form``: ``graph`` for a graph plan, else a chain) is kept; the bits read (``got``) are recorded
    as ``bits_read`` so that :mod:`wmark.whitebox.recheck` can recompute the test from the revealed key alone.
    """
    raw = binomial_log10_sf(matches, bits, 0.5)
    return TestResult(
        name="weights",
        evidence_of="copy",
        null={
            "p0": 0.5,
            "distribution": f"Binomial({bits}, 1/2)",
            "why": "for a model that never saw the key, the aligned vector the projection reads is independent of "
                   "the key's Gaussian projection, so each bit is the sign of an independent N(0, 1) and matches "
                   "the payload with probability exactly 1/2; " + (
                       "the alignment reads only the suspect and the unmarked anchor, both independent of the key, "
                       "so this holds by construction" if exact else NOT_EXACT_WHY[details.get("form", "chain")]),
            "exact_by_construction": exact,
        },
        log10_p=min(0.0, raw + math.log10(candidates)),
        queries=bits,
        matches=matches,
        method=f"exact binomial tail P(X >= matches), X ~ Binomial({bits}, 1/2), summed in log space; "
               f"Bonferroni over {candidates} candidate tensor(s)",
        details={"mode": "whitebox", "bits": bits, "bit_error_rate": (bits - matches) / bits,
                 "log10_p_uncorrected": raw, "candidates": candidates,
                 "aligned_to": "anchor" if exact else "reference", **details,
                 "decoded_message": decode_message(key, got), "bits_read": bits_text(got)},
    )


def bits_text(got: np.ndarray) -> str:
    """The bits read, in projection-row order, as text: ``0``/``1`` each, ``-`` for a vector that read none."""
    return "".join("-" if b < 0 else str(int(b)) for b in got)


def bits_from_text(text: str) -> np.ndarray:
    """The inverse of :func:`bits_text`."""
    return np.array([-1 if c == "-" else int(c) for c in text], dtype=np.int64)


def read_bits(x: torch.Tensor, vector: torch.Tensor) -> np.ndarray:
    """The bits a canonical vector reads under projection ``x`` (signs of ``x @ vector``; -1 each for a zero or
    non-finite vector)."""
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        # A zero or broken vector carries no bits; count every bit as wrong rather than guess.
        return np.full(x.shape[0], -1, dtype=np.int64)
    return ((x @ (vector / norm)) >= 0).to(torch.int64).numpy()


def _find_predecessors(anchor_w: Sequence[torch.Tensor], names: Sequence[str], ref: _File, sus: _File,
                       used: set[str]) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """For each earlier chain layer, the suspect tensor of the same shape that aligns best.

    The choice uses only the earlier layers, never the marked one, so it stays blind to the projection.
    When some layer has no same-shaped tensor the chain is cut there and the layers before it are left
    unaligned (the result is still a valid test, just less robust to permutation).

    Returns:
        The chosen tensors, their names, and the reference layers left unaligned.
    """
    chosen: list[torch.Tensor] = []
    chosen_names: list[str] = []
    start = 0
    for i, name in enumerate(names):
        options = _candidates(sus, ref.shapes[name], used)
        if not options:
            chosen, chosen_names, start = [], [], i + 1
            continue
        if len(options) == 1:
            pick, weight = options[0], sus.load(options[0])
        else:
            ref_c = _layers(anchor_w[start:i + 1])
            scored = []
            for opt in options:
                w = sus.load(opt)
                _, q = _match_layers(ref_c, _layers([*chosen, w]))
                scored.append((q[-1], opt, w))
            _, pick, weight = max(scored, key=lambda t: t[0])
        chosen.append(weight)
        chosen_names.append(pick)
        used.add(pick)
    return chosen, chosen_names, list(names[:start])
