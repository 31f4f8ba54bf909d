"""The sections of the testbed's ``report.md``, one function each, each returning its lines:
the run (base, stage 3, wall time), the vision encoder, the stage-1 language model and stage II,
calibration (with the controls' shares), the arms, the noise of their differences, the paired
differences per benchmark, the tables per benchmark and the plots.
:func:`smar.testbed.report.write_report` puts them together."""

from __future__ import annotations

import math
from pathlib import Path

from smar.testbed.compare import significant
from smar.testbed.evaluate import LEARNED, learned_benchmarks, summarize

SHARE_TARGET = 0.3  # the image-driven share the testbed's default regime should reach

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
    (
        "control_stop",
        "image-gradient-stop control (`none` whose image tokens give nothing to the MoE weights' "
        "gradients, the projector still learning): forgetting without the image tokens' updates",
        None,
        None,
    ),
    (
        "control_shuffled",
        "shuffled-image control (each sample shows another's image): the image tokens stay, "
        "the answers cannot be read off them",
        None,
        None,
    ),
)


_BASES = {
    "upcycle": "MoE-LLaVA: the dense stage-1 LM's FFNs become copied experts at stage 3",
    "native": "VITA on Mixtral: stage 1 pretrains a MoE LM whose experts differ from the start",
}


def fmt(mean: float, half: float, digits: int = 3, sign: str = "") -> str:
    """``mean ± half``; ``sign="+"`` writes differences with their sign."""
    if math.isnan(half):
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {half:.{digits}f}"


def delta(mean: float, half: float) -> str:
    """A paired difference; bold when its 95% interval excludes 0."""
    if math.isnan(mean):
        return ""
    text = fmt(mean, half, sign="+")
    return f"**{text}**" if significant((mean, half)) else text


STAGE_NAMES = {"vision": "0", "pretrain": "1", "align": "2", "instruct": "II"}


def _stage_seconds(timings: dict) -> str:
    """The sentence giving each stage's build time, from the stages' records (a cached stage
    keeps the time it took when it was built); empty without records."""
    built = {k: v for k, v in timings.get("stage_build_s", {}).items() if v is not None}
    if not built:
        return ""
    parts = [f"stage {STAGE_NAMES.get(k, k)} {v:.0f} s" for k, v in built.items()]
    return " Stage build times (when built): " + ", ".join(parts) + "."


def vision_section(base: dict) -> list[str]:
    """The frozen vision encoder's held-out accuracy per multimodal benchmark (stage 0's probe):
    the ceiling of what the language model can read from its image tokens."""
    probe = base.get("vision", {}).get("probe_eval")
    if not probe:
        return []
    return [
        "## Vision encoder (stage 0)",
        "",
        "Its pretraining head, on the held-out images of each multimodal benchmark (the ceiling of "
        "what the LM can read from its image tokens): "
        + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())
        + ".",
        "",
    ]


def _share_lines(agg: dict) -> list[str]:
    """The calibration table's rows of the controls' shares of the forgetting (no-image, then
    image-gradient stop), then what they mean."""
    rows, notes = [], []
    if "image_share" in agg.get("control_noimage", {}):
        m, h = agg["control_noimage"]["image_share"]
        ok = "yes" if m >= SHARE_TARGET and significant((m, h)) else "**no**"
        rows.append(
            f"| image-driven share | {fmt(m, h)} | `(R_noimage - R_none) / (1 - R_none)`, paired "
            f"by seed: >= {SHARE_TARGET} with its interval above 0 | {ok} |"
        )
        if math.isnan(m) or math.isnan(h):
            notes.append(_no_interval("image-driven", m))
        elif not (m > 0 and significant((m, h))):
            notes.append(
                "The image-driven share is not shown to be above 0 (its interval reaches 0 or "
                "below): as measured, the text alone may cause all of the forgetting, and then no "
                "routing method that acts on image tokens can help."
            )
    if "stop_share" in agg.get("control_stop", {}):
        m, h = agg["control_stop"]["stop_share"]
        rows.append(
            f"| stop-control share | {fmt(m, h)} | `(R_stop - R_none) / (1 - R_none)`, paired by "
            "seed: the forgetting that passes through the image tokens' expert and router weight "
            "updates, at most what routing by modality can recover |  |"
        )
        why = (
            "The stop control keeps the images and the projector's learning and removes only the "
            "image tokens' share of the MoE weights' updates; the no-image control also makes the "
            "answers unreadable from an image, which biases its share down."
        )
        if math.isnan(m) or math.isnan(h):
            why += " " + _no_interval("stop-control", m)
        notes.append(why)
    return rows + [line for note in notes for line in ("", note)]


def _no_interval(share: str, mean: float) -> str:
    if math.isnan(mean):  # no seed where `none` forgot anything
        return f"The {share} share needs `none` to forget (its retention below 1 on some seed)."
    return f"The {share} share needs two seeds or more for an interval."


