"""Keyed region marks: an API-side watermark a surrogate learns as part of the task, with an exact null.

:mod:`wmark.schemes.api_mark` flips isolated, keyed inputs; a surrogate that stops training early
generalises over them and inherits nothing. Here the owner marks whole *regions* of input space instead:
every input that falls in a marked region is answered with that region's one keyed label, so "answer
``t`` near these inputs" is a rule a surrogate can fit like any other part of the decision function.
A region is a cell of a Voronoi partition in a fixed feature space: average-pooled pixels (public, but on
Fashion-MNIST cells there are not learned by a 6-epoch surrogate) or the served model's penultimate
features (:func:`wmark.models.penultimate_featurizer`; cells group inputs the way a trained network does). Either is a
fixed function of the input chosen before any suspect exists, which is all the null below needs.

How the map is built (:func:`build_region_map`, once, from the owner's own data ``x``):

* **Cells.** ``num_regions`` centroids: a keyed random sample of the pooled owner inputs, refined by a few
  Lloyd (k-means) iterations so cells hold similar mass. Each input's region is its nearest centroid.
* **Excluded class** ``c_r``: the served model's plurality label on the owner inputs in cell ``r``.
* **Marked cells.** ``num_marked`` cells drawn by a keyed permutation (``PRF_key("api-regions/v1/marked")``).
* **Targets.** For a marked cell, ``t_r`` is exactly uniform on the ``C − 1`` classes other than ``c_r``
  (rejection sampling of key-derived words, ``PRF_key("api-regions/v1/targets")``); targets are derived
  from the key, never stored.

Serving (:class:`RegionMarkedAPI`): an input in a marked cell ``r`` is answered ``t_r``; exposed scores swap
the probabilities of the top-1 and of ``t_r``, so soft-label thieves learn ``t_r`` as strongly as any answer.
The same input always gets the same answer, for every client.

Verification (:func:`region_test`) and why its null is exact. The owner fixes a set of its own held
inputs *before* querying (never inputs a client chose: a client sees a cell's target with its first
answer there and could fill the cell with inputs some innocent model happens to answer ``t_r``). The
suspect ``f`` answers them; per marked cell ``r`` with at least ``min_inputs`` of them, take the
plurality of ``f``'s answers that differ from ``c_r`` (ties go to the smallest class index; a cell where
``f`` only answers ``c_r`` is skipped). ``H0``: ``f`` was made without access to the marked answers.
Under ``H0`` (HMAC-SHA256 as a pseudo-random function) the targets are independent of ``f``, of the
cells, of which cells are marked and of each other; the per-cell plurality is a function of ``f`` and
``c_r`` only; so each cell matches with probability exactly ``1/(C − 1)``, independently across cells,
and the number of matching cells among the ``m`` counted is Binomial(m, 1/(C − 1)). The default ``count``
statistic uses partial learning too: T = answers equal to their cell's target; given the suspect's
answers, each cell adds the count of a uniformly drawn non-excluded class, independently, so T's exact
law is a convolution over cells (:func:`count_statistic_log10_sf`). Aggregating per cell matters: inputs
of one cell share one target, so per-input matches are *not* independent and a per-input binomial would
be invalid.

Example:
    >>> import numpy as np
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME", num_classes=4, input_shape=(6,))
    >>> x = np.random.default_rng(0).random((200, 6), dtype=np.float32)
    >>> rmap = build_region_map(key=key, x=x, served_labels=np.zeros(200, dtype=np.int64), num_regions=8,
    ...                         num_marked=2)
    >>> set(rmap.targets.tolist()) <= {1, 2, 3}
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError
from wmark.evidence import TestResult, check_suspect_fits_key, owner_inputs
from wmark.io import load_tensors, save_tensors, wmark_metadata
from wmark.keys import Key
from wmark.schemes.api_mark import query_with_scores
from wmark.stats import binomial_log10_sf
from wmark.suspects.base import Answers, Suspect

SCHEME = "api-regions"
VERSION = 1
DEFAULT_REGIONS = 500
DEFAULT_MARKED = 8
DEFAULT_POOL = 4


def pooled_features(x: np.ndarray, *, pool: int) -> np.ndarray:
    """The public feature space: inputs average-pooled by ``pool`` over their last two axes, flattened.

    Inputs whose last two axes ``pool`` does not divide (or flat vectors) are used as they are.
    """
    arr = np.asarray(x, dtype=np.float32)
    if pool > 1 and arr.ndim >= 3 and arr.shape[-1] % pool == 0 and arr.shape[-2] % pool == 0:
        h, w = arr.shape[-2], arr.shape[-1]
        arr = arr.reshape(*arr.shape[:-2], h // pool, pool, w // pool, pool).mean(axis=(-3, -1))
    return arr.reshape(len(arr), -1)


Featurizer = Callable[[np.ndarray], np.ndarray]
PIXELS = "pooled-pixels"


def _nearest(feats: np.ndarray, centroids: np.ndarray, chunk: int = 4096) -> np.ndarray:
    c2 = (centroids.astype(np.float64) ** 2).sum(1)
    out = np.empty(len(feats), dtype=np.int64)
    for i in range(0, len(feats), chunk):
        f = feats[i:i + chunk].astype(np.float64)
        out[i:i + chunk] = np.argmin(c2[None, :] - 2.0 * f @ centroids.T.astype(np.float64), axis=1)
    return out


def _targets(key: Key, excluded: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Per marked cell, a label exactly uniform on the classes other than the cell's excluded class."""
    c = key.num_classes
    draws = key.labels(f"{SCHEME}/v{VERSION}/targets", len(marked), c - 1)
    ex = excluded[marked]
    return np.where(draws >= ex, draws + 1, draws).astype(np.int64)


