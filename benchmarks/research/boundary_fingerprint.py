"""Boundary fingerprints (IPGuard-style, Cao et al. 2021): a baseline with honest, calibrated statistics.

The owner pushes key-chosen inputs of its own data towards the decision boundary between the served
model's top-two classes, stopping just on the top-1 side, and records the model's labels there. A model
derived from the owner's (a copy, or a surrogate that learned its boundary) should keep those labels more
often than an independent model.

There is no exact null here: how often an independent model keeps the labels depends on the data and
the architectures. So the match rate of independent models is *calibrated* on reference models that
took no part in crafting (IPGuard's crafting uses only the owner's model), and a suspect is compared with
it in two ways, both reported:

* ``log10_p`` — exact binomial tail of the suspect's matches against the Clopper-Pearson upper bound (at
  ``confidence``) of the pooled reference match rate. Valid only under the stated assumption that an
  independent suspect's per-point match probability is at most that of the reference population and that
  points are independent. The pooled bound ignores the correlation of points within a model, so this is
  a heuristic and it is never used for an accusation by itself.
* ``rank_log10_p`` — exact under exchangeability of the suspect with the R references:
  (1 + #{references matching at least as often}) / (R + 1). It cannot go below 1/(R + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from wmark.errors import UsageError
from wmark.keys import Key
from wmark.stats import binomial_log10_sf, clopper_pearson_upper


@dataclass
class BoundaryFingerprint:
    """Fingerprint inputs and the owner's labels on them."""

    x: torch.Tensor
    labels: torch.Tensor
    key_fingerprint: str

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"x": self.x.contiguous(), "labels": self.labels.contiguous()}


def craft_boundary_fingerprint(*, model: nn.Module, x: torch.Tensor, key: Key, n: int = 100, steps: int = 60,
                               lr: float = 0.01, margin: float = 0.2, others: float = 1.0) -> BoundaryFingerprint:
    """Craft ``n`` boundary points from key-chosen rows of the owner's data ``x``.

    Each point is moved (Adam on the input, kept in [0, 1]) until the model's top-two logits differ by
    ``margin`` in favour of the original top-1 and every other logit is ``others`` below them.
    """
    if n < 1 or n > len(x):
        raise UsageError(f"Need between 1 and {len(x)} fingerprint points, got {n}.")
    idx = torch.as_tensor(key.permutation("fingerprint/boundary/seeds", len(x))[:n])
    x0 = x[idx].clone().float()
    model.eval()
    with torch.no_grad():
        top2 = model(x0).topk(2, dim=1).indices
    a, b = top2[:, 0], top2[:, 1]
    delta = torch.zeros_like(x0, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    rows = torch.arange(n)
    for _ in range(steps):
        z = model((x0 + delta).clamp(0, 1))
        za, zb = z[rows, a], z[rows, b]
        rest = z.clone()
        rest[rows, a] = -math.inf
        rest[rows, b] = -math.inf
        loss = ((za - zb - margin) ** 2 + torch.relu(rest.max(1).values - torch.minimum(za, zb) + others)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    xf = (x0 + delta.detach()).clamp(0, 1)
    with torch.no_grad():
        labels = model(xf).argmax(1)
    return BoundaryFingerprint(x=xf, labels=labels, key_fingerprint=key.fingerprint())


def match_count(model: nn.Module, fp: BoundaryFingerprint) -> int:
    """How many fingerprint labels ``model`` reproduces."""
    with torch.no_grad():
        return int((model(fp.x).argmax(1) == fp.labels).sum())


def fingerprint_test(*, suspect_matches: int, n: int, reference_matches: list[int],
                     confidence: float = 0.999) -> dict[str, Any]:
    """Compare a suspect's matches with held-out references (see the module docstring for both p-values)."""
    if not reference_matches:
        raise UsageError("A fingerprint needs at least one held-out reference model to calibrate against.")
    pooled = int(sum(reference_matches))
    upper = clopper_pearson_upper(pooled, n * len(reference_matches), confidence)
    ranks = sum(1 for r in reference_matches if r >= suspect_matches)
    return {
        "matches": suspect_matches,
        "n": n,
        "reference_rates": [r / n for r in reference_matches],
        "reference_upper": upper,
        "log10_p": binomial_log10_sf(suspect_matches, n, upper),
        "rank_log10_p": math.log10((1 + ranks) / (len(reference_matches) + 1)),
        "assumption": f"an independent model matches each point with probability <= {upper:.3f} (Clopper-Pearson "
                      f"{confidence} bound of {len(reference_matches)} held-out references), independently",
    }


def rates(models: list[nn.Module], fp: BoundaryFingerprint) -> np.ndarray:
    """Match rates of several models."""
    return np.array([match_count(m, fp) / len(fp.labels) for m in models])
