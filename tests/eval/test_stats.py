"""Intervals and paired tests against known values: Clopper-Pearson intervals from the beta quantiles (scipy),
McNemar's exact p-value by hand, the sign-flip test's exact enumeration, a bootstrap on a fixed sample."""

from __future__ import annotations

import math

import pytest

from peftkit.errors import ConfigError
from peftkit.eval.stats import (
    binomial_interval,
    bootstrap_interval,
    mcnemar_test,
    paired_permutation_test,
    seed_spread,
)


@pytest.mark.parametrize("k, n, lower, upper", [
    (7, 10, 0.34754735, 0.93327184),     # Clopper-Pearson, 95%: beta.ppf(0.025, 7, 4), beta.ppf(0.975, 8, 3)
    (0, 20, 0.0, 0.16842829),            # 1 - 0.025 ** (1/20)
    (20, 20, 0.83157171, 1.0),
    (780, 1000, 0.75302021, 0.80531996),  # a compare-sized test set: about +-2.6 points
])
def test_binomial_interval_known_values(k: int, n: int, lower: float, upper: float) -> None:
    lo, hi = binomial_interval(k, n)
    assert lo == pytest.approx(lower, abs=2e-5) and hi == pytest.approx(upper, abs=2e-5)


def test_binomial_interval_agrees_with_scipy_beta_quantiles() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((1, 3), (50, 100), (113, 120), (64, 200)):
        lo, hi = binomial_interval(k, n, level=0.9)
        assert lo == pytest.approx(stats.beta.ppf(0.05, k, n - k + 1), abs=1e-7)
        assert hi == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), abs=1e-7)


def test_mcnemar_exact() -> None:
    # 10 examples only A gets right, 2 only B: p = 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 4096
    a = [True] * 10 + [False] * 2 + [True] * 30 + [False] * 8
    b = [False] * 10 + [True] * 2 + [True] * 30 + [False] * 8
    assert mcnemar_test(a, b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_test(a, a) == 1.0
    with pytest.raises(ConfigError, match="same examples"):
        mcnemar_test(a, b[:-1])


def test_sign_flip_test_exact_and_monte_carlo() -> None:
    # differences 1, 2, 3: of the 8 sign patterns, |sum| >= 6 only for all + and all -: p = 2/8
    assert paired_permutation_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert paired_permutation_test([0.5] * 5, [0.5] * 5) == 1.0
    a = [0.3 + 0.01 * (i % 7) for i in range(40)]
    assert paired_permutation_test(a, [x - 0.05 for x in a]) < 0.001  # every example better by 0.05
    assert paired_permutation_test(a, list(reversed(a))) > 0.5  # same values, other order: no difference


def test_bootstrap_interval_covers_the_normal_approximation() -> None:
    values = [float((i * 37) % 101) / 100 for i in range(400)]  # a fixed sample
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    lo, hi = bootstrap_interval(values, seed=0)
    assert lo < mean < hi
    half = 1.96 * sd / math.sqrt(len(values))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_interval(values, seed=0) == (lo, hi)  # seeded: the same interval again


def test_seed_spread() -> None:
    assert seed_spread([0.8, 0.82, 0.78]) == pytest.approx({"mean": 0.8, "std": 0.02, "min": 0.78, "max": 0.82,
                                                            "n": 3})
    assert seed_spread([0.5])["std"] == 0.0
