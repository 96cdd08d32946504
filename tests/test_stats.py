import math

import numpy as np
import pytest
from scipy import stats as sps

from wmark import stats


@pytest.mark.parametrize("seed", range(5))
def test_binomial_tail_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        k = int(rng.integers(0, n + 1))
        p = float(rng.uniform(0.01, 0.99))
        ref = sps.binom.sf(k - 1, n, p)
        if ref > 1e-300:
            assert stats.binomial_log_sf(k, n, p) == pytest.approx(math.log(ref), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_binomial_tail_near_one_keeps_its_relative_precision(seed: int) -> None:
    # a tail near 1 was the log of a sum that rounds to 1: P(X >= 2) of Binomial(10, 0.999), 1 - 1e-26, gave
    # log p = 0.0, and P(X >= 5) of Binomial(10, 0.99) came out 6e-7 off; the reference takes the small lower tail
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = int(rng.integers(2, 400))
        k = int(rng.integers(1, max(2, n // 3)))
        p = float(1.0 - 10 ** rng.uniform(-4, -0.3))
        ref = math.log1p(-sps.binom.cdf(k - 1, n, p))
        if ref < -1e-200:  # scipy's lower tail loses digits further out
            assert stats.binomial_log_sf(k, n, p) == pytest.approx(ref, rel=1e-9, abs=1e-300)
    assert stats.binomial_log_sf(2, 10, 0.999) == pytest.approx(-9.991e-27, rel=1e-12)


def test_binomial_tail_does_not_underflow() -> None:
    # scipy's logsf gives -inf here; the exact tail is about 10^-496.7.
    value = stats.binomial_log10_sf(3500, 4096, 0.5)
    assert math.isfinite(value)
    assert value == pytest.approx(-496.749, abs=1e-2)
    assert stats.binomial_log10_sf(100, 100, 0.1) == pytest.approx(-100.0)


def test_binomial_edge_cases() -> None:
    assert stats.binomial_log_sf(0, 10, 0.3) == 0.0
    assert stats.binomial_log_sf(11, 10, 0.3) == -math.inf
    with pytest.raises(ValueError, match="p must be"):
        stats.binomial_log_sf(1, 10, 1.5)


@pytest.mark.parametrize(("k", "n"), [(2.5, 10), (3, 10.5), (float("nan"), 10), (3, float("nan")), (3, math.inf)])
def test_binomial_tail_refuses_counts_that_are_not_whole(k: float, n: float) -> None:
    # a fractional k or n went into the sum and gave a tail of no binomial (k = 2.5 of 10 at 1/2 gave p = 0.974);
    # NaN failed inside numpy ('arange: cannot compute length')
    with pytest.raises(ValueError, match="give whole numbers"):
        stats.binomial_log_sf(k, n, 0.5)


def test_binomial_tail_takes_numpy_counts() -> None:
    # numpy counts are read as Python integers: n + 1 of an int32 n no longer wraps around
    assert stats.binomial_log_sf(np.int64(3), np.int32(10), 0.5) == pytest.approx(sps.binom.logsf(2, 10, 0.5))
    big = np.int32(2**31 - 1)
    assert stats.binomial_log_sf(big, big, 0.5) == pytest.approx(big * math.log(0.5))


def test_log10_to_p_refuses_nan() -> None:
    # NaN failed the 'log10_p > -320' test and came out as p = 0.0, the strongest evidence there is
    with pytest.raises(ValueError, match="log10_p is NaN"):
        stats.log10_to_p(float("nan"))
    assert stats.log10_to_p(-2.0) == pytest.approx(0.01)
    assert stats.log10_to_p(-400.0) == 0.0 and stats.log10_to_p(-math.inf) == 0.0


def test_binomial_test_accumulator_equals_functional() -> None:
    acc = stats.BinomialTest(p0=0.1)
    acc.update([1, 0, 1, 1])
    acc.update(1)
    assert acc.compute() == stats.binomial_log10_sf(4, 5, 0.1)
    acc.reset()
    assert (acc.successes, acc.trials) == (0, 0)


@pytest.mark.parametrize("outcomes", [[0.5], [1, 1.7], [float("nan")], [2]])
def test_binomial_test_refuses_outcomes_that_are_not_0_or_1(outcomes: list[float]) -> None:
    # values were cut to integers before the check: 0.5 counted as a miss and 1.7 as a match, silently
    acc = stats.BinomialTest(p0=0.1)
    with pytest.raises(ValueError, match="outcomes must be 0 or 1"):
        acc.update(outcomes)
    assert (acc.successes, acc.trials) == (0, 0)
    acc.update(np.array([True, False, 1.0]))
    assert (acc.successes, acc.trials) == (2, 3)


@pytest.mark.parametrize("p0", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_binomial_test_refuses_p0_outside_0_1(p0: float) -> None:
    # p0 = 0 made a single match p = 0 (log10 p = -inf, an accusation); 1.5 or NaN failed only at compute()
    with pytest.raises(ValueError, match=r"p0 must be in \(0, 1\)"):
        stats.BinomialTest(p0=p0)


def _closed_form_log10(outcomes: np.ndarray, p0: float) -> np.ndarray:
    """log10 e-values of the uniform mixture, for many sequences at once (rows), by cumulative sums."""
    q = stats.default_alternatives(p0)
    s = np.cumsum(outcomes, axis=1)[..., None]
    t = np.arange(1, outcomes.shape[1] + 1)[None, :, None]
    log_w = s * np.log(q / p0) + (t - s) * np.log((1 - q) / (1 - p0))
    from scipy.special import logsumexp

    return (logsumexp(log_w, axis=2) - np.log(len(q))) / np.log(10)


def test_mixture_eprocess_matches_closed_form() -> None:
    rng = np.random.default_rng(1)
    seqs = (rng.random((5, 60)) < 0.3).astype(int)
    closed = _closed_form_log10(seqs, 0.1)
    for row, ref in zip(seqs, closed):
        assert stats.mixture_eprocess_log10(row.tolist(), p0=0.1) == pytest.approx(ref.tolist(), abs=1e-9)


def test_mixture_eprocess_keeps_alpha_under_optional_stopping() -> None:
    # Under the null, the chance that the e-process EVER crosses 1/alpha must be <= alpha (Ville).
    rng = np.random.default_rng(0)
    alpha, p0, sims, horizon = 0.05, 0.1, 6000, 200
    paths = _closed_form_log10((rng.random((sims, horizon)) < p0).astype(np.int8), p0)
    crossed = int(np.sum(paths.max(axis=1) >= -math.log10(alpha)))
    assert crossed / sims <= alpha


def test_mixture_eprocess_is_fast_under_the_alternative() -> None:
    logs = stats.mixture_eprocess_log10([1] * 10, p0=0.1)
    assert next(i for i, v in enumerate(logs) if v >= 6) + 1 <= 8
    assert logs == sorted(logs)


def test_mixture_eprocess_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="p0 must be"):
        stats.MixtureEProcess(p0=1.0)
    with pytest.raises(ValueError, match="strictly between"):
        stats.MixtureEProcess(p0=0.5, alternatives=[0.4])
    with pytest.raises(ValueError, match="0 or 1"):
        stats.MixtureEProcess(p0=0.5).update(2)


def test_mixture_eprocess_refuses_nan_or_no_alternatives() -> None:
    # A NaN alternative used to pass the range check (NaN <= p0 is False) and make every e-value NaN, which the
    # running maximum ignores: 40 straight matches at p0 = 0.1 gave log10 e = 0 (p = 1) instead of about 28.
    with pytest.raises(ValueError, match="strictly between p0 and 1"):
        stats.MixtureEProcess(p0=0.1, alternatives=[0.5, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        stats.MixtureEProcess(p0=0.1, alternatives=[])
    e = stats.MixtureEProcess(p0=0.1, alternatives=[0.5])
    for _ in range(40):
        e.update(1)
    assert e.compute() == pytest.approx(40 * math.log10(5.0))


def test_clopper_pearson_matches_scipy_beta() -> None:
    for k, n in [(0, 10), (3, 20), (19, 20), (50, 100)]:
        assert stats.clopper_pearson_upper(k, n, 0.95) == pytest.approx(sps.beta.ppf(0.95, k + 1, n - k))
    assert stats.clopper_pearson_upper(5, 5, 0.95) == 1.0


@pytest.mark.parametrize(("k", "n", "confidence"), [(12, 10, 0.95), (-1, 10, 0.95), (0, -3, 0.95), (3, 10, 1.5),
                                                    (3, 10, 0.0), (3, 10, float("nan"))])
def test_clopper_pearson_refuses_impossible_counts_and_confidences(k: int, n: int, confidence: float) -> None:
    # k > n (or n < 0) gave a bound of 1.0 and k < 0 or a confidence outside (0, 1) gave NaN, silently
    with pytest.raises(ValueError, match=r"give 0 <= k <= n successes and a confidence in \(0, 1\)"):
        stats.clopper_pearson_upper(k, n, confidence)


def test_holm_matches_manual_procedure() -> None:
    ps = [0.01, 0.04, 0.03, 0.2]
    adjusted = [10 ** v for v in stats.holm([math.log10(p) for p in ps])]
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max(0.09, 0.08)=0.09, 0.2*1 -> 0.2
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.2])


def _closed_weighted_bonferroni(ps: list[float], ws: list[float]) -> list[float]:
    """Adjusted p-values of closed testing with weighted Bonferroni intersection tests, by brute force."""
    m = len(ps)
    adjusted = []
    for i in range(m):
        worst = 0.0
        for mask in range(1, 2 ** m):
            members = [j for j in range(m) if mask >> j & 1]
            if i in members:
                total = sum(ws[j] for j in members)
                worst = max(worst, min(1.0, min(ps[j] * total / ws[j] for j in members)))
        adjusted.append(worst)
    return adjusted


def test_weighted_holm_is_the_closed_weighted_bonferroni_procedure() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        m = int(rng.integers(1, 6))
        ps = list(10 ** rng.uniform(-8, 0, size=m))
        ws = list(rng.uniform(0.05, 8, size=m))
        got = [10 ** v for v in stats.holm([math.log10(p) for p in ps], ws)]
        assert got == pytest.approx(_closed_weighted_bonferroni(ps, ws), rel=1e-9)
    # equal weights are plain Holm; a weight of 0.8 of the whole needs p <= 0.8 alpha on its own
    assert stats.holm([-3.0, -1.0], [5.0, 5.0]) == pytest.approx(stats.holm([-3.0, -1.0]))
    assert stats.holm([-6.05, 0.0, 0.0], [8.0, 1.0, 1.0])[0] == pytest.approx(-6.05 - math.log10(0.8))
    with pytest.raises(ValueError, match="one positive, finite weight per p-value"):
        stats.holm([-1.0, -2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="one positive, finite weight per p-value"):
        stats.holm([-1.0, -2.0], [1.0])


@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.0, -0.1, float("nan")])
def test_eprocesses_refuse_an_alpha_outside_0_1(alpha: float) -> None:
    # alpha >= 1 made the bar -log10(alpha) <= 0, which compute() (never below 0) always reaches: an e-process that
    # had seen nothing had 'crossed'; alpha = 0 failed with a math domain error, NaN never crossed
    for eproc in (stats.MixtureEProcess(p0=0.1), stats.GaussianMixtureEProcess(rho=0.13)):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            eproc.crossed(alpha)
    assert not stats.MixtureEProcess(p0=0.1).crossed(0.5)


def test_holm_refuses_a_nan_pvalue() -> None:
    # a NaN broke the sort (every later comparison is False) and came out adjusted to 0 (p = 1) without a word:
    # [-3, nan, -1] gave -1 an adjusted 0 instead of -1 + log10 2
    with pytest.raises(ValueError, match="log10 p-value that is a number for every test"):
        stats.holm([-3.0, float("nan"), -1.0])
    assert stats.holm([-3.0, -math.inf, -1.0]) == pytest.approx([-3.0 + math.log10(2), -math.inf, -1.0])


@pytest.mark.parametrize(("score", "weight", "rho"), [(-1.6e12, 0.08, 0.024), (-1e10, 53.0, 0.09), (-1e8, 1.0, 1.0)])
def test_gaussian_eprocess_stays_below_one_for_a_drift_far_below_zero(score: float, weight: float, rho: float) -> None:
    # the closed form added x²/2 to log Φ(x), which cancel for x far below 0: a score of -1.6e12 gave log10 e = +445
    # (evidence 'crossed' at any alpha) where e is below 1e-12; for x << 0, x²/2 + log Φ(x) -> -log(-x √(2π))
    e = stats.GaussianMixtureEProcess(rho=rho)
    e.update(score, weight)
    r = rho ** 2 * weight ** 2
    x = rho * score * weight / math.sqrt(1 + r)
    expected = math.log(2) - 0.5 * math.log1p(r) - math.log(-x) - 0.5 * math.log(2 * math.pi)
    assert e.log_e() == pytest.approx(expected, rel=1e-9)
    assert e.compute() == 0.0 and not e.crossed(0.5)
