"""Keyed tie-breaking: an API-side mark a surrogate learns as part of the task, with an exact Gaussian null.

Where the served model hesitates between its top two classes ``{a, b}``, this wrapper lets a keyed, smooth
rule of the input lean the answer towards one of them: the served log-odds ``log p_a − log p_b`` are
shifted by ``beta · u(x)``, where ``u(x) = <w_ab, psi(x)>`` is linear in a fixed feature map of the input
and ``w_ab ~ N(0, I_k)`` is drawn from the key, one direction per unordered class pair. Confident answers
never change; near-ties follow the rule; exposed scores carry the shifted log-odds everywhere. A
surrogate trained on the answers learns "near this boundary, lean the way ``w_ab`` says" as one more
smooth part of the decision function — unlike isolated keyed flips
(:mod:`wmark.schemes.api_mark`), which a surrogate that stops training early never memorises.

Feature map (:func:`build_tiebreak_rule`, once, from the owner's own inputs): the served model's
penultimate activations, centred and whitened on their top ``components`` principal directions, then
centred per class pair on the owner's inputs where that pair is the top two. It is fixed before any
suspect exists and never read from a suspect. The rule file stores it (safetensors); the directions
``w`` are re-derived from the key and never stored.

Verification (:func:`tiebreak_test`) and why its null is exact. The owner picks ``n`` of its own held
inputs, never ones a client chose, by a key-independent criterion: the first ``n`` (in the holdout's
stored order) where the *unmarked* served model leans without being sure, ``0.3 <= p_b / p_a < 0.7``
(with ``beta = 1`` these are the inputs whose answers the rule flips only where ``|u|`` is large, and
early-stopped surrogates follow it there more than at exact ties: median log10 p −4.2 vs −3.0 over nine
surrogates in ``benchmarks/``). The suspect answers them; ``s_i = +1`` if it
answers the pair's smaller class index, ``−1`` for the larger, ``0`` otherwise (other classes and
abstentions carry no evidence). Per pair ``g``, ``v_g = Σ_{i in g} s_i psi_i``, minus its projection on the
served model's own preference directions (``Σ sign(d_i) psi_i`` and ``Σ d_i psi_i`` with ``d_i`` the
unmarked log-odds: what any model trained on this task shares with the victim). The statistic is
``Z = Σ_g <w_g, v_g> / sqrt(Σ_g |v_g|²)``. ``H0``: the suspect was made without access to the
tie-broken answers. Under ``H0`` (HMAC-SHA256 as a pseudo-random function) the ``w_g`` are independent
standard normal vectors, independent of the suspect's answers, of the inputs and of the features (which
come from the served model and the owner's data); given all of those, ``Z`` is a fixed linear combination
of independent standard normals with unit variance, so **Z ~ N(0, 1) exactly** and
``p = P(N(0, 1) ≥ Z)``, computed in log space. The inputs of one pair share ``w_g``, so per-input
agreements are correlated; the statistic accounts for that, a per-input binomial would not. (Gaussian
draws come from 32-bit uniforms by Box–Muller; the discretisation is far below any reported p-value.)

The test is fixed-n: the owner fixes ``n`` before querying, and the report records it.

Example:
    >>> import numpy as np
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME", num_classes=3, input_shape=(5,))
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 5)).astype(np.float32)
    >>> scores = rng.dirichlet(np.ones(3), size=300)
    >>> rule = build_tiebreak_rule(key=key, x=x, served_scores=scores, featurizer=lambda v: v,
    ...                            feature_space="identity", components=4)
    >>> rule.directions.shape
    (3, 3, 4)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import log_ndtr

from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors, wmark_metadata
from wmark.keys import Key
from wmark.schemes.api_mark import query_with_scores
from wmark.suspects.base import Answers, Suspect
from wmark.verify import TestResult

SCHEME = "api-tiebreak"
VERSION = 1
DEFAULT_COMPONENTS = 48
DEFAULT_BETA = 1.0
DEFAULT_PAIR_RATIO = 0.3
DEFAULT_MAX_RATIO = 0.7
DEFAULT_BAND = 0.05
DEFAULT_QUERIES = 1000

Featurizer = Callable[[np.ndarray], np.ndarray]


def top_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the ratio ``p_b / p_a`` of the runner-up to the top score, and the pair as (smaller, larger)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=1, kind="stable")
    a, b = order[:, 0], order[:, 1]
    rows = np.arange(len(s))
    ratio = s[rows, b] / np.maximum(s[rows, a], 1e-300)
    return ratio, np.minimum(a, b), np.maximum(a, b)


@dataclass(frozen=True)
class TieBreakRule:
    """The owner's fixed feature map and its keyed directions.

    Attributes:
        mean: Mean penultimate feature over the owner's inputs (D).
        projection: Whitening onto the top principal directions (D×k).
        centers: Per class pair (lo, hi), the mean projected feature where it is the top two (C×C×k).
        scales: Per class pair, the spread of ``u`` over those inputs, so ``beta`` is in log-odds units (C×C).
        directions: The keyed ``w`` (C×C×k); derived from the key, never stored.
        commitment: The key commitment the rule was built under.
        feature_space: Name of the featurizer's space (e.g. ``served-penultimate``).
        model_digest: Digest of the served model file whose features define the rule (empty if unknown).
        featurizer: The feature function (not stored; pass it again when loading).
    """

    mean: np.ndarray
    projection: np.ndarray
    centers: np.ndarray
    scales: np.ndarray
    directions: np.ndarray
    commitment: str
    feature_space: str
    model_digest: str = ""
    featurizer: Featurizer | None = field(default=None, compare=False)

    @property
    def components(self) -> int:
        return int(self.projection.shape[1])

    def features(self, x: np.ndarray) -> np.ndarray:
        """Projected, whitened features of ``x`` (before per-pair centring)."""
        if self.featurizer is None:
            raise UsageError("This tie-break rule was loaded without its featurizer; pass featurizer= to "
                             "load_tiebreak_rule (the served model's penultimate_featurizer).")
        f = np.asarray(self.featurizer(np.asarray(x, dtype=np.float32)), dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.mean):
            raise UsageError(f"The featurizer gives {f.shape[1:]} features, the rule expects {len(self.mean)}; "
                             "use the served model the rule was built from.")
        return (f - self.mean) @ self.projection

    def centred(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Features of ``x`` centred on their pair's centre: the ``psi`` the rule is linear in."""
        return self.features(x) - self.centers[lo, hi]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the feature map (no directions) as safetensors."""
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
                   for name, value in (("mean", self.mean), ("projection", self.projection),
                                       ("centers", self.centers), ("scales", self.scales))}
        save_tensors(tensors, path, metadata={"scheme": SCHEME, "version": VERSION, "key_commitment": self.commitment,
                                              "feature_space": self.feature_space, "model_digest": self.model_digest})


def _directions(key: Key, k: int) -> np.ndarray:
    c = key.num_classes
    return key.normal(f"{SCHEME}/v{VERSION}/directions", (c, c, k))


def build_tiebreak_rule(*, key: Key, x: np.ndarray, served_scores: np.ndarray, featurizer: Featurizer,
                        feature_space: str, components: int = DEFAULT_COMPONENTS,
                        pair_ratio: float = DEFAULT_PAIR_RATIO, model_digest: str = "") -> TieBreakRule:
    """Build the rule's feature map from the owner's inputs and the served model's scores on them.

    Args:
        key: The owner's key.
        x: Owner inputs (N×input shape); keep them apart from the verification inputs if you can.
        served_scores: The served model's probabilities on ``x`` (N×C).
        featurizer: A fixed feature function, e.g. :func:`wmark.schemes.api_regions.penultimate_featurizer`
            of the served model.
        feature_space: A name for the featurizer's space, recorded in the rule file.
        components: Principal directions kept (k); more gives a larger ceiling on the evidence, fewer are
            learned more easily.
        pair_ratio: Inputs with ``p_b / p_a`` at least this place each pair's centre and scale.
        model_digest: Digest of the served model file, recorded so verification can check it.

    Raises:
        UsageError: On inconsistent sizes or too few inputs.
    """
    scores = np.asarray(served_scores, dtype=np.float64)
    c = key.num_classes
    if scores.ndim != 2 or scores.shape != (len(x), c):
        raise UsageError(f"served_scores must be {len(x)}×{c} (one probability row per input), got {scores.shape}.")
    feats = np.asarray(featurizer(np.asarray(x, dtype=np.float32)), dtype=np.float64)
    if feats.ndim != 2 or len(feats) != len(x):
        raise UsageError("The featurizer must return one feature row per input.")
    if not 1 <= components <= feats.shape[1]:
        raise UsageError(f"components must be between 1 and the feature size {feats.shape[1]}, got {components}.")
    if len(x) < 2 * components:
        raise UsageError(f"Give at least {2 * components} owner inputs to place {components} components.")
    mean = feats.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov((feats - mean).T))
    top = slice(len(evals) - components, None)
    floor = 1e-9 * max(float(evals[-1]), 1e-300)
    projection = evecs[:, top] / np.sqrt(np.maximum(evals[top], floor))
    psi = (feats - mean) @ projection
    ratio, lo, hi = top_pairs(scores)
    near = ratio >= pair_ratio
    centers = np.zeros((c, c, components))
    scales = np.ones((c, c))
    directions = _directions(key, components)
    for i, j in zip(*np.triu_indices(c, 1)):
        sel = near & (lo == i) & (hi == j)
        if sel.sum() >= 2:
            centers[i, j] = psi[sel].mean(axis=0)
            u = (psi[sel] - centers[i, j]) @ directions[i, j]
            scales[i, j] = max(float(u.std()), 1e-12)
    return TieBreakRule(mean=mean, projection=projection, centers=centers, scales=scales, directions=directions,
                        commitment=key.commitment(), feature_space=feature_space, model_digest=model_digest,
                        featurizer=featurizer)


def load_tiebreak_rule(path: str | os.PathLike[str], *, key: Key, featurizer: Featurizer) -> TieBreakRule:
    """Read a rule written by :meth:`TieBreakRule.save` and re-derive its directions from ``key``.

    Raises:
        UsageError: If the file is not a tie-break rule or was built under another key.
    """
    tensors, raw = load_tensors(path)
    meta = wmark_metadata(raw)
    if meta.get("scheme") != SCHEME or not {"mean", "projection", "centers", "scales"} <= set(tensors):
        raise UsageError(f"{path} is not a wmark tie-break rule; build one with `wmark tiebreak build`.")
    if meta.get("key_commitment") != key.commitment():
        raise UsageError(f"The tie-break rule {path} was built under another key; use the key that served the API.")
    projection = tensors["projection"].numpy()
    centers = tensors["centers"].numpy()
    if centers.shape[:2] != (key.num_classes, key.num_classes):
        raise UsageError(f"The tie-break rule {path} is for {centers.shape[0]} classes, the key for "
                         f"{key.num_classes}.")
    return TieBreakRule(mean=tensors["mean"].numpy(), projection=projection, centers=centers,
                        scales=tensors["scales"].numpy(), directions=_directions(key, projection.shape[1]),
                        commitment=key.commitment(), feature_space=str(meta.get("feature_space", "")),
                        model_digest=str(meta.get("model_digest", "")), featurizer=featurizer)


def open_tiebreak_rule(*, key: Key, rule: str | os.PathLike[str], arch: str,
                       served: str | os.PathLike[str]) -> tuple[TieBreakRule, Suspect]:
    """Load a rule file with the served model it was built from, checked against each other.

    Returns:
        The rule (featurizer attached) and the served model as a score-exposing local suspect.

    Raises:
        UsageError: If the rule was built under another key or from another served model file.
    """
    from wmark.io import tensors_digest
    from wmark.models import load_model
    from wmark.schemes.api_regions import penultimate_featurizer
    from wmark.suspects import LocalSuspect

    model, _ = load_model(arch, served, num_classes=key.num_classes, input_shape=tuple(key.input_shape))
    loaded = load_tiebreak_rule(rule, key=key, featurizer=penultimate_featurizer(model))
    tensors, raw = load_tensors(served)
    if loaded.model_digest and loaded.model_digest != tensors_digest(tensors, raw):
        raise UsageError(f"The tie-break rule {rule} was built from another served model than {served}; pass "
                         "the model file the API served.")
    return loaded, LocalSuspect(model, input_shape=tuple(key.input_shape), description=str(served),
                                expose_scores=True)


class TieBreakAPI:
    """A serving wrapper that leans near-ties towards the keyed rule (a :class:`Suspect` itself).

    Args:
        key: The owner's key.
        backend: The served model; it must expose scores.
        rule: The tie-break rule built under ``key`` from this served model.
        beta: Shift of the top-two log-odds per unit of ``u`` (the accuracy cost grows with it).
        band: Rows whose runner-up has less than ``band`` × the top probability are left untouched.
        expose_scores: Return the shifted scores, or labels only.
    """

    def __init__(self, *, key: Key, backend: Suspect, rule: TieBreakRule, beta: float = DEFAULT_BETA,
                 band: float = DEFAULT_BAND, expose_scores: bool = True) -> None:
        if rule.commitment != key.commitment():
            raise UsageError("The tie-break rule was built under another key; build it with the serving key.")
        if backend.num_classes is not None and backend.num_classes != key.num_classes:
            raise UsageError(f"The served model has {backend.num_classes} classes but the key {key.num_classes}; "
                             "serve the model the key was made for.")
        if beta <= 0:
            raise UsageError(f"beta must be positive, got {beta}.")
        if not 0.0 <= band < 1.0:
            raise UsageError(f"band must be in [0, 1), got {band}.")
        self.key, self.backend, self.rule = key, backend, rule
        self.beta, self.band, self.expose_scores = float(beta), float(band), expose_scores
        self.num_classes = key.num_classes
        self.input_shape = tuple(key.input_shape)
        self.description = f"tie-break-marked {backend.description}"

    def query(self, inputs: np.ndarray) -> Answers:
        x, scores, labels = query_with_scores(self.backend, inputs, self.input_shape)
        ratio, lo, hi = top_pairs(scores)
        rows = np.flatnonzero(ratio >= self.band)
        if len(rows):
            lo_r, hi_r = lo[rows], hi[rows]
            u = np.einsum("nk,nk->n", self.rule.centred(x[rows], lo_r, hi_r), self.rule.directions[lo_r, hi_r])
            shift = self.beta * u / self.rule.scales[lo_r, hi_r] / 2.0
            logits = np.log(np.maximum(scores[rows], 1e-300))
            logits[np.arange(len(rows)), lo_r] += shift
            logits[np.arange(len(rows)), hi_r] -= shift
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores[rows] = probs / probs.sum(axis=1, keepdims=True)
            labels[rows] = np.argmax(scores[rows], axis=1)
        return Answers(labels=labels, scores=scores if self.expose_scores else None)


def select_verification_inputs(*, scores: np.ndarray, count: int, min_ratio: float = DEFAULT_PAIR_RATIO,
                               max_ratio: float = DEFAULT_MAX_RATIO) -> np.ndarray:
    """Indices of the first ``count`` inputs with ``min_ratio <= p_b / p_a < max_ratio`` (key-independent).

    ``scores`` are the unmarked served model's; ``max_ratio`` above 1 admits exact ties.
    """
    ratio, _, _ = top_pairs(scores)
    return np.flatnonzero((ratio >= min_ratio) & (ratio < max_ratio))[:count]


def tiebreak_statistic(*, rule: TieBreakRule, psi: np.ndarray, lo: np.ndarray, hi: np.ndarray, answers: np.ndarray,
                       reference_logodds: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
    """The exact Z statistic of the module docstring for answers on inputs with features ``psi``.

    Args:
        rule: The tie-break rule (its directions are used only here).
        psi: Pair-centred features of the verification inputs (n×k).
        lo: The smaller class of each input's pair (under the unmarked served model).
        hi: The larger class of each input's pair.
        answers: The suspect's labels (−1 = abstention).
        reference_logodds: The unmarked served model's ``log p_lo − log p_hi`` per input; its preference
            directions are projected out of each pair's sum (key-independent).

    Returns:
        ``Z`` (N(0, 1) exactly under H0; 0 when nothing is left to test: no answer in its pair, or answers
        that are exactly the reference's preference) and details.
    """
    a = np.asarray(answers, dtype=np.int64)
    s = np.where(a == lo, 1.0, np.where(a == hi, -1.0, 0.0))
    u = np.einsum("nk,nk->n", psi, rule.directions[lo, hi])
    numerator, variance, scale = 0.0, 0.0, 0.0
    groups = lo * rule.directions.shape[0] + hi
    for g in np.unique(groups):
        sel = groups == g
        v = s[sel] @ psi[sel]
        scale += float(np.sum((s[sel, None] * psi[sel]) ** 2))
        if reference_logodds is not None:
            d = np.asarray(reference_logodds, dtype=np.float64)[sel]
            basis, _ = np.linalg.qr(np.stack([np.sign(d) @ psi[sel], d @ psi[sel]], axis=1))
            v = v - basis @ (basis.T @ v)
        w = rule.directions[lo[sel][0], hi[sel][0]]
        numerator += float(w @ v)
        variance += float(v @ v)
    # What is left after projecting out the reference's own preference can be pure rounding noise (a suspect
    # that answers exactly like the reference); that carries no evidence, not a random z.
    z = numerator / np.sqrt(variance) if variance > 1e-18 * max(scale, 1e-300) else 0.0
    in_pair = s != 0
    agree = int(np.sum(in_pair & (np.sign(u) == s)))
    return z, {"in_pair": int(in_pair.sum()), "agree": agree, "pairs": len(np.unique(groups[in_pair]))}


def tiebreak_test(*, key: Key, rule: TieBreakRule, served: Suspect, suspect: Suspect, inputs: np.ndarray,
                  queries: int = DEFAULT_QUERIES, min_ratio: float = DEFAULT_PAIR_RATIO,
                  max_ratio: float = DEFAULT_MAX_RATIO) -> TestResult:
    """Test whether a suspect breaks the served model's near-ties the way the keyed rule does.

    Args:
        key: The owner's key (the rule must have been built under it).
        rule: The tie-break rule.
        served: The owner's *unmarked* served model (exposing scores): it picks the verification inputs and
            gives the pairs; it is never the suspect.
        suspect: The model under test (labels suffice).
        inputs: The owner's own held inputs, never inputs a client chose.
        queries: How many of them to ask, fixed before querying.
        min_ratio: Only inputs with ``p_b / p_a`` at least this are eligible...
        max_ratio: ...and below this.

    Returns:
        A ``TestResult`` with ``evidence_of="extracted"``; ``matches`` counts answers that follow the rule.

    Raises:
        UsageError: On a key/rule/suspect mismatch or when no input is near a tie.
    """
    if rule.commitment != key.commitment():
        raise UsageError("The tie-break rule was built under another key; verify with the key that served the API.")
    if suspect.num_classes is not None and suspect.num_classes != key.num_classes:
        raise UsageError(f"The suspect answers {suspect.num_classes} classes but the key has {key.num_classes}; "
                         "it cannot be tested with this key.")
    x = np.asarray(inputs, dtype=np.float32)
    if x.shape[1:] != tuple(key.input_shape):
        raise UsageError(f"Verification inputs are shaped {x.shape[1:]}, the key's input shape is "
                         f"{tuple(key.input_shape)}.")
    if queries < 1:
        raise UsageError(f"queries must be at least 1, got {queries}.")
    _, ref_scores, _ = query_with_scores(served, x, tuple(key.input_shape))
    chosen = select_verification_inputs(scores=ref_scores, count=queries, min_ratio=min_ratio, max_ratio=max_ratio)
    if len(chosen) == 0:
        raise UsageError(f"None of the {len(x)} verification inputs has {min_ratio} <= p_b/p_a < {max_ratio}; give "
                         "more held inputs from the owner's distribution.")
    xs, ref = x[chosen], ref_scores[chosen]
    _, lo, hi = top_pairs(ref)
    psi = rule.centred(xs, lo, hi)
    rows = np.arange(len(ref))
    logodds = np.log(np.maximum(ref[rows, lo], 1e-300)) - np.log(np.maximum(ref[rows, hi], 1e-300))
    answers = np.asarray(suspect.query(xs).labels, dtype=np.int64).reshape(-1)
    if len(answers) != len(xs):
        raise UsageError(f"The suspect answered {len(answers)} labels for {len(xs)} queries.")
    z, info = tiebreak_statistic(rule=rule, psi=psi, lo=lo, hi=hi, answers=answers, reference_logodds=logodds)
    log10_p = float(log_ndtr(-z) / np.log(10.0)) if z != 0.0 else 0.0
    details: dict[str, Any] = {"z": z, "components": rule.components, "min_ratio": min_ratio, "max_ratio": max_ratio,
                               "eligible_inputs": len(chosen), "budget": int(queries), **info}
    if info["in_pair"] == 0:
        details["inconclusive"] = "The suspect never answered either class of a near-tie; the tie-break test has no data."
    return TestResult(
        name=SCHEME, evidence_of="extracted",
        null={"distribution": "N(0, 1)", "why": "the keyed directions are independent standard normal vectors, "
              "independent of a suspect made without the tie-broken answers and of the owner-chosen inputs, so "
              "the normalised projection of the suspect's pair-signed feature sums on them is exactly N(0, 1)"},
        log10_p=min(0.0, log10_p), queries=len(xs), matches=info["agree"],
        abstentions=int((answers < 0).sum()), method="exact Gaussian (fixed n, owner-chosen inputs)", details=details,
    )


def tiebreak_test_from_files(*, key: Key, suspect: Suspect, rule: str | os.PathLike[str], served: str | os.PathLike[str],
                             arch: str, holdout: str, queries: int = DEFAULT_QUERIES) -> TestResult:
    """:func:`tiebreak_test` from the files a dispute has: rule, served model file and holdout dataset spec.

    Raises:
        UsageError: On any mismatch between key, rule, served model and holdout data.
    """
    from wmark.data import load_dataset

    loaded, backend = open_tiebreak_rule(key=key, rule=rule, arch=arch, served=served)
    ds = load_dataset(holdout)
    if ds.num_classes != key.num_classes or tuple(ds.input_shape) != tuple(key.input_shape):
        raise UsageError(f"The holdout {holdout} has {ds.num_classes} classes of inputs shaped {tuple(ds.input_shape)}; "
                         f"the key is for {key.num_classes} classes of {tuple(key.input_shape)}. Use the owner's data.")
    return tiebreak_test(key=key, rule=loaded, served=backend, suspect=suspect, inputs=ds.x_train.numpy(),
                         queries=queries)


def accuracy_cost(*, api: TieBreakAPI, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Accuracy of the served labels vs the tie-broken answers on labelled inputs (honest users' cost)."""
    plain = np.asarray(api.backend.query(x).labels)
    marked = np.asarray(api.query(x).labels)
    y = np.asarray(y)
    return {"served_accuracy": float((plain == y).mean()), "api_accuracy": float((marked == y).mean()),
            "accuracy_cost_pp": 100.0 * float((plain == y).mean() - (marked == y).mean()),
            "changed_fraction": float((marked != plain).mean())}
