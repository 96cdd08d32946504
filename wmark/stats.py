"""Exact, log-space hypothesis tests.

Every p-value wmark reports comes from here. They underflow double precision long before the evidence
is unusual for a real theft (3,500 of 4,096 bits at ½ gives p ≈ 10⁻⁵⁰⁰), so everything is computed as a
natural log and reported as log10.

Two styles, as in torchmetrics: accumulator objects (``update`` / ``compute`` / ``reset``) for streaming
use, and functional twins for one-shot use.

Example:
    >>> round(binomial_log10_sf(20, 20, 0.1), 6)
    -20.0
    >>> e = MixtureEProcess(p0=0.1)
    >>> for _ in range(8):
    ...     _ = e.update(1)
    >>> e.compute() > 6  # log10 of the e-value: evidence beyond 1/alpha for alpha = 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.special import betaincinv, erfcx, gammaln, log_ndtr, logsumexp

LN10 = math.log(10.0)
LN2 = math.log(2.0)


def binomial_log_sf(k: int, n: int, p: float) -> float:
    """Natural log of P(X ≥ k) for X ~ Binomial(n, p), exact by summing the log-pmf of the tail below 1/2 (the
    upper one, or the lower one taken from 1).

    scipy's ``binom.logsf`` returns -inf for extreme tails; this does not.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not (float(k).is_integer() and float(n).is_integer()):
        raise ValueError(f"k and n are counts: give whole numbers, got k={k}, n={n}")
    k, n = int(k), int(n)
    if n < 0 or k > n + 1:
        raise ValueError(f"need 0 <= n and k <= n + 1, got k={k}, n={n}")
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return 0.0
    upper = _binomial_log_mass(k, n + 1, n, p)
    if upper > -LN2:
        # a tail above 1/2 sums to 1 less a little that rounding loses: take the lower tail (below 1/2) from 1
        return math.log1p(-math.exp(_binomial_log_mass(0, k, n, p)))
    return upper