def run_section(results: dict, out: Path) -> list[str]:
    """The title, the base, stage 3's settings and the wall time."""
    cfg = results["config"]
    lines = [f"# SMAR testbed report ({out.name})", ""]
    t = results.get("timings", {})
    base_name = cfg["tune"].get("base", "upcycle")
    lines += [
        f"Base `{base_name}` ({_BASES[base_name]}). "
        f"Stage 3: {cfg['tune']['steps']} steps, lr {cfg['tune']['lr']:g}, text ratio "
        f"{cfg['tune']['text_ratio']:g}, trainable `{cfg['tune']['trainable']}`, "
        f"{cfg['tune']['num_experts']} experts top-{cfg['tune']['top_k']}, MoE layers "
        f"`{cfg['tune']['layers']}`; seeds {cfg['seeds']}. Intervals are 95% t-intervals over "
        "seeds (none with one seed).",
        f"Wall time: total {t.get('total_s', float('nan')):.0f} s (data "
        f"{t.get('data_s', 0):.0f} s, stages 0-2 {t.get('stages_0_2_s', 0):.0f} s, stage 3 "
        f"{t.get('stage3_s', 0):.0f} s).{_stage_seconds(t)}",
        "",
    ]
    return lines


def language_section(base: dict) -> list[str]:
    """The stage-1 language model, the benchmarks mean retention averages, and stage II."""
    lines = [
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
    ]
    if "instruct" in base:
        ins = base["instruct"]["scores"]
        cost = summarize(ins, base["scores"], include=learned_benchmarks(base["scores"]))
        lines += [
            "",
            "## Stage II (dense multimodal instruction tuning before stage 3)",
            "",
            f"Retention of the stage-II model against the stage-1 LM: {cost['retention/mean']:.3f}"
            " (what stage II itself cost; stage-3 retention below is against the stage-1 LM and "
            "includes it). Multimodal accuracy after stage II: "
            + ", ".join(f"{k[3:]} {v:.3f}" for k, v in ins.items() if k.startswith("mm/"))
            + ".",
        ]
    return lines


