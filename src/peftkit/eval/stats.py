"""How sure a score is: confidence intervals, spreads over seeds, and paired tests between two models on the same
test examples (``peftkit compare`` states its ranking with them).

* :func:`binomial_interval`: the exact (Clopper-Pearson) interval of an accuracy k/n: the set of p that a
  two-sided test at 1 - level would not reject; it never undercovers (Wald's p ± z·se does, near 0 and 1).
* :func:`bootstrap_interval`: the percentile bootstrap of a mean over test examples (ROUGE-L, BLEU per example,
  log-likelihoods): resample the examples with replacement, seeded.
* :func:`mcnemar_test`: two classifiers on the same examples: only the examples where exactly one is right say
  which is better; under "equally good" each such example goes either way with probability 1/2, so the exact
  two-sided p-value is a binomial tail (McNemar's exact test).
* :func:`paired_permutation_test`: two scores per example (continuous): under "no difference" each example's
  difference is as likely to have either sign; the p-value is the share of sign flips whose mean difference is
  at least as large as the one observed (exact up to 2^16 flips, else seeded Monte Carlo).
* :func:`seed_spread`: mean, standard deviation (n - 1) and range over seeds.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from itertools import product

from peftkit.errors import ConfigError


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"confidence level must be in (0, 1), got {level!r}")


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no overflow for large n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f: Callable[[float], float], target: float) -> float:
    """p in [0, 1] with f(p) = target for f decreasing in p (bisection to 1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion with ``k`` successes in ``n`` trials.

    Raises:
        ConfigError: n < 1, k outside [0, n], or a level outside (0, 1).
    """
    _check_level(level)
    if n < 1 or not 0 <= k <= n:
        raise ConfigError(f"binomial interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1 - level
    # lower end: P(X >= k | p) = alpha/2, i.e. P(X <= k-1 | p) = 1 - alpha/2; upper end: P(X <= k | p) = alpha/2
    # (P(X <= j | p) falls as p grows)
    lower = 0.0 if k == 0 else _solve(lambda p: _binom_cdf(k - 1, n, p), 1 - alpha / 2)
    upper = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), alpha / 2)
    return lower, upper


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one number per test example).

    Raises:
        ConfigError: fewer than 2 values, or a level outside (0, 1).
    """
    _check_level(level)
    if len(values) < 2:
        raise ConfigError(f"a bootstrap interval needs at least 2 values, got {len(values)}")
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, 1 - (1 - level) / 2))


def mcnemar_test(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact two-sided p-value that two classifiers, right or wrong on the same examples, are equally accurate.

    Raises:
        ConfigError: the two lists differ in length.
    """
    if len(a_correct) != len(b_correct):
        raise ConfigError(f"paired test needs the same examples: {len(a_correct)} vs {len(b_correct)} results")
    only_a = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if b and not a)
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binom_cdf(min(only_a, only_b), n, 0.5))


def paired_permutation_test(a: Sequence[float], b: Sequence[float], resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value that per-example scores ``a`` and ``b`` have the same mean (sign-flip test).

    Raises:
        ConfigError: the two lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ConfigError(f"paired test needs the same, non-empty examples: {len(a)} vs {len(b)} scores")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    observed = abs(sum(diffs))
    tol = 1e-12 * max(1.0, observed)
    if len(diffs) <= 16:  # every sign pattern
        patterns = list(product((1, -1), repeat=len(diffs)))
        hits = sum(1 for signs in patterns if abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - tol)
        return hits / len(patterns)
    rng = random.Random(seed)
    hits = sum(1 for _ in range(resamples)
               if abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - tol)
    return (hits + 1) / (resamples + 1)  # the observed pattern counts as one draw


def seed_spread(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "min", "max", "n"}`` over runs with different seeds (std 0 for one run)."""
    if not values:
        raise ConfigError("no values to summarise")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}
