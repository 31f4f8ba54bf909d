"""Retention and confidence intervals against hand computations and scipy-free references."""

import math
import re

import pytest
import torch

from smar.testbed.compare import aggregate, control_shares, significant
from smar.testbed.report import summary_text, write_report
from smar.testbed.stats import (
    bootstrap_mean_retention,
    confidence_interval,
    image_driven_share,
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


def test_image_driven_share():
    assert image_driven_share(0.8, 1.0) == pytest.approx(1.0)  # images cause all the forgetting
    assert image_driven_share(0.8, 0.8) == pytest.approx(0.0)  # the text alone does
    assert image_driven_share(0.8, 0.9) == pytest.approx(0.5)
    assert math.isnan(image_driven_share(1.0, 0.9))  # nothing forgotten: nothing to share


def _examples(correct: str, bits=None):
    out = {"text/a": {"correct": correct}}
    if bits is not None:
        out["text/prose"] = {"bits": bits, "bytes": [10] * len(bits)}
    return out


def test_bootstrap_of_a_model_against_itself_is_exactly_one():
    base = _examples("1101101111", bits=[20.0, 22.0, 18.0, 25.0])
    boot = bootstrap_mean_retention([base, base], base, ["text/a", "text/prose"], samples=50)
    assert boot.shape == (50, 2) and torch.allclose(boot, torch.ones_like(boot))


def test_bootstrap_pairs_the_runs_and_centres_on_the_point_estimate():
    base = _examples("1" * 100)
    a = _examples("1" * 80 + "0" * 20)
    b = _examples("1" * 78 + "0" * 22)
    boot = bootstrap_mean_retention([a, b], base, ["text/a"], samples=2000, seed=1)
    assert boot[:, 0].mean().item() == pytest.approx(0.80, abs=0.01)
    sd_a = boot[:, 0].std().item()
    assert sd_a == pytest.approx(math.sqrt(0.8 * 0.2 / 100), rel=0.15)  # binomial SE
    # paired: a and b differ on 2 of 100 examples, so their difference varies far less than each
    assert (boot[:, 0] - boot[:, 1]).std().item() < sd_a / 2


def _run(arm, seed, mean_score, mm=0.9):
    return {
        "arm": arm,
        "seed": seed,
        "scores": {"text/prose": mean_score, "text/facts": mean_score, "mm/digit": mm},
        "routing": {},
    }


def test_report_pairs_seeds_for_differences_and_the_image_share():
    base = {"scores": {"text/prose": 1.0, "text/facts": 1.0, "mm/digit": 0.1}}
    none = {0: 0.80, 1: 0.90, 2: 0.70}
    runs = {}
    for s, r in none.items():
        runs[f"none_seed{s}"] = _run("none", s, r)
        runs[f"smar_seed{s}"] = _run("smar", s, r + 0.02)  # +0.02 on every seed
        runs[f"control_noimage_seed{s}"] = _run("none", s, r + (1 - r) / 2)  # share 0.5
    agg = aggregate({"base": base, "runs": runs})
    mean, half = agg["smar"]["delta_none"]
    # paired: the seed-to-seed spread of `none` (0.7-0.9) cancels; unpaired it would not
    assert mean == pytest.approx(0.02) and half == pytest.approx(0.0, abs=1e-9)
    assert significant(agg["smar"]["delta_none"])
    share, share_half = agg["control_noimage"]["image_share"]
    assert share == pytest.approx(0.5) and share_half == pytest.approx(0.0, abs=1e-9)
    # the terminal's verdict: the paired differences, starred where they exclude 0, the share
    text = summary_text({"base": base, "runs": runs})
    assert re.search(r"^smar +3 +0\.8\d\d ± 0\.\d+ +\+0\.020 ± 0\.000 \*", text, re.M)
    assert "image-driven share of the forgetting: 0.500 ± 0.000" in text and ": met)" in text
    # shuffling which seed is which breaks the pairing and widens the interval
    runs["smar_seed0"], runs["smar_seed1"] = _run("smar", 0, 0.92), _run("smar", 1, 0.82)
    assert aggregate({"base": base, "runs": runs})["smar"]["delta_none"][1] > 0.1


def test_stop_control_share_is_paired_reported_and_recorded(tmp_path):
    """The image-gradient-stop control's share ``(R_stop - R_none) / (1 - R_none)`` paired by seed
    beside the no-image one: in the aggregate, the terminal's verdict, the report's calibration
    table (one table: both rows before any note) and what ``results.json`` records."""
    base = {"scores": {"text/prose": 1.0, "text/facts": 1.0, "mm/digit": 0.1}}
    runs = {}
    for s, r in {0: 0.80, 1: 0.90, 2: 0.70}.items():
        runs[f"none_seed{s}"] = _run("none", s, r)
        runs[f"control_noimage_seed{s}"] = _run("none", s, r + (1 - r) / 2)  # share 0.5
        runs[f"control_stop_seed{s}"] = _run("none", s, r + (1 - r) * (0.2 + s / 10))
    results = {"base": base, "runs": runs}
    agg = aggregate(results)
    mean, half = agg["control_stop"]["stop_share"]
    assert mean == pytest.approx(0.3) and half == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)
    assert agg["control_stop"]["stop_share_by_seed"] == pytest.approx([0.2, 0.3, 0.4])
    assert agg["control_stop"]["delta_bench"]["retention/prose"][0] == pytest.approx(0.19 / 3)
    assert "stop_share" not in agg["control_noimage"] and "image_share" not in agg["control_stop"]
    shares = control_shares(agg)
    assert set(shares) == {"image_share", "stop_share"}
    assert shares["stop_share"]["control"] == "control_stop"
    assert shares["stop_share"]["mean"] == pytest.approx(0.3)
    assert shares["image_share"]["by_seed"] == pytest.approx([0.5] * 3)
    text = summary_text(results)
    assert "stop-control share of the forgetting: 0.300 ± 0.248" in text
    cfg = {"tune": {"steps": 1, "lr": 1.0, "text_ratio": 0.1, "trainable": "moe",
                    "num_experts": 4, "top_k": 2, "layers": "all", "band": [1.5, 2.0]},
           "seeds": [0, 1, 2]}  # fmt: skip
    extra = {"prose_bpb": 1.0, "unigram_bpb": 2.0, "pretrain": {}}
    report = write_report({**results, "base": {**base, **extra}, "config": cfg}, tmp_path)
    table = report.read_text().split("## Calibration")[1].split("\n\n")[1].splitlines()
    assert table[-2].startswith("| image-driven share | 0.500 ± 0.000")
    assert table[-1].startswith("| stop-control share | 0.300 ± 0.248 | `(R_stop - R_none)")
    assert any(line.startswith("| `control_stop` |") for line in table)
    # without the control, neither the share nor its line
    runs = {k: v for k, v in runs.items() if not k.startswith("control_stop")}
    assert "stop_share" not in control_shares(aggregate({"base": base, "runs": runs}))
    assert "stop-control" not in summary_text({"base": base, "runs": runs})


