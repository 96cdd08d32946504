"""The tie-break rule: the owner's fixed feature map, its keyed directions and its committed verification inputs.

Built once (:func:`build_tiebreak_rule`, :func:`commit_verification_inputs`) from the owner's own inputs and
the served model, before any suspect exists; saved as safetensors without the directions, which are
re-derived from the key (:func:`load_tiebreak_rule`). See :mod:`wmark.schemes.tiebreak` for the scheme.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmark.distill import reference_scores
from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors, wmark_metadata
from wmark.keys import Key
from wmark.models import PenultimateFeaturizer, build_model
from wmark.schemes.tiebreak.inputs import pack_texts, rule_inputs, served_scores, unpack_texts
from wmark.suspects.base import Suspect
from wmark.suspects.local import LocalSuspect
from wmark.testplan import content_sha256
from wmark.text import TextInputs, check_tokenizer, shown_claim

SCHEME = "api-tiebreak"
VERSION = 2
DEFAULT_COMPONENTS = 64
DEFAULT_PAIR_RATIO = 0.3
DEFAULT_QUERIES = 1000
DEFAULT_BETA = 1.0
# a scale far past any measured one turns every answer into the key's lean (and overflows to NaN scores)
MAX_BETA = 100.0
EIGEN_FLOOR = 1e-6

Featurizer = Callable[[np.ndarray], np.ndarray]


def top_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the ratio ``p_b / p_a`` of the runner-up to the top score, and the pair as (smaller, larger)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=1, kind="stable")
    a, b = order[:, 0], order[:, 1]
    rows = np.arange(len(s))
    ratio = s[rows, b] / np.maximum(s[rows, a], 1e-300)
    return ratio, np.minimum(a, b), np.maximum(a, b)


def pair_log_odds(probs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row, ``log(p_lo / p_hi)`` of a probability matrix (probabilities floored at 1e-12)."""
    p = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(p))
    return np.log(np.maximum(p[rows, lo], 1e-12)) - np.log(np.maximum(p[rows, hi], 1e-12))


