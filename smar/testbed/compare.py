"""Runs compared: runs grouped by name without their seed, 95% intervals over seeds, each group's
differences to ``none`` paired by seed (retention, multimodal accuracy, per benchmark), the
evaluation noise of those differences, and the shares of the forgetting that the controls
measure. The report (:mod:`smar.testbed.report`) writes what this computes."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from smar.testbed.evaluate import learned_benchmarks, summarize
from smar.testbed.stats import bootstrap_mean_retention, confidence_interval, image_driven_share

__all__ = ["aggregate", "control_shares", "significant"]

_MEANS = ("retention/mean", "retention/mean_wo_outlier", "retention/outlier")
# paired per benchmark with `none`
_CONTROLS_VS_NONE = ("control_noimage", "control_shuffled", "control_stop")
# each control's share of the forgetting, (R_control - R_none) / (1 - R_none) paired by seed:
# the no-image control's (images removed), the stop control's (the image tokens' MoE weight
# updates removed, the projector still learning: what routing by modality can act on)
SHARES = {"control_noimage": "image_share", "control_stop": "stop_share"}


def _group(name: str) -> str:
    return re.sub(r"_seed\d+$", "", name)


def aggregate(results: dict) -> dict[str, dict]:
    """Per group of runs (a run name without its seed): retention and accuracy with 95% CIs,
    differences to ``none`` paired by seed (``delta_none``, ``delta_mm_none``), the evaluation
    noise of the retention difference (``eval_noise``), and the shares of the forgetting: on
    ``control_noimage`` the image-driven one (``image_share``), on ``control_stop`` the one that
    passes through the image tokens' MoE weight updates (``stop_share``)."""
    base = results["base"]["scores"]
    include = learned_benchmarks(base)
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, r in results["runs"].items():
        groups[_group(name)].append(r)
    out = {}
    for g, runs in groups.items():
        sums = [summarize(r["scores"], base, include=include) for r in runs]
        row: dict[str, Any] = {"n": len(runs), "arm": runs[0]["arm"]}
        for key in ("retention/mean", "retention/mean_wo_outlier", "mm/mean"):
            row[key] = confidence_interval([float(s[key]) for s in sums])
        for key in sums[0]:
            if key.startswith("retention/") and key not in row and key != "retention/outlier":
                row[key] = confidence_interval([float(s[key]) for s in sums])
        for key in runs[0]["scores"]:
            if key.startswith("mm/"):
                row[key] = confidence_interval([r["scores"][key] for r in runs])
        row["outlier"] = sums[0]["retention/outlier"]
        layers = sorted(
            k for k in runs[0].get("routing", {}) if re.match(r"routing/layer\d+/mrd", k)
        )
        row["mrd"] = [sum(r["routing"][k] for r in runs) / len(runs) for k in layers]
        row["seeds"] = [r["seed"] for r in runs]
        row["_mean_by_seed"] = {
            r["seed"]: x["retention/mean"] for r, x in zip(runs, sums, strict=True)
        }
        row["_mm_by_seed"] = {r["seed"]: x.get("mm/mean") for r, x in zip(runs, sums, strict=True)}
        row["_run_by_seed"] = {r["seed"]: r for r in runs}
        row["_bench_by_seed"] = {  # retention per text benchmark, accuracy per multimodal one
            r["seed"]: {
                **{k: v for k, v in x.items() if k.startswith("retention/") and k not in _MEANS},
                **{k: v for k, v in r["scores"].items() if k.startswith("mm/")},
            }
            for r, x in zip(runs, sums, strict=True)
        }
        out[g] = row
    for g, row in out.items():  # paired over seeds: same data order, same router init
        none = _none_of(g, row, out)
        ref = out.get(none) if none is not None else None
        row["delta_none"] = row["delta_mm_none"] = row["eval_noise"] = (float("nan"),) * 2
        if ref is not None and ref is not row:
            common = [s for s in row["seeds"] if s in ref["_mean_by_seed"]]
            if common:
                row["delta_none"] = confidence_interval(
                    [row["_mean_by_seed"][s] - ref["_mean_by_seed"][s] for s in common]
                )
                row["delta_mm_none"] = confidence_interval(
                    [row["_mm_by_seed"][s] - ref["_mm_by_seed"][s] for s in common]
                )
                row["eval_noise"] = _eval_noise(row, ref, common, results["base"], include)
        # per benchmark, the no-image control against `none` too
        row["delta_bench"] = _paired_per_benchmark(
            row, out.get("none") if g in _CONTROLS_VS_NONE else ref
        )
    for group, key in SHARES.items():
        _share(out, group, key)
    for row in out.values():
        for key in [k for k in row if k.startswith("_")]:
            del row[key]
    return out