def _binomial_log_mass(start: int, stop: int, n: int, p: float) -> float:
    """Natural log of P(start <= X < stop) for X ~ Binomial(n, p), 0 < p < 1, summed in log space."""
    i = np.arange(start, stop, dtype=np.float64)
    logpmf = gammaln(n + 1) - gammaln(i + 1) - gammaln(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(logsumexp(logpmf))


def binomial_log10_sf(k: int, n: int, p: float) -> float:
    """log10 of P(X ≥ k) for X ~ Binomial(n, p)."""
    return binomial_log_sf(k, n, p) / LN10


def log10_to_p(log10_p: float) -> float:
    """The p-value as a float (0.0 once it underflows; keep log10_p as the record)."""
    if math.isnan(log10_p):
        raise ValueError("log10_p is NaN, which is no p-value; fix the test that computed it.")
    return float(10.0 ** log10_p) if log10_p > -320 else 0.0


class BinomialTest:
    """Accumulates successes and trials; ``compute`` gives the exact one-sided log10 p-value.

    Valid only for a sample size fixed in advance. For early stopping use :class:`MixtureEProcess`.
    """

    def __init__(self, *, p0: float) -> None:
        if not 0.0 < p0 < 1.0:
            raise ValueError(f"p0 must be in (0, 1), got {p0}; give the null's match rate, e.g. 1/C for C classes.")
        self.p0 = p0
        self.reset()

    def reset(self) -> None:
        self.successes = 0
        self.trials = 0

    def update(self, outcomes: int | Iterable[int]) -> None:
        values = [outcomes] if isinstance(outcomes, (int, np.integer)) else list(outcomes)
        if any(v not in (0, 1) for v in values):
            raise ValueError("outcomes must be 0 or 1")
        self.successes += sum(int(v) for v in values)
        self.trials += len(values)

    def compute(self) -> float:
        return binomial_log10_sf(self.successes, self.trials, self.p0)


# The default mixture's alternatives: MIXTURE_SIZE rates evenly spread from MIXTURE_SPAN[0] to MIXTURE_SPAN[1] of
# the way from p0 to 1, each of prior weight 1 / MIXTURE_SIZE.
MIXTURE_SPAN = (0.05, 0.99)
MIXTURE_SIZE = 20


def default_alternatives(p0: float, size: int = MIXTURE_SIZE) -> np.ndarray:
    """Alternative success rates spread over (p0, 1), up to 99 % of the way to 1."""
    return p0 + (1.0 - p0) * np.linspace(*MIXTURE_SPAN, size)


def mixture_plan() -> dict[str, float | int]:
    """The default :class:`MixtureEProcess` as a test plan binds it (:mod:`wmark.testplan`): its alternatives, a
    uniform prior over ``alternatives`` rates spread from ``from`` to ``to`` of the way from p0 to 1."""
    return {"alternatives": MIXTURE_SIZE, "from": MIXTURE_SPAN[0], "to": MIXTURE_SPAN[1]}


class _RunningEvidence:
    """What every e-process here keeps: the log10 e-value after each update and its running maximum."""

    history: list[float]
    _best: float

    def _clear(self) -> None:
        self.history = []
        self._best = -math.inf

    def _record(self, current: float) -> float:
        self.history.append(current)
        self._best = max(self._best, current)
        return current

    def compute(self) -> float:
        """log10 of the largest e-value so far (0 before any update): ``10 ** -compute()`` is the p-value."""
        return max(0.0, self._best)

    def crossed(self, alpha: float) -> bool:
        """Whether the evidence has reached 1/α."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}; give the false-accusation bound, e.g. 1e-6.")
        return self.compute() >= -math.log10(alpha)


class MixtureEProcess(_RunningEvidence):
    """Anytime-valid evidence against H0: E[X_t | past] ≤ p0 for binary outcomes X_t.

    The e-value is a uniform mixture, over alternatives q in (p0, 1), of the likelihood ratios
    ∏ (q/p0)^x ((1−q)/(1−p0))^(1−x). Each ratio with q > p0 is a non-negative supermartingale under any
    null rate ≤ p0, so the mixture is too, and Ville's inequality gives
    P(sup_t E_t ≥ 1/α) ≤ α under *any* stopping rule. ``compute`` returns log10 of the running maximum,
    so ``10 ** -compute()`` is an anytime-valid p-value.

    Args:
        p0: The null's success rate (1/C for random labels over C classes).
        alternatives: The mixture's components; defaults to :func:`default_alternatives`.
    """

    def __init__(self, *, p0: float, alternatives: Sequence[float] | None = None) -> None:
        if not 0.0 < p0 < 1.0:
            raise ValueError(f"p0 must be in (0, 1), got {p0}")
        q = np.asarray(default_alternatives(p0) if alternatives is None else alternatives, dtype=np.float64)
        # Written as the positive condition: a NaN alternative fails every comparison, so ``q <= p0`` would let it
        # through and turn every e-value into NaN, which the running maximum then ignores (p = 1 forever).
        if q.size == 0 or not np.all((q > p0) & (q < 1.0)):
            raise ValueError("every alternative must lie strictly between p0 and 1 (and there must be at least one)")
        self.p0 = p0
        self._log_win = np.log(q) - math.log(p0)
        self._log_loss = np.log1p(-q) - math.log1p(-p0)
        self._log_prior = -math.log(len(q))
        self.reset()

    def reset(self) -> None:
        self._log_w = np.zeros_like(self._log_win)
        self.trials = 0
        self.successes = 0
        self._clear()

    def update(self, outcome: int) -> float:
        """Add one outcome; return log10 of the current e-value."""
        if outcome not in (0, 1):
            raise ValueError("outcome must be 0 or 1")
        self._log_w += self._log_win if outcome else self._log_loss
        self.trials += 1
        self.successes += outcome
        return self._record(float(logsumexp(self._log_w) + self._log_prior) / LN10)


def mixture_eprocess_log10(outcomes: Iterable[int], *, p0: float) -> list[float]:
    """Functional twin of :class:`MixtureEProcess`: log10 e-values after each outcome."""
    e = MixtureEProcess(p0=p0)
    return [e.update(int(o)) for o in outcomes]


class GaussianMixtureEProcess(_RunningEvidence):
    """Anytime-valid evidence that standard normal scores drift upwards: H0: T_j iid N(0, 1).

    Each score ``T_j`` comes with a weight ``a_j`` fixed before it is seen (predictable). Given the running sums
    ``M = Σ a_j T_j`` and ``A = Σ a_j²``, the likelihood ratio of a drift ``θ a_j`` against none,
    ``exp(θ M − θ² A / 2)``, is a non-negative martingale with mean 1 under H0 for every ``θ``; so is its
    mixture over a half-normal prior on ``θ >= 0`` of scale ``rho`` (method of mixtures), in closed form
    ``E = 2 / sqrt(1 + ρ²A) · exp(ρ²M² / (2(1 + ρ²A))) · Φ(ρM / sqrt(1 + ρ²A))``. Ville's inequality gives
    ``P(sup_j E_j ≥ 1/α) ≤ α`` under any stopping rule; ``compute`` returns log10 of the running maximum, so
    ``10 ** -compute()`` is an anytime-valid p-value. The mixture is tightest where ``ρ²A ≈ Z² − 1`` with
    ``Z = M / sqrt(A)``: pick ``rho`` for the evidence and the weight total at which decisions are expected.

    Args:
        rho: Scale of the half-normal prior on the drift per unit weight.
    """

    def __init__(self, *, rho: float) -> None:
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be positive and finite, got {rho}")
        self.rho = float(rho)
        self.reset()

    def reset(self) -> None:
        self.total = 0.0  # M
        self.weight = 0.0  # A
        self._clear()

    def log_e(self) -> float:
        """Natural log of the current e-value."""
        r = self.rho ** 2 * self.weight
        x = self.rho * self.total / math.sqrt(1.0 + r)
        # x²/2 + log Φ(x): for x < 0 the two terms cancel (catastrophically, far out), so use erfcx(-x/√2) / 2
        tail = math.log(erfcx(-x / math.sqrt(2.0)) / 2.0) if x < 0 else x * x / 2.0 + float(log_ndtr(x))
        return float(math.log(2.0) - 0.5 * math.log1p(r) + tail)

    def update(self, score: float, weight: float) -> float:
        """Add one score with its predictable weight; return log10 of the current e-value."""
        if not (math.isfinite(score) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"need a finite score and a finite weight >= 0, got {score} and {weight}")
        self.total += weight * score
        self.weight += weight * weight
        return self._record(self.log_e() / LN10)


def clopper_pearson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for a binomial rate (exact, Clopper-Pearson)."""
    if not 0 <= k <= n or not 0.0 < confidence < 1.0:
        raise ValueError(f"give 0 <= k <= n successes and a confidence in (0, 1), got k={k}, n={n}, "
                         f"confidence={confidence}")
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return float(betaincinv(k + 1, n - k, confidence))


def holm(log10_pvalues: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Holm–Bonferroni adjusted log10 p-values (family-wise error control, any dependence).

    With ``weights`` (positive, fixed before the data are seen) this is weighted Holm (Holm 1979): the
    shortcut of closed testing with weighted Bonferroni tests, where a hypothesis of weight ``w_i`` among
    remaining weights summing to ``W`` is rejected when ``p_i <= alpha * w_i / W``. Equal weights give the
    plain procedure.

    Raises:
        ValueError: On a NaN p-value, or weights that do not match the p-values or are not positive and finite.
    """
    m = len(log10_pvalues)
    w = [1.0] * m if weights is None else [float(v) for v in weights]
    if len(w) != m or not all(math.isfinite(v) and v > 0 for v in w):
        raise ValueError(f"Give one positive, finite weight per p-value (got {list(w)} for {m} p-values).")
    if any(math.isnan(v) for v in log10_pvalues):
        raise ValueError(f"Give a log10 p-value that is a number for every test (got {list(log10_pvalues)}).")
    order = sorted(range(m), key=lambda i: log10_pvalues[i] - math.log10(w[i]))
    adjusted = [0.0] * m
    running = -math.inf
    for rank, i in enumerate(order):
        remaining = math.fsum(w[j] for j in order[rank:])
        value = min(0.0, log10_pvalues[i] + math.log10(remaining / w[i]))
        running = max(running, value)
        adjusted[i] = running
    return adjusted