@dataclass(frozen=True)
class TieBreakRule:
    """The owner's fixed feature map and its keyed directions.

    Attributes:
        mean: Mean feature over the owner's inputs (D).
        projection: Whitening onto the chosen principal directions (D×k).
        directions: The keyed ``w`` (C×k); derived from the key, never stored.
        commitment: The key commitment the rule was built under.
        feature_space: Name of the featurizer's space (:mod:`wmark.schemes.tiebreak.features`, e.g.
            ``served-penultimate``).
        model_digest: Digest of the served model file whose features define the rule (empty if unknown).
        featurizer: The feature function (not stored; pass it again when loading).
        verification_inputs: The owner's verification inputs, ranked, committed with the rule (or None: pass
            held inputs to :func:`tiebreak_test`).
        verification: How they were chosen (recorded in the file and the report).
        skipped: Leading principal directions left out of the feature map.
        references: The reference surrogates that chose the verification inputs, as (architecture, model),
            stored with the rule: :func:`tiebreak_log_test` ranks a client's logged inputs by them too.
        served_arch: The served model's architecture (recorded so the rule file says what it was built from).
        served_path: Where the served model file was when the rule was built (absolute).
        input_shape: The shape of one input (for text: the key's maximum length in tokens).
        text: For a text key, how its strings become the served model's inputs (its tokenizer, checked
            against the key); the rule's inputs are then strings. Not stored: rebuilt from the key on load.
        beta: The scale of the keyed shift the API serves with unless told otherwise (the owner's choice of
            cost against evidence, e.g. from ``wmark tiebreak build --max-cost``).
        features_digest: Digest of the weights the featurizer reads besides the served model's (the public
            encoder's; empty for the served model's own features), checked when the rule is opened.
    """

    mean: np.ndarray
    projection: np.ndarray
    directions: np.ndarray
    commitment: str
    feature_space: str
    model_digest: str = ""
    featurizer: Featurizer | None = field(default=None, compare=False)
    verification_inputs: np.ndarray | None = field(default=None, compare=False)
    verification: str = ""
    skipped: int = 0
    references: tuple[tuple[str, torch.nn.Module], ...] = field(default=(), compare=False)
    served_arch: str = ""
    served_path: str = ""
    input_shape: tuple[int, ...] = ()
    text: TextInputs | None = field(default=None, compare=False)
    beta: float = DEFAULT_BETA
    features_digest: str = ""

    @property
    def components(self) -> int:
        return int(self.projection.shape[1])

    @property
    def served_digest(self) -> str:
        """SHA-256 of what the marked answers depend on besides the key: the feature map, the served model's
        digest and, for a map read from other weights, theirs. A query log records it, so a log written while
        another rule, served model or encoder answered is refused."""
        h = hashlib.sha256(f"{self.commitment}|{self.model_digest}|".encode())
        if self.features_digest:  # only then: a served-map rule keeps the digest its logs and transcripts bound
            h.update(f"{self.feature_space}|{self.features_digest}|".encode())
        for a in (self.mean, self.projection):
            arr = np.ascontiguousarray(a, dtype="<f8")
            h.update(f"{arr.shape}|".encode() + arr.tobytes())
        return h.hexdigest()

    @property
    def content_digest(self) -> str:
        """SHA-256 of everything verification reads from the rule: :attr:`served_digest` (the key commitment, the
        served model's digest and the feature map), the committed verification inputs and the reference
        surrogates (architectures and weights). A transcript's test plan binds it (:mod:`wmark.testplan`), so
        answers read under one rule are never read again under another."""
        parts = [self.verification_inputs]
        for arch, net in self.references:
            parts.append(np.frombuffer(arch.encode("utf-8"), dtype=np.uint8))
            parts += [t.detach().cpu().numpy() for _, t in sorted(net.state_dict().items())]
        return hashlib.sha256(f"{self.served_digest}|{content_sha256(*parts)}".encode()).hexdigest()

    def features(self, x: np.ndarray) -> np.ndarray:
        """Whitened features ``psi`` of ``x`` (n×k)."""
        if self.featurizer is None:
            raise UsageError("This tie-break rule was loaded without its featurizer; open it with open_tiebreak_rule, "
                             "or pass load_tiebreak_rule the featurizer of its feature space (rule_featurizer).")
        return self.whiten(self.featurizer(self.inputs(x)))

    def inputs(self, x: Any) -> np.ndarray:
        """``x`` as this rule's inputs (strings for a text rule, float32 otherwise), the other kind refused."""
        return rule_inputs(x, text=self.text is not None, input_shape=self.input_shape or x_shape(x))

    def whiten(self, raw: np.ndarray) -> np.ndarray:
        """Whitened features ``psi`` (n×k) of the featurizer's raw output (n×D)."""
        f = np.asarray(raw, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.mean):
            raise UsageError(f"The featurizer gives {f.shape[1:]} features, the rule expects {len(self.mean)}; "
                             "use the served model the rule was built from.")
        return (f - self.mean) @ self.projection

    def shifts(self, x: np.ndarray) -> np.ndarray:
        """The keyed log-probability shift per class, ``u_c(x)`` (n×C), about N(0, 1) per entry."""
        return self.shifts_of(self.features(x))

    def shifts_of(self, psi: np.ndarray) -> np.ndarray:
        """The keyed shift (n×C) of whitened features ``psi`` (from :meth:`features` or :meth:`whiten`)."""
        return psi @ self.directions.T / np.sqrt(self.components)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the feature map (no directions) as safetensors."""
        tensors = {"mean": torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float64)),
                   "projection": torch.from_numpy(np.ascontiguousarray(self.projection, dtype=np.float64))}
        if self.verification_inputs is not None and self.text is not None:
            # committed texts: their UTF-8 bytes and end offsets (plain tensors, an exact round trip)
            tensors["verification_texts"], tensors["verification_ends"] = pack_texts(list(self.verification_inputs))
        elif self.verification_inputs is not None:
            tensors["verification_inputs"] = torch.from_numpy(
                np.ascontiguousarray(self.verification_inputs, dtype=np.float32))
        for i, (_, net) in enumerate(self.references):
            tensors.update({f"reference{i}/{name}": t for name, t in net.state_dict().items()})
        save_tensors(tensors, path, metadata={"scheme": SCHEME, "version": VERSION, "key_commitment": self.commitment,
                                              "num_classes": int(self.directions.shape[0]),
                                              "feature_space": self.feature_space, "model_digest": self.model_digest,
                                              "verification": self.verification, "skipped_leading": self.skipped,
                                              "reference_archs": [arch for arch, _ in self.references],
                                              "served_arch": self.served_arch, "served_path": self.served_path,
                                              "input_shape": list(self.input_shape),
                                              "input_kind": "image" if self.text is None else "text",
                                              "beta": self.beta,
                                              **({"features_digest": self.features_digest}
                                                 if self.features_digest else {})})


def x_shape(x: Any) -> tuple[int, ...]:
    """The shape of one input of a batch (what a rule built without a recorded shape takes)."""
    return tuple(np.shape(x)[1:])


def _directions(key: Key, k: int) -> np.ndarray:
    return key.normal(f"{SCHEME}/v{VERSION}/directions", (key.num_classes, k))


def build_tiebreak_rule(*, key: Key, x: np.ndarray, featurizer: Featurizer, feature_space: str,
                        components: int | None = None, skip: int = 0,
                        model_digest: str = "", text: TextInputs | None = None,
                        features_digest: str = "") -> TieBreakRule:
    """Build the rule's feature map from the owner's inputs.

    Args:
        key: The owner's key.
        x: Owner inputs (N×input shape).
        featurizer: A fixed feature function, e.g. :func:`wmark.models.penultimate_featurizer`
            of the served model.
        feature_space: A name for the featurizer's space, recorded in the rule file.
        components: Principal directions kept (k); default: ``DEFAULT_COMPONENTS`` or all the live ones
            (non-negligible variance; dead ReLU units have none) below the skipped ones, whichever is fewer.
        skip: Leading (largest-variance) principal directions left out (default none).
        model_digest: Digest of the served model file (:func:`wmark.io.tensors_digest`), recorded so serving and
            verification can check it; a rule saved without it is refused by :func:`open_tiebreak_rule`.
        text: For a text key: its tokenization (:meth:`wmark.text.TextInputs.from_key`); ``x`` is then strings
            and ``featurizer`` must tokenize them (``penultimate_featurizer(model, encode=text.encode)``).
        features_digest: Digest of the weights ``featurizer`` reads besides the served model's
            (:func:`~wmark.schemes.tiebreak.features.rule_featurizer` gives it), bound into the rule.

    Raises:
        UsageError: On inconsistent sizes, too few inputs, inputs of the other kind than the key's, or a
            tokenizer that does not match the key.
    """
    text = _check_text(key, text)
    if text is not None and isinstance(featurizer, PenultimateFeaturizer) and featurizer.encode is None:
        raise UsageError("The featurizer reads token ids but the rule's inputs are texts; build it with "
                         "penultimate_featurizer(model, encode=text.encode).")
    x = rule_inputs(x, text=text is not None, input_shape=tuple(key.input_shape) if text else x_shape(x))
    feats = np.asarray(featurizer(x), dtype=np.float64)
    if feats.ndim != 2 or len(feats) != len(x):
        raise UsageError("The featurizer must return one feature row per input.")
    if len(x) < 4:
        raise UsageError(f"Give more owner inputs to place the feature map (got {len(x)}).")
    mean = feats.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.atleast_2d(np.cov((feats - mean).T)))
    live = int((evals > EIGEN_FLOOR * max(float(evals[-1]), 1e-300)).sum())
    if components is not None and not 1 <= components <= feats.shape[1]:
        raise UsageError(f"components must be between 1 and the feature size {feats.shape[1]}, got {components}.")
    if skip < 0:
        raise UsageError(f"skip must be 0 or more, got {skip}.")
    if components is None:
        components = max(1, min(DEFAULT_COMPONENTS, live - skip))
    if len(x) < 2 * (components + skip):
        raise UsageError(f"Give at least {2 * (components + skip)} owner inputs to place {components} components "
                         f"after skipping {skip}.")
    if components + skip > live:
        raise UsageError(f"The features vary in only {live} directions on these inputs; use components + skip "
                         f"<= {live} (got {components} + {skip}).")
    kept = slice(len(evals) - skip - components, len(evals) - skip)
    projection = evecs[:, kept] / np.sqrt(evals[kept])
    return TieBreakRule(mean=mean, projection=projection, directions=_directions(key, components),
                        commitment=key.commitment(), feature_space=feature_space, model_digest=model_digest,
                        featurizer=featurizer, skipped=skip, text=text, features_digest=features_digest,
                        input_shape=tuple(key.input_shape) if text is not None else ())


def _check_text(key: Key, text: TextInputs | None) -> TextInputs | None:
    """The key's text inputs (``text`` checked against the key, or the key's own tokenizer); None for an image
    key, which takes none."""
    if key.kind != "text":
        if text is not None:
            raise UsageError("The key is for an image classifier; build its tie-break rule without a tokenizer.")
        return None
    if text is None:
        return TextInputs.from_key(key)
    assert key.modality is not None
    check_tokenizer(key.modality, text.tokenizer)
    if text.max_length != int(key.modality["max_length"]):
        raise UsageError(f"The text inputs allow {text.max_length} tokens, the key {key.modality['max_length']}; "
                         "use the key's (TextInputs.from_key).")
    return text


def load_tiebreak_rule(path: str | os.PathLike[str], *, key: Key, featurizer: Featurizer,
                       text: TextInputs | None = None) -> TieBreakRule:
    """Read a rule written by :meth:`TieBreakRule.save` and re-derive its directions from ``key``.

    Args:
        text: For a text key, its tokenization (default: the key's own tokenizer, loaded and checked).

    Raises:
        UsageError: If the file is not a tie-break rule, is for another class count or another key, or ``text``'s
            tokenizer is not the key's.
    """
    tensors, raw = load_tensors(path)
    meta = wmark_metadata(raw)
    if meta.get("scheme") != SCHEME or not {"mean", "projection"} <= set(tensors):
        raise UsageError(f"{path} is not a wmark tie-break rule; build one with `wmark tiebreak build`.")
    if _meta_int(meta, "version", 0, path) != VERSION:
        raise UsageError(f"{path} is a version {meta.get('version')} tie-break rule; rebuild it with this wmark "
                         f"(`wmark tiebreak build`), which reads version {VERSION}.")
    if _meta_int(meta, "num_classes", key.num_classes, path) != key.num_classes:
        raise UsageError(f"The tie-break rule {path} is for {meta['num_classes']} classes, the key for "
                         f"{key.num_classes}.")
    _check_rule_key(meta, key, path)
    text = _check_text(key, text)  # the key's commitment covers its modality: a rule of its key has its kind
    mean, projection = tensors["mean"].numpy(), tensors["projection"].numpy()
    if (mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != len(mean) or projection.shape[1] < 1
            or not (np.isfinite(mean).all() and np.isfinite(projection).all())):
        raise _damaged(path, f"feature map of shapes {tuple(mean.shape)} and {tuple(projection.shape)}, or not finite")
    committed = (tensors["verification_inputs"].numpy() if "verification_inputs" in tensors else
                 unpack_texts(tensors["verification_texts"], tensors["verification_ends"])
                 if "verification_texts" in tensors else None)
    try:
        shape = tuple(int(d) for d in meta.get("input_shape") or key.input_shape)
    except (TypeError, ValueError, OverflowError):
        raise _damaged(path, f"input shape {meta.get('input_shape')!r}") from None
    references = []
    for i, arch in enumerate(meta.get("reference_archs") or []):
        prefix = f"reference{i}/"
        net = build_model(str(arch), num_classes=key.num_classes, input_shape=shape)
        try:
            net.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        except RuntimeError:
            raise UsageError(f"Reference surrogate {i} in the tie-break rule {path} does not fit architecture "
                             f"{arch!r}; the file is damaged, rebuild it with `wmark tiebreak build`.") from None
        references.append((str(arch), net.eval()))
    return TieBreakRule(mean=mean, projection=projection,
                        directions=_directions(key, projection.shape[1]), commitment=key.commitment(),
                        feature_space=str(meta.get("feature_space", "")),
                        model_digest=str(meta.get("model_digest", "")), featurizer=featurizer,
                        verification_inputs=committed,
                        verification=str(meta.get("verification", "")),
                        skipped=_meta_int(meta, "skipped_leading", 0, path), references=tuple(references),
                        served_arch=str(meta.get("served_arch", "")), served_path=str(meta.get("served_path", "")),
                        input_shape=shape, text=text, beta=_meta_beta(meta, path),
                        features_digest=str(meta.get("features_digest", "")))


def _meta_beta(meta: dict[str, Any], path: str | os.PathLike[str]) -> float:
    value = meta.get("beta", DEFAULT_BETA)
    try:
        ok = type(value) in (int, float) and check_beta(float(value))  # a JSON true is no scale
    except OverflowError:  # an integer past float range
        ok = False
    if not ok:
        raise _damaged(path, f"beta {shown_claim(str(value), 40)}")
    return float(value)


def check_beta(beta: float) -> bool:
    """Whether ``beta`` is a scale the tie-break mark can serve: finite, above 0, at most ``MAX_BETA``."""
    return bool(np.isfinite(beta) and 0 < beta <= MAX_BETA)


def _check_rule_key(meta: dict[str, Any], key: Key, path: str | os.PathLike[str]) -> None:
    if meta.get("key_commitment") != key.commitment():
        raise UsageError(f"The tie-break rule {path} was built under another key; use the key that served the API.")


def _meta_int(meta: dict[str, Any], name: str, default: int, path: str | os.PathLike[str]) -> int:
    try:
        return int(meta.get(name, default))
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite count
        raise _damaged(path, f"{name} {meta.get(name)!r}") from None


def _damaged(path: str | os.PathLike[str], what: str) -> UsageError:
    return UsageError(f"The tie-break rule {path} is damaged ({what}); rebuild it with `wmark tiebreak build`.")


def open_tiebreak_rule(*, key: Key, rule: str | os.PathLike[str], served: str | os.PathLike[str] | None = None,
                       arch: str | None = None) -> tuple[TieBreakRule, LocalSuspect]:
    """Load a rule file with the served model it was built from, checked against each other.

    The rule records the served model's architecture, path and digest: the model is loaded from that path
    unless ``served`` gives its new location (the file moved), and its digest must match either way. A rule that
    records no digest (one built through the Python API without ``model_digest``) is refused: any model would
    pass for its served model, so the one serving, logging and verifying need not be the one it was built from.
    The featurizer is the one the rule's feature space names (:mod:`wmark.schemes.tiebreak.features`); a public
    encoder's weights must match the digest the rule records.

    Args:
        key: The owner's key (the rule must be built under it).
        rule: The rule file.
        served: The served model file, only if it is no longer where the rule says.
        arch: Its architecture, only for a rule that records none.

    Returns:
        The rule (featurizer attached) and the served model as a score-exposing local suspect.

    Raises:
        UsageError: If the rule is missing, was built under another key or from another served model file, records
            no served model digest, names a feature space wmark cannot build or was built with other encoder
            weights than the installed ones, or the served model cannot be found.
    """
    from wmark.io import read_metadata, tensors_digest
    from wmark.models import load_model
    from wmark.schemes.tiebreak.features import SERVED, SPACES, rule_featurizer

    if not Path(rule).is_file():
        raise UsageError(f"Tie-break rule {rule} does not exist; build one with `wmark tiebreak build`.")
    meta = wmark_metadata(read_metadata(rule))
    if meta.get("scheme") != SCHEME:
        raise UsageError(f"{rule} is not a wmark tie-break rule; build one with `wmark tiebreak build`.")
    _check_rule_key(meta, key, rule)  # before the served model is built for this key's classes
    if not meta.get("model_digest"):
        # without it any model passes for the served one: the log's binding and the test's pairs and features
        # would follow whichever model is given, chosen after the answers were seen
        raise UsageError(f"The tie-break rule {rule} records no digest of the served model it was built from, so any "
                         "model would pass for it; rebuild it with `wmark tiebreak build` (or build_tiebreak_rule with "
                         "model_digest=tensors_digest(*load_tensors(served_file))).")
    space = str(meta.get("feature_space", ""))
    if space not in SPACES:
        raise UsageError(f"The tie-break rule {rule} reads the feature space {shown_claim(space, 80) or '(none)'}, "
                         f"which wmark cannot build ({SERVED} or {SPACES[1]}); rebuild it with `wmark tiebreak build`, "
                         "or load it with load_tiebreak_rule(featurizer=...) in Python.")
    arch = arch or str(meta.get("served_arch") or "")
    if served is None:
        recorded = str(meta.get("served_path") or "")
        if not recorded or not arch:
            raise UsageError(f"The tie-break rule {rule} does not record its served model; give the served model file "
                             "and its architecture.")
        if not Path(recorded).is_file():
            raise UsageError(f"The served model {recorded} recorded in the tie-break rule {rule} is missing; give its "
                             "new location (the served model file).")
        served = recorded
    if not arch:
        raise UsageError(f"The tie-break rule {rule} does not record the served model's architecture; give it.")
    model, _ = load_model(arch, served, num_classes=key.num_classes, input_shape=tuple(key.input_shape))
    text = TextInputs.from_key(key)
    featurizer, digest = rule_featurizer(space, served_model=model, text=text)
    bound = str(meta.get("features_digest", ""))
    if digest != bound:
        raise UsageError(f"The tie-break rule {rule} was built with other {space} weights (digest "
                         f"{shown_claim(bound, 12) or 'none'}…) than the installed ones ({digest[:12] or 'none'}…); "
                         "rebuild the rule or install the encoder it was built with.")
    loaded = load_tiebreak_rule(rule, key=key, text=text, featurizer=featurizer)
    tensors, raw = load_tensors(served)
    if loaded.model_digest != tensors_digest(tensors, raw):
        raise UsageError(f"The tie-break rule {rule} was built from another served model than {served}; give the "
                         "model file the API served.")
    return loaded, LocalSuspect(model, input_shape=tuple(key.input_shape), description=str(served),
                                expose_scores=True, text=text)


def select_verification_inputs(*, scores: np.ndarray, count: int, min_ratio: float = DEFAULT_PAIR_RATIO,
                               reference_scores: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Indices of the ``count`` inputs whose call between the served model's top two classes is most open.

    Key-independent by construction: it reads only the unmarked served model's scores and, if given, those
    of reference surrogates distilled from it.

    Args:
        scores: The unmarked served model's scores (N×C); its top two classes form each input's pair.
        count: How many to return, best first.
        min_ratio: Without references, only inputs with ``p_b / p_a`` at least this are eligible.
        reference_scores: Scores of reference surrogates (each N×C). Inputs are then ranked by
            ``|mean_r log(p_r(a) / p_r(b))|``, smallest first: where the surrogates, taken together, are
            closest to a tie between the served pair. Without them: largest ``p_b / p_a`` first.
    """
    if not reference_scores:
        ratio = top_pairs(scores)[0]
        candidates = np.flatnonzero(ratio >= min_ratio)
        return candidates[np.argsort(-ratio[candidates], kind="stable")][:count]
    return np.argsort(np.abs(reference_lean(scores, reference_scores)), kind="stable")[:count]


def reference_leans(scores: np.ndarray, reference_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Per reference surrogate and input, ``log(p_lo / p_hi)`` on the served model's top-two pair (R×n)."""
    _, lo, hi = top_pairs(scores)
    rows = []
    for ref in reference_scores:
        if np.shape(ref) != np.shape(scores):
            raise UsageError(f"Reference scores are shaped {np.shape(ref)}, the served model's {np.shape(scores)}.")
        rows.append(pair_log_odds(ref, lo, hi))
    return np.array(rows).reshape(len(rows), len(lo))


def reference_lean(scores: np.ndarray, reference_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Per input, the reference surrogates' mean ``log(p_lo / p_hi)`` on the served model's top-two pair."""
    return reference_leans(scores, reference_scores).mean(axis=0)


def commit_verification_inputs(rule: TieBreakRule, *, served: Suspect, x: np.ndarray,
                               references: Sequence[tuple[str, torch.nn.Module]] = (), count: int = DEFAULT_QUERIES,
                               how: str = "") -> TieBreakRule:
    """The rule with ``count`` ranked verification inputs from the owner's ``x`` committed to it, and the
    references that chose them (saved with the rule, for :func:`tiebreak_log_test`).

    Args:
        rule: A rule from :func:`build_tiebreak_rule`.
        served: The unmarked served model (exposing scores).
        x: The owner's held inputs, never a client's.
        references: Reference surrogates as (architecture, model) (:func:`train_reference_surrogates`);
            none: the served model's nearest ties.
        count: Inputs to commit (the most a verification will ask).
        how: A description of the references, recorded in the file.

    Raises:
        UsageError: When no input qualifies.
    """
    x = rule.inputs(x)
    scores = served_scores(served, x)
    chosen = select_verification_inputs(scores=scores, count=count,
                                        reference_scores=reference_scores(references, x, rule.text))
    if len(chosen) == 0:
        raise UsageError(f"None of the {len(x)} owner inputs is near a tie of the served model; give more inputs.")
    label = (f"{len(references)} reference surrogates ({how})" if references else
             f"nearest ties of the served model (p_b/p_a >= {DEFAULT_PAIR_RATIO})")
    return dataclasses.replace(rule, verification_inputs=x[chosen], verification=label, references=tuple(references))
