"""The testbed's report: calibration, arm table with confidence intervals, per-layer MRD,
per-benchmark tables (``report.md``) and plots, from the results dictionary of
:func:`smar.testbed.pipeline.run_pipeline`."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from smar.testbed.evaluate import LEARNED, learned_benchmarks, summarize
from smar.testbed.stats import confidence_interval

__all__ = ["aggregate", "write_report"]

CALIBRATION = (  # (group, what it checks, threshold, direction)
    ("control_text", "pure-text control (stage 3 on 100% text) keeps >= 98%", 0.98, ">="),
    ("none", "`none` at the default text ratio keeps <= 90%", 0.90, "<="),
    ("control_none50", "`none` at 50% text keeps >= 95%", 0.95, ">="),
    (
        "control_noimage",
        "no-image control (images removed): forgetting from the text alone",
        None,
        None,
    ),
)


def _group(name: str) -> str:
    return re.sub(r"_seed\d+$", "", name)


def _fmt(mean: float, half: float, digits: int = 3, sign: str = "") -> str:
    """``mean ± half``; ``sign="+"`` writes differences with their sign."""
    if math.isnan(half):
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {half:.{digits}f}"


def _delta(mean: float, half: float) -> str:
    return "" if math.isnan(mean) else _fmt(mean, half, sign="+")


def aggregate(results: dict) -> dict[str, dict]:
    """Per group of runs (a run name without its seed): retention and accuracy with 95% CIs."""
    base = results["base"]["scores"]
    include = learned_benchmarks(base)
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, r in results["runs"].items():
        groups[_group(name)].append(r)
    out = {}
    for g, runs in groups.items():
        sums = [summarize(r["scores"], base, include=include) for r in runs]
        row = {"n": len(runs), "arm": runs[0]["arm"]}
        for key in ("retention/mean", "retention/mean_wo_outlier", "mm/mean"):
            row[key] = confidence_interval([s[key] for s in sums])
        for key in sums[0]:
            if key.startswith("retention/") and key not in row and key != "retention/outlier":
                row[key] = confidence_interval([s[key] for s in sums])
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
        out[g] = row
    for g, row in out.items():  # paired over seeds: same data order, same router init
        ref = out.get("none" + g[len(row["arm"]) :]) if g.startswith(row["arm"]) else None
        row["delta_none"] = (float("nan"), float("nan"))
        if ref is not None and ref is not row:
            common = [s for s in row["seeds"] if s in ref["_mean_by_seed"]]
            if common:
                row["delta_none"] = confidence_interval(
                    [row["_mean_by_seed"][s] - ref["_mean_by_seed"][s] for s in common]
                )
    for row in out.values():
        del row["_mean_by_seed"]
    return out


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Writes ``report.md``, ``mrd.png`` and ``retention_vs_accuracy.png`` into ``out_dir``."""
    out = Path(out_dir)
    agg = aggregate(results)
    base = results["base"]
    cfg = results["config"]
    lines = [f"# SMAR testbed report ({Path(out).name})", ""]
    t = results.get("timings", {})
    lines += [
        f"Stage 3: {cfg['tune']['steps']} steps, lr {cfg['tune']['lr']:g}, text ratio "
        f"{cfg['tune']['text_ratio']:g}, trainable `{cfg['tune']['trainable']}`, "
        f"{cfg['tune']['num_experts']} experts top-{cfg['tune']['top_k']}, MoE layers "
        f"`{cfg['tune']['layers']}`; seeds {cfg['seeds']}. Intervals are 95% t-intervals over "
        "seeds (none with one seed).",
        f"Wall time: total {t.get('total_s', float('nan')):.0f} s (data "
        f"{t.get('data_s', 0):.0f} s, stages 0-2 {t.get('stages_0_2_s', 0):.0f} s, stage 3 "
        f"{t.get('stage3_s', 0):.0f} s).",
        "",
        "## Stage-1 language model",
        "",
        f"Held-out prose: {base['prose_bpb']:.3f} bits/byte (unigram model: "
        f"{base['unigram_bpb']:.3f}); per-token perplexity "
        f"{base.get('prose_ppl', float('nan')):.1f} (unigram: "
        f"{base.get('unigram_ppl', float('nan')):.1f}); pretraining throughput "
        f"{base['pretrain'].get('tokens_per_s', float('nan')):.0f} tokens/s. Multimodal "
        f"samples hold {base.get('image_text_ratio', float('nan')):.1f} image tokens per text "
        "token.",
        "",
        "| benchmark | stage-1 score |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in base["scores"].items()]
    learned = [k[5:] for k in learned_benchmarks(base["scores"])]
    lines += [
        "",
        f"Mean retention averages the benchmarks the stage-1 LM learned (prose, and choice "
        f"tasks at >= {LEARNED:.0%}): {', '.join(learned)}.",
        "",
        "## Calibration",
        "",
        "| control | retention | check | passes |",
        "|---|---|---|---|",
    ]
    for g, text, thr, op in CALIBRATION:
        if g not in agg:
            continue
        m, h = agg[g]["retention/mean"]
        ok = "" if thr is None else ("yes" if (m >= thr if op == ">=" else m <= thr) else "**no**")
        lines.append(f"| `{g}` | {_fmt(m, h)} | {text} | {ok} |")
    arms = [g for g in agg if not g.startswith("control_")]
    floor = agg.get("hard_sample", {}).get("retention/mean", (float("nan"),))[0]
    none = agg.get("none", {}).get("retention/mean", (float("nan"),))[0]
    lines += [
        "",
        "## Arms",
        "",
        "Retention = score after stage 3 / stage-1 score, mean over the text benchmarks; "
        "`Δ vs none` is the arm's mean retention minus `none`'s with the same seed (and the same "
        "text ratio, band and learning rate), averaged over seeds: a paired interval, tighter than "
        "comparing the two intervals. `w/o outlier` drops the benchmark that moved most. "
        "`avoided` is the share of the loss between `none` and the sample-level hard-routing "
        "floor that the arm avoids "
        "(n/a when that floor does not retain at least 0.01 more than `none`). "
        "MRD is measured at token level on a held-out half-text mix.",
        "",
        "| arm | n | mean retention | Δ vs `none` (paired) | w/o outlier | multimodal acc. | "
        "avoided | MRD per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in arms:
        r = agg[g]
        m = r["retention/mean"][0]
        avoided = (m - none) / (floor - none) if floor - none > 0.01 else float("nan")
        mrd = ", ".join(f"{v:.2f}" for v in r["mrd"])
        lines.append(
            f"| `{g}` | {r['n']} | {_fmt(*r['retention/mean'])} | {_delta(*r['delta_none'])} | "
            f"{_fmt(*r['retention/mean_wo_outlier'])} (drops {r['outlier']}) | "
            f"{_fmt(*r['mm/mean'])} | {'n/a' if math.isnan(avoided) else f'{avoided:.2f}'} | "
            f"{mrd} |"
        )
    bench = [
        k
        for k in next(iter(agg.values()))
        if k.startswith("retention/") and k not in ("retention/mean", "retention/mean_wo_outlier")
    ]
    mm = [k for k in next(iter(agg.values())) if k.startswith("mm/") and k != "mm/mean"]
    lines += [
        "",
        "## Retention per text benchmark",
        "",
        "| run | " + " | ".join(b[10:] for b in bench) + " |",
        "|---|" + "---|" * len(bench),
    ]
    for g, r in agg.items():
        lines.append(f"| `{g}` | " + " | ".join(_fmt(*r[b]) for b in bench) + " |")
    lines += [
        "",
        "## Multimodal accuracy per benchmark",
        "",
        "| run | " + " | ".join(b[3:] for b in mm) + " |",
        "|---|" + "---|" * len(mm),
    ]
    lines.append(
        "| stage-2 (before tuning) | " + " | ".join(f"{base['scores'][b]:.3f}" for b in mm) + " |"
    )
    for g, r in agg.items():
        lines.append(f"| `{g}` | " + " | ".join(_fmt(*r[b]) for b in mm) + " |")
    try:
        from smar.plots import plot_mrd, plot_retention_vs_accuracy

        plot_mrd(
            {g: agg[g]["mrd"] for g in arms if agg[g]["mrd"]},
            out / "mrd.png",
            band=tuple(cfg["tune"]["band"]),
        )
        plot_retention_vs_accuracy(
            {
                g: {
                    "retention": agg[g]["retention/mean"][0],
                    "accuracy": agg[g]["mm/mean"][0],
                    "retention_ci": _ci(agg[g]["retention/mean"][1]),
                    "accuracy_ci": _ci(agg[g]["mm/mean"][1]),
                }
                for g in agg
            },
            out / "retention_vs_accuracy.png",
        )
        lines += [
            "",
            "![MRD per layer](mrd.png)",
            "",
            "![retention vs accuracy](retention_vs_accuracy.png)",
        ]
    except ImportError:
        lines += ["", "(plots skipped: install matplotlib)"]
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _ci(h: float):
    return None if math.isnan(h) else h