def test_significance_needs_an_interval_that_excludes_zero():
    assert significant((0.03, 0.02)) and significant((-0.03, 0.02))
    assert not significant((0.01, 0.02)) and not significant((0.05, float("nan")))


def test_band_runs_pair_with_the_one_none_per_seed():
    # a band sweep runs `none` once per seed (it has no band); each band's runs pair with it
    base = {"scores": {"text/prose": 1.0, "text/facts": 1.0, "mm/digit": 0.1}}
    runs = {}
    for s, r in {0: 0.80, 1: 0.90, 2: 0.70}.items():
        runs[f"none_text0.1_seed{s}"] = _run("none", s, r)
        runs[f"smar_text0.1_band1-1.5_seed{s}"] = _run("smar", s, r + 0.01)
        runs[f"smar_text0.1_band3-4_seed{s}"] = _run("smar", s, r - 0.03)
    agg = aggregate({"base": base, "runs": runs})
    assert agg["smar_text0.1_band1-1.5"]["delta_none"][0] == pytest.approx(0.01)
    assert agg["smar_text0.1_band3-4"]["delta_none"][0] == pytest.approx(-0.03)
    assert agg["smar_text0.1_band3-4"]["delta_none"][1] == pytest.approx(0.0, abs=1e-9)


def test_per_benchmark_differences_are_paired_and_include_the_no_image_control():
    base = {"scores": {"text/prose": 1.0, "text/facts": 1.0, "mm/digit": 0.1}}
    runs = {}
    for s, r in {0: 0.80, 1: 0.90, 2: 0.70}.items():
        runs[f"none_seed{s}"] = _run("none", s, r, mm=0.5 + s / 10)
        runs[f"smar_seed{s}"] = _run("smar", s, r + 0.01, mm=0.4 + s / 10)
        runs[f"control_noimage_seed{s}"] = _run("none", s, r - 0.02, mm=0.25)
    agg = aggregate({"base": base, "runs": runs})
    d = agg["smar"]["delta_bench"]
    assert set(d) == {"retention/prose", "retention/facts", "mm/digit"}
    assert d["retention/prose"][0] == pytest.approx(0.01)
    assert d["retention/prose"][1] == pytest.approx(0.0, abs=1e-9)  # paired: the spread cancels
    assert d["mm/digit"][0] == pytest.approx(-0.1) and significant(d["mm/digit"])
    noimage = agg["control_noimage"]["delta_bench"]
    assert noimage["retention/facts"][0] == pytest.approx(-0.02)
    assert agg["none"]["delta_bench"] == {}
