"""What the references share with the served model: a research feature map (measured, not adopted).

Record: ``docs/research/extraction-families.md``.

The library's map keeps the served model's largest whitened feature directions, whatever a surrogate makes of
them. A thief learns a keyed lean best along features it builds for the task anyway (every map tried that read
less task-bound features did worse), so :func:`shared_rule` keeps instead the whitened served directions that
key-free surrogates of other architectures represent best: per reference, a ridge regression of the served
model's whitened features on the reference's own penultimate features on the owner's inputs; the mean of the
predicted parts' covariance (R^2 per direction, between 0 and 1, as the served features are whitened); its
leading eigenvectors. The map reads the served model, the owner's inputs and the references, never the key, so
the test's null is the library's exact N(0, 1). Side by side with the principal map
(``benchmarks/tiebreak_invariance.py --maps principal64,shared32-mlp``) it was no stronger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wmark.keys import Key
from wmark.models import penultimate_featurizer
from wmark.schemes.tiebreak import TieBreakRule, build_tiebreak_rule

RIDGE = 1e-3


def shared_variance(psi: np.ndarray, reference_features: Sequence[np.ndarray], *, ridge: float = RIDGE) -> np.ndarray:
    """The mean over references of the covariance of ``psi`` (n×k, whitened) predicted linearly from each
    reference's features (n×d): a k×k matrix whose diagonal is each direction's R^2."""
    psi = np.asarray(psi, dtype=np.float64)
    psi = psi - psi.mean(axis=0)
    out = np.zeros((psi.shape[1], psi.shape[1]))
    for g in reference_features:
        g = np.asarray(g, dtype=np.float64)
        g = g - g.mean(axis=0)
        gram = g.T @ g
        fit = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), g.T @ psi)
        pred = g @ fit
        out += pred.T @ pred / len(psi)
    return out / max(len(reference_features), 1)


def shared_rule(*, key: Key, x: np.ndarray, featurizer: Any, feature_space: str,
                references: Sequence[tuple[str, torch.nn.Module]], components: int) -> tuple[TieBreakRule, np.ndarray]:
    """A tie-break rule on the ``components`` directions of the library's whitened space (its default principal
    directions) that the references represent best, and the R^2 along every eigenvector (largest first)."""
    full = build_tiebreak_rule(key=key, x=x, featurizer=featurizer, feature_space=feature_space)
    psi = full.features(x)
    feats = [penultimate_featurizer(net)(x) for _, net in references]
    values, vectors = np.linalg.eigh(shared_variance(psi, feats))
    order = np.argsort(values)[::-1]
    basis = vectors[:, order[:components]]
    small = build_tiebreak_rule(key=key, x=x, featurizer=featurizer, feature_space=feature_space,
                                components=components)
    return dataclasses.replace(small, projection=full.projection @ basis), values[order]
