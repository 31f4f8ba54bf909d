"""Retention, outlier-robust means and confidence intervals across seeds (pure Python).

The testbed's headline numbers (docs/method.md#experiment):

- retention per text benchmark = score after tuning / score of the stage-1 LM;
- mean retention, and mean retention without the benchmark that moved most (|retention - 1|
  largest), the reviewers' robustness check;
- 95% confidence intervals across seeds from Student's t distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from smar.errors import UsageError

if TYPE_CHECKING:
    import torch

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
        raise UsageError(f"df must be >= 1; got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def retention(scores: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    """Per-benchmark retention ``scores[b] / base[b]`` (both higher-is-better scores).

    Raises:
        ValueError: a benchmark is missing from ``base`` or has a non-positive base score.
    """
    out = {}
    for name, value in scores.items():
        if name not in base:
            raise UsageError(f"benchmark {name!r} has no base score: evaluate the base model on it")
        if not base[name] > 0:
            raise UsageError(f"base score of {name!r} is {base[name]}: retention needs a score > 0")
        out[name] = value / base[name]
    return out


def mean_retention(ret: Mapping[str, float]) -> float:
    if not ret:
        raise UsageError("no benchmark to average")
    return sum(ret.values()) / len(ret)


def mean_without_outlier(ret: Mapping[str, float]) -> tuple[float, str]:
    """Mean retention without the benchmark that moved most, and that benchmark's name."""
    if len(ret) < 2:
        raise UsageError("need at least two benchmarks to drop one")
    worst = max(ret, key=lambda k: abs(ret[k] - 1.0))
    rest = [v for k, v in ret.items() if k != worst]
    return sum(rest) / len(rest), worst


def confidence_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (t distribution) of ``values``.

    With a single value the half-width is NaN: one seed says nothing about the spread.
    """
    n = len(values)
    if n == 0:
        raise UsageError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(var / n)


def image_driven_share(r_none: float, r_noimage: float) -> float:
    """The share of the forgetting that the images cause: ``(R_noimage - R_none) / (1 - R_none)``.

    ``R_none`` is the mean retention of the ``none`` arm, ``R_noimage`` that of the same stage 3
    with the images removed. 1: the images cause all of it; 0: the text alone does; NaN when
    ``none`` forgets nothing (``R_none >= 1``: there is no forgetting to share). The same formula
    gives the image-gradient-stop control's share, with ``R_stop`` in place of ``R_noimage``.
    """
    if r_none >= 1.0:
        return float("nan")
    return (r_noimage - r_none) / (1.0 - r_none)


def _score_samples(example: Mapping[str, Any], idx: torch.Tensor) -> torch.Tensor:
    """Scores of one benchmark under resampled example indices ``idx (n, N)`` -> ``(n,)``."""
    import torch

    if "correct" in example:
        right = torch.tensor([c == "1" for c in example["correct"]], dtype=torch.float64)
        return right[idx].mean(dim=1)
    bits = torch.tensor(example["bits"], dtype=torch.float64)
    n_bytes = torch.tensor(example["bytes"], dtype=torch.float64)
    return n_bytes[idx].sum(dim=1) / bits[idx].sum(dim=1)  # 1 / bits per byte


def bootstrap_mean_retention(
    runs: Sequence[Mapping[str, Mapping]],
    base: Mapping[str, Mapping],
    include: Sequence[str],
    *,
    samples: int = 400,
    seed: int = 0,
) -> torch.Tensor:
    """Mean retention of each run under a bootstrap over the evaluation examples.

    Every run and the base model were scored on the same examples, so one resampling of the
    example indices per benchmark is shared by all of them: differences between runs keep
    their pairing. This measures evaluation noise only (the models are fixed).

    Args:
        runs: per run, the per-example outcomes of each benchmark (``results["examples"]``).
        base: the same for the stage-1 model.
        include: the benchmarks averaged in mean retention.

    Returns:
        A float64 tensor ``(samples, len(runs))``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    total = None
    for name in include:
        ref = base[name]
        n = len(ref["correct"]) if "correct" in ref else len(ref["bits"])
        idx = torch.randint(0, n, (samples, n), generator=g)  # (samples, N)
        b = _score_samples(ref, idx)  # (samples,)
        r = torch.stack([_score_samples(run[name], idx) / b for run in runs], dim=1)
        total = r if total is None else total + r
    if total is None:
        raise UsageError("no benchmark to bootstrap")
    return total / len(include)