def calibration_section(agg: dict) -> list[str]:
    """The controls against their thresholds, the controls' shares, the controls not run."""
    lines = [
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
        lines.append(f"| `{g}` | {fmt(m, h)} | {text} | {ok} |")
    lines += _share_lines(agg)
    # the controls with a threshold (the text-ratio ones) that did not run here
    missing = [f"`{g}`" for g, _, thr, _ in CALIBRATION if g != "none" and thr and g not in agg]
    if missing:
        lines += [
            "",
            f"Not run here: {' and '.join(missing)} (the text-ratio controls run on the first "
            "`control_seeds` seeds; `smar sweep` runs them on one).",
        ]
    return lines


def arms_section(agg: dict, arms: list[str]) -> list[str]:
    """Each arm's retention, its paired differences to ``none``, the floor avoided, its MRD."""
    floor = agg.get("hard_sample", {}).get("retention/mean", (float("nan"),))[0]
    none = agg.get("none", {}).get("retention/mean", (float("nan"),))[0]
    lines = [
        "",
        "## Arms",
        "",
        "Retention = score after stage 3 / stage-1 score, mean over the text benchmarks; "
        "`Δ vs none` is the arm's mean retention minus `none`'s with the same seed (and the same "
        "text ratio, band and learning rate), averaged over seeds: a paired interval, tighter than "
        "comparing the two intervals; **bold** where the interval excludes 0 (with one seed "
        "there is no interval and nothing is marked). `Δ multimodal` is the same for "
        "multimodal accuracy. `w/o outlier` drops the benchmark that moved most. "
        "`avoided` is the share of the loss between `none` and the sample-level hard-routing "
        "floor that the arm avoids "
        "(n/a when that floor does not retain at least 0.01 more than `none`). "
        "MRD is measured at token level on a held-out half-text mix.",
        "",
        "| arm | n | mean retention | Δ vs `none` (paired) | w/o outlier | multimodal acc. | "
        "Δ multimodal | avoided | MRD per layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in arms:
        r = agg[g]
        m = r["retention/mean"][0]
        avoided = (m - none) / (floor - none) if floor - none > 0.01 else float("nan")
        mrd = ", ".join(f"{v:.2f}" for v in r["mrd"])
        lines.append(
            f"| `{g}` | {r['n']} | {fmt(*r['retention/mean'])} | {delta(*r['delta_none'])} | "
            f"{fmt(*r['retention/mean_wo_outlier'])} (drops {r['outlier']}) | "
            f"{fmt(*r['mm/mean'])} | {delta(*r['delta_mm_none'])} | "
            f"{'n/a' if math.isnan(avoided) else f'{avoided:.2f}'} | {mrd} |"
        )
    return lines


def noise_section(agg: dict, arms: list[str]) -> list[str]:
    """The seeds' and the evaluation examples' parts of the noise of ``Δ vs none``."""
    noisy = [g for g in arms if not math.isnan(agg[g]["eval_noise"][1])]
    if not noisy:
        return []
    lines = [
        "",
        "### Noise of the paired differences",
        "",
        "Two sources of noise in `Δ vs none`: the seeds (the 95% t-interval above) and the "
        "evaluation examples (a bootstrap over the examples of every benchmark, the models "
        "fixed, combined over seeds). The second is the part that more evaluation examples "
        "would remove.",
        "",
        "| arm | Δ vs `none` | seed interval ± | evaluation-noise interval ± |",
        "|---|---|---|---|",
    ]
    for g in noisy:
        m, h = agg[g]["delta_none"]
        lines.append(f"| `{g}` | {m:+.3f} | {h:.3f} | {agg[g]['eval_noise'][1]:.3f} |")
    return lines


def paired_section(agg: dict, learned: list[str]) -> list[str]:
    """Each benchmark's difference to ``none`` paired by seed."""
    paired = [g for g in agg if agg[g].get("delta_bench")]
    if not paired:
        return []
    keys = list(agg[paired[0]]["delta_bench"])
    in_mean = {f"retention/{k}" for k in learned}
    lines = [
        "",
        "### Paired differences per benchmark",
        "",
        "Each benchmark's difference to `none` with the same seed (retention for text, "
        "accuracy for multimodal; the no-image and stop controls against `none` too), 95% "
        "interval, **bold** where it excludes 0; `*` marks the benchmarks in mean retention. "
        "One benchmark's seed-to-seed swings (a skill that breaks on one seed) widen the "
        "mean's interval; this table shows which.",
        "",
        "| run | "
        + " | ".join(k.split("/", 1)[1] + ("*" if k in in_mean else "") for k in keys)
        + " |",
        "|---|" + "---|" * len(keys),
    ]
    for g in paired:
        d = agg[g]["delta_bench"]
        lines.append(
            f"| `{g}` | " + " | ".join(delta(*d[k]) if k in d else "" for k in keys) + " |"
        )
    return lines


def benchmark_sections(agg: dict, base: dict) -> list[str]:
    """Retention per text benchmark and multimodal accuracy per benchmark, for every run."""
    bench = [
        k
        for k in next(iter(agg.values()))
        if k.startswith("retention/") and k not in ("retention/mean", "retention/mean_wo_outlier")
    ]
    mm = [k for k in next(iter(agg.values())) if k.startswith("mm/") and k != "mm/mean"]
    lines = [
        "",
        "## Retention per text benchmark",
        "",
        "| run | " + " | ".join(b[10:] for b in bench) + " |",
        "|---|" + "---|" * len(bench),
    ]
    for g, r in agg.items():
        lines.append(f"| `{g}` | " + " | ".join(fmt(*r[b]) for b in bench) + " |")
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
        lines.append(f"| `{g}` | " + " | ".join(fmt(*r[b]) for b in mm) + " |")
    return lines


def plot_section(agg: dict, arms: list[str], band: tuple, out: Path) -> list[str]:
    """``mrd.png`` and ``retention_vs_accuracy.png`` drawn, and the lines that show them."""
    lines: list[str] = []
    try:
        from smar.plots import plot_mrd, plot_retention_vs_accuracy

        plot_mrd(
            {g: agg[g]["mrd"] for g in arms if agg[g]["mrd"]},
            out / "mrd.png",
            band=band,
        )
        # paired differences to `none`: the seed-to-seed spread that every arm shares cancels
        paired = {
            g: {
                "retention": agg[g]["delta_none"][0],
                "accuracy": agg[g]["delta_mm_none"][0],
                "retention_ci": _ci(agg[g]["delta_none"][1]),
                "accuracy_ci": _ci(agg[g]["delta_mm_none"][1]),
            }
            for g in arms
            if not math.isnan(agg[g]["delta_none"][0])
        }
        lines += ["", "![MRD per layer](mrd.png)"]
        if paired:
            plot_retention_vs_accuracy(
                paired,
                out / "retention_vs_accuracy.png",
                title="Language kept vs multimodal accuracy: each arm minus `none`, paired by "
                "seed (95% intervals)",
                xlabel="Δ mean language retention",
                ylabel="Δ mean multimodal accuracy",
                origin=True,
            )
            lines += ["", "![retention vs accuracy](retention_vs_accuracy.png)"]
    except ImportError:
        lines += ["", "(plots skipped: install matplotlib)"]
    return lines


def _ci(h: float) -> float | None:
    return None if math.isnan(h) else h