@dataclass(frozen=True)
class RegionMap:
    """The owner's keyed partition and its marked cells.

    Attributes:
        centroids: Cell centres in the pooled feature space (K×d).
        excluded: Per cell, the served model's plurality label on the owner's inputs there (K).
        marked: Indices of the marked cells (M).
        targets: Per marked cell, its keyed answer (M); derived from the key, never stored.
        pool: Pooling factor of the pixel feature space.
        commitment: The key commitment the map was built under.
        feature_space: ``pooled-pixels`` or the name of the featurizer (e.g. ``victim-penultimate``).
        featurizer: The feature function for a non-pixel space (not stored; pass it again when loading).
    """

    centroids: np.ndarray
    excluded: np.ndarray
    marked: np.ndarray
    targets: np.ndarray
    pool: int
    commitment: str
    feature_space: str = PIXELS
    featurizer: Featurizer | None = None

    def features(self, x: np.ndarray) -> np.ndarray:
        """Inputs mapped into the map's feature space."""
        return pooled_features(x, pool=self.pool) if self.featurizer is None else self.featurizer(x)

    def regions(self, x: np.ndarray) -> np.ndarray:
        """The cell index of each input."""
        return _nearest(self.features(x), self.centroids)

    def target_of(self, regions: np.ndarray) -> np.ndarray:
        """Per input cell index, the keyed answer (−1 where the cell is not marked)."""
        lookup = np.full(len(self.centroids), -1, dtype=np.int64)
        lookup[self.marked] = self.targets
        return lookup[np.asarray(regions, dtype=np.int64)]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the map (centroids, excluded classes, marked cells; no targets) as safetensors."""
        tensors = {"centroids": torch.from_numpy(np.ascontiguousarray(self.centroids, dtype=np.float32)),
                   "excluded": torch.from_numpy(self.excluded.astype(np.int64)),
                   "marked": torch.from_numpy(self.marked.astype(np.int64))}
        save_tensors(tensors, path, metadata={"scheme": SCHEME, "version": VERSION, "pool": self.pool,
                                              "key_commitment": self.commitment,
                                              "feature_space": self.feature_space})


def build_region_map(*, key: Key, x: np.ndarray, served_labels: np.ndarray, num_regions: int = DEFAULT_REGIONS,
                     num_marked: int = DEFAULT_MARKED, pool: int = DEFAULT_POOL, iterations: int = 5,
                     featurizer: Featurizer | None = None, feature_space: str | None = None) -> RegionMap:
    """Build the keyed region map from the owner's inputs and the served model's labels on them.

    Args:
        key: The owner's key.
        x: Owner inputs (N×input shape) used to place the cells; keep them apart from verification inputs.
        served_labels: The served model's top-1 on ``x``.
        num_regions: Number of cells K.
        num_marked: Number of marked cells M (the accuracy cost is about M/K of the traffic).
        pool: Average-pooling factor of the feature space.
        iterations: Lloyd iterations after the keyed initialisation.
        featurizer: A fixed feature function (e.g. :func:`wmark.models.penultimate_featurizer` of the served model);
            default: average-pooled pixels.
        feature_space: Name recorded for the featurizer's space (required with ``featurizer``).

    Returns:
        The map; its targets are derived from ``key``.

    Raises:
        UsageError: On inconsistent sizes.
    """
    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(served_labels, dtype=np.int64)
    if len(labels) != len(x):
        raise UsageError(f"served_labels has {len(labels)} entries for {len(x)} inputs; give one label per input.")
    if not 2 <= num_regions <= len(x):
        raise UsageError(f"num_regions must be between 2 and the number of owner inputs ({len(x)}), got {num_regions}.")
    if not 1 <= num_marked <= num_regions:
        raise UsageError(f"num_marked must be between 1 and num_regions ({num_regions}), got {num_marked}.")
    if key.num_classes < 3:
        raise UsageError("Region marks need at least 3 classes: with 2, the target is fixed by the excluded class.")
    if (featurizer is None) != (feature_space is None or feature_space == PIXELS):
        raise UsageError("Name the feature space (feature_space=...) exactly when a featurizer is given.")
    feats = pooled_features(x, pool=pool) if featurizer is None else featurizer(x)
    centroids = feats[key.permutation(f"{SCHEME}/v{VERSION}/init", len(feats))[:num_regions]].astype(np.float64)
    for _ in range(iterations):
        assign = _nearest(feats, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, feats)
        counts = np.bincount(assign, minlength=num_regions)
        filled = counts > 0  # an emptied cell keeps its old centre
        centroids[filled] = sums[filled] / counts[filled, None]
    assign = _nearest(feats, centroids)
    excluded = np.zeros(num_regions, dtype=np.int64)
    for r in range(num_regions):
        cell = labels[assign == r]
        excluded[r] = int(np.bincount(cell, minlength=key.num_classes).argmax()) if len(cell) else 0
    marked = np.sort(key.permutation(f"{SCHEME}/v{VERSION}/marked", num_regions)[:num_marked]).astype(np.int64)
    return RegionMap(centroids=centroids.astype(np.float32), excluded=excluded, marked=marked,
                     targets=_targets(key, excluded, marked), pool=pool, commitment=key.commitment(),
                     feature_space=feature_space or PIXELS, featurizer=featurizer)


def load_region_map(path: str | os.PathLike[str], *, key: Key, featurizer: Featurizer | None = None) -> RegionMap:
    """Read a map written by :meth:`RegionMap.save` and re-derive its targets from ``key``.

    Raises:
        UsageError: If the file is not a region map, was built under another key, or needs a featurizer.
    """
    tensors, raw = load_tensors(path)
    meta = wmark_metadata(raw)
    if meta.get("scheme") != SCHEME or not {"centroids", "excluded", "marked"} <= set(tensors):
        raise UsageError(f"{path} is not a wmark region map; build one with build_region_map.")
    if meta.get("key_commitment") != key.commitment():
        raise UsageError(f"The region map {path} was built under another key; use the key that served the API.")
    space = str(meta.get("feature_space", PIXELS))
    if (space == PIXELS) != (featurizer is None):
        raise UsageError(f"The region map {path} lives in the feature space {space!r}; pass its featurizer exactly "
                         "when the space is not pooled-pixels.")
    excluded = tensors["excluded"].numpy().astype(np.int64)
    marked = tensors["marked"].numpy().astype(np.int64)
    return RegionMap(centroids=tensors["centroids"].numpy().astype(np.float32), excluded=excluded, marked=marked,
                     targets=_targets(key, excluded, marked), pool=int(meta["pool"]), commitment=key.commitment(),
                     feature_space=space, featurizer=featurizer)


class RegionMarkedAPI:
    """A serving wrapper that answers inputs in marked cells with the cell's keyed label.

    Args:
        key: The owner's key.
        backend: The served model; it must expose scores.
        regions: The region map built under ``key``.
    """

    def __init__(self, *, key: Key, backend: Suspect, regions: RegionMap) -> None:
        if regions.commitment != key.commitment():
            raise UsageError("The region map was built under another key; build it with the serving key.")
        if backend.num_classes != key.num_classes:
            raise UsageError(f"The served model has {backend.num_classes} classes but the key {key.num_classes}; "
                             "serve the model the key was made for.")
        self.key, self.backend, self.map = key, backend, regions
        self.num_classes = key.num_classes
        self.input_shape = tuple(key.input_shape)
        self.description = f"region-marked {backend.description}"

    def query(self, inputs: np.ndarray) -> Answers:
        x, scores, labels = query_with_scores(self.backend, inputs, tuple(self.input_shape))
        target = self.map.target_of(self.map.regions(x))
        for i in np.flatnonzero(target >= 0):
            top, t = int(np.argmax(scores[i])), int(target[i])
            scores[i, [top, t]] = scores[i, [t, top]]
            labels[i] = t
        return Answers(labels=labels, scores=scores)


def cell_pluralities(answers: np.ndarray, regions: np.ndarray, excluded: np.ndarray,
                     num_classes: int) -> dict[int, tuple[int, int, int]]:
    """Per cell: (plurality of answers other than the excluded class, its count, inputs answered).

    Ties go to the smallest class index, so the plurality is a function of the answers alone. Cells where
    every answer is the excluded class or an abstention (−1) get plurality −1.
    """
    out = {}
    for r in np.unique(regions):
        a = answers[regions == r]
        a = a[a >= 0]
        counts = np.bincount(a, minlength=num_classes)
        counts[excluded[r]] = 0
        best = int(counts.argmax()) if counts.max() > 0 else -1
        out[int(r)] = (best, int(counts.max()), len(a))
    return out


def count_statistic_log10_sf(observed: int, cell_counts: list[np.ndarray]) -> float:
    """log10 P(T >= observed) for T = sum over cells of one entry drawn uniformly from each cell's counts.

    Each cell contributes ``counts[j]`` with probability ``1/len(counts)``, independently; the exact law of
    the sum is the convolution of the cells' laws, computed in log space so it never underflows.
    """
    log_pmf = np.array([0.0])
    for counts in cell_counts:
        cell = np.full(int(max(counts)) + 1, -np.inf)
        values, mult = np.unique(np.asarray(counts, dtype=np.int64), return_counts=True)
        cell[values] = np.log(mult / len(counts))
        out = np.full(len(log_pmf) + len(cell) - 1, -np.inf)
        for v in values:
            out[v:v + len(log_pmf)] = np.logaddexp(out[v:v + len(log_pmf)], log_pmf + cell[v])
        log_pmf = out
    if observed >= len(log_pmf):
        return -np.inf
    tail = log_pmf[max(observed, 0):]
    return float(min(0.0, np.logaddexp.reduce(tail) / np.log(10)))


def region_test(*, key: Key, regions: RegionMap, suspect: Suspect, inputs: np.ndarray,
                min_inputs: int = 5, statistic: str = "count") -> TestResult:
    """Test whether a suspect answers the marked cells with their keyed labels.

    Args:
        key: The owner's key (the map must have been built under it).
        regions: The region map.
        suspect: The model under test.
        inputs: The owner's own held inputs, fixed before querying (never inputs a client chose).
        min_inputs: Cells with fewer of ``inputs`` are not counted (and not queried).
        statistic: ``count`` (default): T = the number of answers equal to their cell's target, summed over
            cells; its exact null law given the suspect's answers is the convolution over cells of a uniform
            draw among the cell's counts of the C − 1 non-excluded classes (each cell's target is such a
            draw, independently). ``plurality``: the number of cells whose plurality non-excluded answer is
            the target, Binomial(cells, 1/(C − 1)). Both are exact; ``count`` uses partial learning.

    Returns:
        A ``TestResult`` (``evidence_of="extracted"``) with the exact binomial p-value over counted cells.

    Raises:
        UsageError: On a key/map/suspect mismatch or when no marked cell has ``min_inputs`` inputs.
    """
    if statistic not in ("count", "plurality"):
        raise UsageError(f"statistic must be 'count' or 'plurality', got {statistic!r}.")
    if regions.commitment != key.commitment():
        raise UsageError("The region map was built under another key; verify with the key that served the API.")
    check_suspect_fits_key(key, suspect)
    x = owner_inputs(key, inputs)
    cells = regions.regions(x)
    target = regions.target_of(cells)
    sizes = {int(r): int((cells == r).sum()) for r in regions.marked}
    keep = np.isin(cells, [r for r, n in sizes.items() if n >= min_inputs])
    if not keep.any():
        raise UsageError(f"No marked cell holds {min_inputs} of the {len(x)} verification inputs; give more held "
                         "inputs from the owner's distribution or lower min_inputs.")
    answers = np.asarray(suspect.query(x[keep]).labels, dtype=np.int64)
    per_cell = cell_pluralities(answers, cells[keep], regions.excluded, key.num_classes)
    p0 = 1.0 / (key.num_classes - 1)
    counted = {r: v for r, v in per_cell.items() if v[0] >= 0}
    cell_matches = sum(int(v[0] == int(regions.target_of(np.array([r]))[0])) for r, v in counted.items())
    plurality_log10_p = binomial_log10_sf(cell_matches, len(counted), p0)
    input_matches = int((answers == target[keep]).sum())
    cell_counts = []
    for r in np.unique(cells[keep]):
        a = answers[cells[keep] == r]
        n = np.bincount(a[a >= 0], minlength=key.num_classes)
        cell_counts.append(np.delete(n, regions.excluded[r]))
    count_log10_p = count_statistic_log10_sf(input_matches, cell_counts)
    why = ("per marked cell, the keyed target is uniform on the C-1 classes other than the cell's excluded class, "
           "independently across cells and of a suspect made without the marked answers")
    null: dict[str, Any]
    if statistic == "count":
        log10_p, matches, method = count_log10_p, input_matches, "exact convolution over marked cells"
        null = {"why": why + "; the answers equal to their cell's target then sum to an exactly known law"}
    else:
        log10_p, matches, method = plurality_log10_p, cell_matches, "exact binomial over marked cells"
        null = {"p_per_cell": p0, "why": why + "; each cell's plurality non-excluded answer matches it with "
                "probability exactly 1/(C-1)"}
    return TestResult(
        name=SCHEME, evidence_of="extracted", null=null, log10_p=log10_p, queries=int(keep.sum()), matches=matches,
        abstentions=int((answers < 0).sum()), method=method,
        details={"statistic": statistic, "cells_counted": len(counted), "cells_marked": len(regions.marked),
                 "input_matches": input_matches, "cell_matches": cell_matches,
                 "count_log10_p": count_log10_p, "plurality_log10_p": plurality_log10_p, "cell_sizes": sizes},
    )


def accuracy_cost(*, regions: RegionMap, x: np.ndarray, y: np.ndarray, served_labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of the served labels vs the region-marked answers on labelled inputs (honest users' cost)."""
    target = regions.target_of(regions.regions(x))
    marked = np.where(target >= 0, target, served_labels)
    plain = float((served_labels == y).mean())
    api = float((marked == y).mean())
    return {"served_accuracy": plain, "api_accuracy": api, "accuracy_cost_pp": 100 * (plain - api),
            "marked_fraction": float((target >= 0).mean()),
            "changed_fraction": float((marked != served_labels).mean())}