def _paired_per_benchmark(row: dict, ref: dict | None) -> dict[str, tuple[float, float]]:
    """Each benchmark's difference to ``ref`` paired by seed (95% interval); {} without one."""
    if ref is None or ref is row:
        return {}
    common = [s for s in row["seeds"] if s in ref["_bench_by_seed"]]
    out = {}
    for key in row["_bench_by_seed"][common[0]] if common else ():
        diffs = [row["_bench_by_seed"][s][key] - ref["_bench_by_seed"][s][key] for s in common]
        if not any(math.isnan(d) for d in diffs):
            out[key] = confidence_interval(diffs)
    return out


def _none_of(group: str, row: dict, out: dict) -> str | None:
    """The ``none`` group a group pairs with: the same text ratio, band and learning rate
    (``none`` has no band: it runs once per text ratio and learning rate)."""
    if not group.startswith(row["arm"]):
        return None
    suffix = group[len(row["arm"]) :]
    for name in ("none" + suffix, "none" + re.sub(r"_band[^_]+", "", suffix)):
        if name in out:
            return name
    return None


def significant(interval: tuple[float, float]) -> bool:
    """Whether a 95% interval ``(mean, half-width)`` excludes 0."""
    mean, half = interval
    return not (math.isnan(mean) or math.isnan(half)) and abs(mean) > half


def _eval_noise(
    row: dict, ref: dict, seeds: list, base: dict, include: list[str]
) -> tuple[float, float]:
    """The paired difference's evaluation noise alone: a bootstrap over the benchmark examples
    (models fixed) per seed, combined over seeds; ``(nan, nan)`` without per-example outcomes."""
    runs = [(row["_run_by_seed"][s], ref["_run_by_seed"][s]) for s in seeds]
    if "examples" not in base or any("examples" not in r for pair in runs for r in pair):
        return (float("nan"), float("nan"))
    var = 0.0
    for k, (arm, none) in enumerate(runs):
        boot = bootstrap_mean_retention(
            [arm["examples"], none["examples"]], base["examples"], include, seed=k
        )  # (samples, 2)
        var += float((boot[:, 0] - boot[:, 1]).var())
    return (0.0, 1.96 * math.sqrt(var) / len(runs))


def _share(out: dict, group: str, key: str) -> None:
    """Adds ``(R_group - R_none) / (1 - R_none)`` paired by seed (95% interval) to ``group`` as
    ``key``, and its values per seed as ``key_by_seed``."""
    none, control = out.get("none"), out.get(group)
    if none is None or control is None:
        return
    seeds = [s for s in control["seeds"] if s in none["_mean_by_seed"]]
    shares = [
        image_driven_share(none["_mean_by_seed"][s], control["_mean_by_seed"][s]) for s in seeds
    ]
    shares = [v for v in shares if not math.isnan(v)]
    control[key] = confidence_interval(shares) if shares else (float("nan"),) * 2
    control[f"{key}_by_seed"] = shares


def control_shares(agg: dict[str, dict]) -> dict[str, dict]:
    """The shares of the forgetting in ``aggregate``'s output, for ``results.json``: by key
    (``image_share``, ``stop_share``) the control it comes from, its mean and 95% half-width,
    and its value per seed; only the shares whose control ran."""
    out = {}
    for group, key in SHARES.items():
        if key in agg.get(group, {}):
            mean, half = agg[group][key]
            out[key] = {
                "control": group,
                "mean": mean,
                "half_width": half,
                "by_seed": agg[group][f"{key}_by_seed"],
            }
    return out
