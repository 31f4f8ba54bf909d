"""Retention and confidence intervals against hand computations and scipy-free references."""

import math

import pytest

from smar.testbed.stats import (
    confidence_interval,
    mean_retention,
    mean_without_outlier,
    retention,
    t_quantile_975,
)


def test_retention_of_a_model_against_itself_is_exactly_one():
    scores = {"prose": 0.71, "facts": 0.93, "alphabet": 1.0}
    ret = retention(scores, scores)
    assert all(v == 1.0 for v in ret.values()) and mean_retention(ret) == 1.0


def test_mean_without_outlier_drops_the_most_moved_benchmark():
    ret = {"a": 0.95, "b": 1.2, "c": 0.5, "d": 1.0}
    mean, dropped = mean_without_outlier(ret)
    assert dropped == "c" and mean == pytest.approx((0.95 + 1.2 + 1.0) / 3)


def test_confidence_interval_matches_t_formula():
    values = [0.8, 0.9, 1.0]
    mean, half = confidence_interval(values)
    sd = math.sqrt(sum((v - 0.9) ** 2 for v in values) / 2)
    assert mean == pytest.approx(0.9) and half == pytest.approx(4.303 * sd / math.sqrt(3))
    assert math.isnan(confidence_interval([0.5])[1])
    assert t_quantile_975(1000) == pytest.approx(1.96)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no base score"):
        retention({"x": 1.0}, {})
    with pytest.raises(ValueError, match="score > 0"):
        retention({"x": 1.0}, {"x": 0.0})
    with pytest.raises(ValueError, match="two benchmarks"):
        mean_without_outlier({"x": 1.0})


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from smar.plots import plot_mrd, plot_retention_vs_accuracy

    p1 = plot_mrd({"none": [0.1, 0.2], "smar": [1.6, 1.9]}, tmp_path / "mrd.png")
    p2 = plot_retention_vs_accuracy(
        {"none": {"retention": 0.9, "accuracy": 0.6, "retention_ci": 0.02}}, tmp_path / "r.png"
    )
    assert p1.stat().st_size > 1000 and p2.stat().st_size > 1000
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mrd.png", "r.png"]
