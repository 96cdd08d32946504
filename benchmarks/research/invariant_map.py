"""A shift-invariant feature map for the tie-break rule (measured, not adopted: ``docs/research/extraction-families.md``).

A surrogate trained with augmentation fits one label to every transformed copy of a query, so it can learn the
keyed shift only along feature directions the transforms leave in place. :func:`invariant_rule` builds a
tie-break rule whose ``k`` whitened directions are those that move least under the given transforms (the
generalised eigenvectors of the features' covariance against the mean covariance of the change a transform
makes). The map reads the owner's inputs and the served model only, never the key, so the test's null is the
library's exact N(0, 1). Side by side with the principal map (``benchmarks/tiebreak_invariance.py``) it was not
better across thieves and keys, so the library keeps the principal map.

Example:
    >>> inv = image_shifts(1)
    >>> len(inv.transforms), inv.name
    (8, 'shifts of up to 1 pixel')
    >>> inv.transforms[-1](np.ones((1, 1, 3, 3), np.float32))[0, 0]  # one down, one right
    array([[0., 0., 0.],
           [0., 1., 1.],
           [0., 1., 1.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.schemes.tiebreak import TieBreakRule, build_tiebreak_rule
from wmark.schemes.tiebreak.rule import EIGEN_FLOOR

INVARIANCE_INPUTS = 2000
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Invariance:
    """Input transforms a surrogate may train with (its data augmentation).

    Attributes:
        name: What the transforms are, e.g. ``"shifts of up to 2 pixels"``.
        transforms: Functions from a batch of inputs to the transformed batch (same shape).
    """

    name: str
    transforms: tuple[Transform, ...]


def image_shifts(max_shift: int = 2) -> Invariance:
    """Every translation of an image batch (N×C×H×W) by up to ``max_shift`` pixels in each axis, the uncovered
    border filled with zeros (what random crops of a padded image give)."""
    if max_shift < 1:
        raise UsageError(f"max_shift must be at least 1 pixel, got {max_shift}.")

    def shift(dy: int, dx: int) -> Transform:
        def move(x: np.ndarray) -> np.ndarray:
            arr = np.asarray(x)
            if arr.ndim < 3:
                raise UsageError(f"Image shifts take image batches (N×C×H×W), got inputs shaped {arr.shape}.")
            out = np.zeros_like(arr)
            h, w = arr.shape[-2:]
            out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                arr[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
            return out
        return move

    moves = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
             if (dy, dx) != (0, 0)]
    return Invariance(name=f"shifts of up to {max_shift} pixel{'s' if max_shift > 1 else ''}",
                      transforms=tuple(shift(dy, dx) for dy, dx in moves))


def invariant_projection(x: np.ndarray, featurizer: Callable[[np.ndarray], Any], *, invariance: Invariance,
                         components: int) -> tuple[np.ndarray, np.ndarray]:
    """The features' mean (D) and the ``components`` whitened directions with the least variance under the
    transforms (D×k; each of unit variance over ``x``)."""
    if not invariance.transforms:
        raise UsageError(f"The invariance {invariance.name!r} has no transforms; give at least one.")
    feats = np.asarray(featurizer(x), dtype=np.float64)
    mean = feats.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.atleast_2d(np.cov((feats - mean).T)))
    live = evals > EIGEN_FLOOR * max(float(evals[-1]), 1e-300)
    if components > int(live.sum()):
        raise UsageError(f"The features vary in only {int(live.sum())} directions; keep at most that many.")
    basis = evecs[:, live] / np.sqrt(evals[live])
    sample = np.asarray(x[:INVARIANCE_INPUTS])
    base = (feats[:len(sample)] - mean) @ basis
    moved = np.zeros((basis.shape[1], basis.shape[1]))
    for transform in invariance.transforms:
        out = np.asarray(transform(sample))
        if out.shape != sample.shape:
            raise UsageError(f"A transform of {invariance.name!r} turned inputs shaped {sample.shape[1:]} into "
                             f"{out.shape[1:]}; it must keep the shape.")
        change = (np.asarray(featurizer(out), dtype=np.float64) - mean) @ basis - base
        moved += change.T @ change / len(change)
    _, rotation = np.linalg.eigh(moved / len(invariance.transforms))
    return mean, basis @ rotation[:, :components]


def invariant_rule(*, invariance: Invariance, components: int, **build: Any) -> TieBreakRule:
    """:func:`~wmark.schemes.tiebreak.build_tiebreak_rule` (``build`` its arguments: ``key``, ``x``, ``featurizer``,
    ``feature_space``) with the invariant feature map in place of the principal one; the key's directions are
    the library's for ``components`` directions."""
    rule = build_tiebreak_rule(components=components, **build)
    mean, projection = invariant_projection(np.asarray(build["x"]), build["featurizer"], invariance=invariance,
                                            components=components)
    return dataclasses.replace(rule, mean=mean, projection=projection)


class PooledFeaturizer:
    """Features from a conv layer's output pooled over space: its global average per channel and, with
    ``quadrants``, its average over each quadrant (2 × 2 grid), after a ReLU. Averages over large regions move little when the image
    shifts by a pixel or two, and the channels are the served model's own learnt filters. Reads the served
    model only (no key). Runs the model once per call (a second pass next to the served answer).

    Args:
        model: The served classifier.
        layer: The name of the conv module whose output is pooled (as in ``model.named_modules()``).
        quadrants: Add the quadrant averages (4 × the channels) to the global ones.
        batch_size: Inputs per forward pass.
    """

    def __init__(self, model: Any, layer: str, *, quadrants: bool = True, batch_size: int = 1024) -> None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise UsageError(f"The model has no module {layer!r}; name one of {sorted(n for n in modules if n)}.")
        self.model, self.layer, self.quadrants, self.batch_size = model, modules[layer], quadrants, batch_size

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        captured: list[Any] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        chunks = []
        try:
            self.model.eval()
            with torch.no_grad():
                for i in range(0, len(x), self.batch_size):
                    captured.clear()
                    self.model(torch.as_tensor(np.asarray(x[i:i + self.batch_size], dtype=np.float32)))
                    act = torch.relu(captured[0])
                    parts = [act.mean(dim=(2, 3))]
                    if self.quadrants:
                        parts.append(torch.nn.functional.adaptive_avg_pool2d(act, 2).flatten(1))
                    chunks.append(torch.cat(parts, dim=1).numpy())
        finally:
            handle.remove()
        return np.concatenate(chunks).astype(np.float32)
