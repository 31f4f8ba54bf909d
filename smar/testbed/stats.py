"""Retention, outlier-robust means and confidence intervals across seeds (pure Python).

The testbed's headline numbers (SPEC section 5):

- retention per text benchmark = score after tuning / score of the stage-1 LM;
- mean retention, and mean retention without the benchmark that moved most (|retention - 1|
  largest), the reviewers' robustness check;
- 95% confidence intervals across seeds from Student's t distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "retention",
    "mean_retention",
    "mean_without_outlier",
    "confidence_interval",
    "t_quantile_975",
]

# Two-sided 95% quantiles of Student's t, df = 1..30; beyond, the normal quantile is within 1%.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1; got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def retention(scores: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    """Per-benchmark retention ``scores[b] / base[b]`` (both higher-is-better scores).

    Raises:
        ValueError: a benchmark is missing from ``base`` or has a non-positive base score.
    """
    out = {}
    for name, value in scores.items():
        if name not in base:
            raise ValueError(f"benchmark {name!r} has no base score: evaluate the base model on it")
        if not base[name] > 0:
            raise ValueError(f"base score of {name!r} is {base[name]}: retention needs a score > 0")
        out[name] = value / base[name]
    return out


def mean_retention(ret: Mapping[str, float]) -> float:
    if not ret:
        raise ValueError("no benchmark to average")
    return sum(ret.values()) / len(ret)


def mean_without_outlier(ret: Mapping[str, float]) -> tuple[float, str]:
    """Mean retention without the benchmark that moved most, and that benchmark's name."""
    if len(ret) < 2:
        raise ValueError("need at least two benchmarks to drop one")
    worst = max(ret, key=lambda k: abs(ret[k] - 1.0))
    rest = [v for k, v in ret.items() if k != worst]
    return sum(rest) / len(rest), worst


def confidence_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (t distribution) of ``values``.

    With a single value the half-width is NaN: one seed says nothing about the spread.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(var / n)
