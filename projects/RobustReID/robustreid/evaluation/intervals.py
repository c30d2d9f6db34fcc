"""Across-seed summaries of training runs: mean ± sample standard deviation of a metric, and the
confidence interval of the paired difference between two methods (same seed = one pair).

Paired, because two methods trained from the same seed share the data order, the initialisation
(or the model they fine-tune) and the evaluated queries: the seed-to-seed spread common to both
cancels in the difference.
"""
import math

import numpy as np

INTERVALS = ("t", "bootstrap")


def mean_std(values):
    """(mean, sample standard deviation with ddof=1); the std is None for fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("no values")
    std = float(values.std(ddof=1)) if values.size > 1 else None
    return float(values.mean()), std


def paired_interval(differences, level=0.95, method="t", bootstrap_samples=10000, seed=0):
    """Confidence interval (low, high) of the mean of paired differences.

    ``method="t"``: Student-t, mean ± t_{(1+level)/2, n-1} · sd / sqrt(n) (sd with ddof=1).
    ``method="bootstrap"``: percentile bootstrap of the mean, ``bootstrap_samples`` resamples of the
    n differences with replacement drawn by ``numpy.random.default_rng(seed)`` (reproducible).
    Needs n >= 2 differences.
    """
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        raise ValueError(f"a paired interval needs at least 2 differences, got {d.size}")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if method == "t":
        from scipy.stats import t

        half = t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
        return float(d.mean() - half), float(d.mean() + half)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, d.size, size=(bootstrap_samples, d.size))].mean(axis=1)
        low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
        return float(low), float(high)
    raise ValueError(f"unknown interval {method!r}; known: {', '.join(INTERVALS)}")
