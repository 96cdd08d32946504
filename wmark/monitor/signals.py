"""Per-client extraction signals over a sliding window of the client's recent queries.

Each query is reduced to a few numbers (a :class:`FeatureMap` fitted on the owner's natural inputs) and a
fixed-size record; every ``check_every`` queries the window's signals are computed. All are published
heuristics for spotting model extraction from a query stream, and each rests on an assumption:

* ``prada`` — PRADA (Juuti et al., EuroS&P 2019): for each new query, the minimum L2 distance to the
  client's earlier queries (here: in the reduced feature space, against the last ``store`` distinct ones,
  all classes together rather than per predicted class). *Assumes* natural inputs give a roughly normal
  set of such distances, while synthetic chains (seeds plus small perturbations of them) give a skewed,
  multi-modal one. The statistic is ``1 - W`` with ``W`` the Shapiro–Wilk statistic of the window's
  distances. Repeats (within ``REPEAT_RADIUS``: the same input) are left out: re-sending the same input is what honest clients do.
  Where the caller gives each query an exact key (a digest of each text, for text), a repeat is a query whose
  key was seen before instead: a projection of a sparse bag of tokens can map a copy with one word swapped (or
  its words reordered) onto its source, which must count as a near duplicate, not as the same input.
* ``near_dup`` — the JBDA-style synthetic signal (Papernot et al. 2017): the share of queries that lie
  within ``near_radius`` of an earlier query without being a repeat. *Assumes* honest clients do not send
  many slightly perturbed copies of their own inputs.
* ``ood`` — the share of queries the owner's natural data would not produce: residual norm outside the
  feature map's principal subspace above the 99.9 % quantile of the owner's own inputs. *Assumes* the
  owner's inputs are representative of honest traffic; noise and perturbed inputs leave that subspace.
* ``coverage`` — after Kesarwani et al. 2018 (the share of the model's decision regions a client has
  explored): the effective number (``exp`` of the entropy) of predicted classes — the decision regions
  the window's inputs fall in — over the number of classes. The entropy form keeps a few stray queries
  from counting as exploration. *Assumes* an honest client serves one task and so touches few regions;
  a broad honest client (a benchmark, a whole test set) breaks this assumption and looks like a thief.
* ``near_tie`` — the share of queries whose runner-up probability is at least ``near_tie_ratio`` of the
  top one (near a decision boundary). *Assumes* honest inputs are mostly confidently classified while
  boundary-seeking extraction is not.

Memory is bounded per client: ``store`` feature vectors of ``dim`` floats plus ``window`` records.

Example:
    >>> import numpy as np
    >>> fmap = fit_feature_map(x=np.random.default_rng(0).random((400, 16)), dim=4)
    >>> state = ClientState(dim=4, num_classes=3, config=MonitorConfig(window=64, min_queries=32))
    >>> x = np.random.default_rng(1).random((64, 16))
    >>> probs = np.tile([0.8, 0.15, 0.05], (64, 1))
    >>> sorted(state.observe(*fmap.transform(x), probs))
    ['coverage', 'near_dup', 'near_tie', 'ood', 'prada']
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from wmark.errors import UsageError

SIGNALS = ("prada", "near_dup", "ood", "coverage", "near_tie")
# Same input up to float rounding of the projection (natural neighbours are ~1 apart in these units).
REPEAT_RADIUS = 1e-3
_MIN_SHAPIRO = 20


@dataclass(frozen=True)
class MonitorConfig:
    """How the per-client window is kept and checked.

    Attributes:
        window: Queries the signals look back over.
        store: Distinct earlier queries (reduced features) kept for the nearest-distance search.
        check_every: Queries between two evaluations of the signals.
        min_queries: Queries before the first evaluation.
        near_tie_ratio: Runner-up / top probability ratio from which a query counts as a near tie.

    Raises:
        UsageError: If a count is below 1 or the ratio is outside (0, 1] (an empty store or window crashed the
            first request; a ratio of 0 or less made every query a near tie).
    """

    window: int = 256
    store: int = 2048
    check_every: int = 32
    min_queries: int = 128
    near_tie_ratio: float = 0.5

    def __post_init__(self) -> None:
        counts = {"window": self.window, "store": self.store, "check_every": self.check_every,
                  "min_queries": self.min_queries}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"The monitor's {name} must be an integer of at least 1, not {value!r}.")
        if isinstance(self.near_tie_ratio, bool) or not isinstance(self.near_tie_ratio, int | float) \
                or not 0 < self.near_tie_ratio <= 1:
            raise UsageError(f"The monitor's near_tie_ratio must be in (0, 1], not {self.near_tie_ratio!r}.")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class FeatureMap:
    """A principal-subspace projection fitted on the owner's natural inputs.

    Attributes:
        mean: Mean input, flattened (D,).
        components: D×k orthonormal principal directions.
        near_radius: Distance below which a non-repeat counts as a near duplicate (0.1 % quantile of
            nearest-neighbour distances among the owner's inputs).
        ood_radius: Residual norm above which an input counts as out of distribution (99.9 % quantile of
            the owner's inputs).
    """

    mean: np.ndarray
    components: np.ndarray
    near_radius: float
    ood_radius: float

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def transform(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced features (N×k) and residual norms (N,) of a batch of inputs."""
        flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1) - self.mean
        feats = flat @ self.components
        residual = np.sqrt(np.maximum((flat * flat).sum(1) - (feats * feats).sum(1), 0.0))
        return feats.astype(np.float32), residual.astype(np.float32)


def fit_feature_map(*, x: np.ndarray, dim: int = 32, seed: int = 0, sample: int = 8000) -> FeatureMap:
    """Fit the reduced feature space and its two radii on the owner's natural inputs.

    Half of a random sample fits the principal directions, the other half sets the radii (so the residual
    quantile is not measured on the inputs that shaped the subspace).

    Args:
        x: Natural inputs, N×… (at least 2·``dim`` of them).
        dim: Principal directions kept.
        seed: Seed of the sample.
        sample: Most inputs used.

    Raises:
        UsageError: If ``dim`` is below 1 (0 crashed, and a negative one silently dropped directions from the end),
            or there are too few inputs, or too few distinct ones, to set the radii.
    """
    if dim < 1:
        raise UsageError(f"The reduced feature dimension (--dim) must be at least 1, got {dim}.")
    need = max(2 * dim, 4)
    if min(len(x), sample) < need:
        # with fewer, the radii were NaN or infinite (every query then a near duplicate, or none ever out of place)
        raise UsageError(f"Fitting the monitor's feature space with dimension {dim} needs at least {need} natural "
                         f"inputs, got {min(len(x), sample)}.")
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(flat))[:sample]
    fit, held = flat[idx[: len(idx) // 2]], flat[idx[len(idx) // 2:]]
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    components = vt[: min(dim, vt.shape[0])].T.astype(np.float32)
    probe = FeatureMap(mean.astype(np.float32), components, 0.0, 0.0)
    feats, residual = probe.transform(held)
    d2 = _sqdist(feats, feats)
    np.fill_diagonal(d2, np.inf)
    nearest = np.sqrt(d2.min(1))
    nearest = nearest[nearest > 1e-6]
    if not len(nearest):
        raise UsageError("The natural inputs the monitor's feature space is fitted on are all the same input; give "
                         "the owner's varied natural inputs.")
    return FeatureMap(probe.mean, components, float(np.quantile(nearest, 0.001)), float(np.quantile(residual, 0.999)))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # float64: the expansion |a|² + |b|² - 2ab cancels, and float32 would turn repeats into near duplicates.
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T), 0.0)


def effective_count(values: np.ndarray) -> float:
    """``exp`` of the entropy of the values' histogram: how many distinct values, weighted by use."""
    if not len(values):
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@functools.lru_cache(maxsize=64)
def _shapiro_weights(n: int) -> np.ndarray:
    """Royston's (1992, AS R94) approximation of the Shapiro–Wilk coefficients for ``n`` > 11 values."""
    m = stats.norm.ppf((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    mm = float(m @ m)
    u = 1.0 / np.sqrt(n)
    an = m[-1] / np.sqrt(mm) + np.polyval([-2.706056, 4.434685, -2.071190, -0.147981, 0.221157, 0.0], u)
    an1 = m[-2] / np.sqrt(mm) + np.polyval([-3.582633, 5.682633, -1.752461, -0.293762, 0.042981, 0.0], u)
    phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an ** 2 - 2 * an1 ** 2)
    a = m / np.sqrt(phi)
    a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    return a


def shapiro_statistic(values: np.ndarray) -> float:
    """Shapiro–Wilk ``W`` of ``values`` (1.0 when there are too few, or they are all equal).

    The coefficients are Royston's approximation, as in scipy's ``shapiro``, cached per sample size: the
    monitor evaluates it on every check of every client, where scipy's per-call overhead would dominate.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    if len(v) < _MIN_SHAPIRO or v[-1] - v[0] <= 1e-12:
        return 1.0
    centred = v - v.mean()
    return float(min(1.0, (_shapiro_weights(len(v)) @ v) ** 2 / (centred @ centred)))


class ClientState:
    """The bounded record of one client's queries and its latest signals.

    Args:
        dim: Reduced feature dimension.
        num_classes: Classes the model answers over.
        config: Window sizes and cadence.
        near_radius: See :class:`FeatureMap` (0 disables ``near_dup``).
        ood_radius: See :class:`FeatureMap` (``inf`` disables ``ood``).
    """

    def __init__(self, *, dim: int, num_classes: int, config: MonitorConfig, near_radius: float = 0.0,
                 ood_radius: float = float("inf")) -> None:
        self.config = config
        self.num_classes = num_classes
        self.near_radius = near_radius
        self.ood_radius = ood_radius
        self.store = np.zeros((config.store, dim), dtype=np.float32)
        self.store_sq = np.zeros(config.store, dtype=np.float32)  # cached squared norms of the stored rows
        self.stored = 0
        self.store_pos = 0
        # the exact keys of the stored rows, where the caller gives them (slot -> key, and the set of them)
        self.store_keys: list[bytes | None] = [None] * config.store
        self.known: set[bytes] = set()
        w = config.window
        self.dmin = np.full(w, np.nan)
        self.near = np.zeros(w, dtype=bool)
        self.ood = np.zeros(w, dtype=bool)
        self.tie = np.zeros(w, dtype=bool)
        self.top = np.full(w, -1, dtype=np.int64)
        self.filled = 0
        self.pos = 0
        self.queries = 0
        self.repeats = 0
        self.last_check = 0
        self.signals: dict[str, float] = {}

    def _nearest(self, feats: np.ndarray) -> np.ndarray:
        """Each query's distance to the nearest earlier one (this batch's earlier rows included)."""
        best = np.full(len(feats), np.inf)
        if self.stored:
            n = self.stored
            d2 = (feats * feats).sum(1)[:, None] + self.store_sq[None, :n] - 2.0 * (feats @ self.store[:n].T)
            nearest = d2.argmin(1)
            best = np.maximum(d2[np.arange(len(feats)), nearest], 0.0).astype(np.float64)
            # float32 |a|² + |b|² - 2ab cancels to ~1e-3 near zero: recompute the closest pairs exactly, so
            # that repeats come out at 0 and near duplicates at their true distance.
            close = best < 0.01
            if close.any():
                diff = feats[close].astype(np.float64) - self.store[nearest[close]].astype(np.float64)
                best[close] = (diff * diff).sum(1)
        if len(feats) > 1:
            inner = _sqdist(feats, feats)
            inner[np.triu_indices(len(feats))] = np.inf
            best = np.minimum(best, inner.min(1))
        return np.sqrt(best)

    def _push(self, **cols: np.ndarray) -> None:
        n = len(cols["dmin"])
        w = self.config.window
        if n >= w:
            for name, col in cols.items():
                getattr(self, name)[:] = col[-w:]
            self.pos, self.filled = 0, w
            return
        idx = (self.pos + np.arange(n)) % w
        for name, col in cols.items():
            getattr(self, name)[idx] = col
        self.pos = int((self.pos + n) % w)
        self.filled = min(w, self.filled + n)

    def _remember(self, feats: np.ndarray, keys: list[bytes] | None) -> None:
        cap = self.config.store
        rows = feats[-cap:]
        idx = (self.store_pos + np.arange(len(rows))) % cap
        self.store[idx] = rows
        self.store_sq[idx] = (rows * rows).sum(1)
        for slot, key in zip(idx.tolist(), [] if keys is None else keys[-cap:]):
            old = self.store_keys[slot]
            if old is not None:
                self.known.discard(old)
            self.store_keys[slot] = key
            self.known.add(key)
        self.store_pos = int((self.store_pos + len(rows)) % cap)
        self.stored = min(cap, self.stored + len(rows))

    def _repeats(self, keys: list[bytes]) -> np.ndarray:
        """Which keys were seen before: among the stored rows, or earlier in this batch."""
        seen, repeat = set(), np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            repeat[i] = key in self.known or key in seen
            seen.add(key)
        return repeat

    def observe(self, feats: np.ndarray, residual: np.ndarray, probs: np.ndarray,
                keys: list[bytes] | None = None) -> dict[str, float] | None:
        """Record a batch of queries; return the signals when this batch reaches a check, else ``None``.

        ``keys`` (a digest of each input, e.g. :func:`~wmark.monitor.text_features.text_keys`) make a repeat an
        input seen before, exactly, rather than one within ``REPEAT_RADIUS`` of an earlier one in the reduced
        features.
        """
        dmin = self._nearest(feats)
        repeat = dmin <= REPEAT_RADIUS if keys is None else self._repeats(keys)
        top2 = np.argsort(-probs, axis=1)[:, :2]
        p = np.take_along_axis(probs, top2, axis=1)
        self._push(dmin=np.where(repeat | ~np.isfinite(dmin), np.nan, dmin),
                   near=~repeat & (dmin < self.near_radius), ood=residual > self.ood_radius,
                   tie=p[:, 1] >= self.config.near_tie_ratio * np.maximum(p[:, 0], 1e-12),
                   top=top2[:, 0])
        self._remember(feats[~repeat], None if keys is None else [k for k, r in zip(keys, repeat) if not r])
        self.queries += len(feats)
        self.repeats += int(repeat.sum())
        if self.queries < self.config.min_queries or self.queries - self.last_check < self.config.check_every:
            return None
        self.last_check = self.queries
        self.signals = self.evaluate()
        return self.signals

    def evaluate(self) -> dict[str, float]:
        """The window's signals (higher = more like extraction), each in [0, 1]."""
        k = self.filled
        d = self.dmin[:k]
        top = self.top[:k]
        c = self.num_classes
        return {
            "prada": 1.0 - shapiro_statistic(d[np.isfinite(d)]),
            "near_dup": float(self.near[:k].mean()) if k else 0.0,
            "ood": float(self.ood[:k].mean()) if k else 0.0,
            "coverage": effective_count(top[top >= 0]) / c,
            "near_tie": float(self.tie[:k].mean()) if k else 0.0,
        }
