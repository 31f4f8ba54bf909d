"""The testbed's report: calibration, arm table with confidence intervals, per-layer MRD,
per-benchmark tables (``report.md``) and plots, from the results dictionary of
:func:`smar.testbed.pipeline.run_pipeline`."""

from __future__ import annotations

import math
from pathlib import Path

from smar.testbed.compare import aggregate, significant
from smar.testbed.evaluate import learned_benchmarks
from smar.testbed.report_sections import (
    SHARE_TARGET,
    arms_section,
    benchmark_sections,
    calibration_section,
    fmt,
    language_section,
    noise_section,
    paired_section,
    plot_section,
    run_section,
    vision_section,
)

__all__ = ["summary_text", "write_report"]


def summary_text(results: dict) -> str:
    """The verdict for the terminal: each arm's mean retention and its differences to ``none``
    paired by seed (mean retention, multimodal accuracy, prose), ``*`` where the 95% interval
    excludes 0, and the image-driven share; ``report.md`` has the rest."""
    agg = aggregate(results)
    seeds = sorted({s for row in agg.values() for s in row["seeds"]})
    header = ("arm", "n", "mean retention", "Δ vs none", "Δ multimodal", "Δ prose")
    rows: list[tuple[str, ...]] = [header]
    for g, row in agg.items():
        if g.startswith("control_"):
            continue
        prose = row["delta_bench"].get("retention/prose", (float("nan"),) * 2)
        rows.append(
            (g, str(row["n"]), fmt(*row["retention/mean"]))
            + tuple(_star(d) for d in (row["delta_none"], row["delta_mm_none"], prose))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"SMAR testbed, seeds {seeds}: differences to `none` paired by seed, 95% intervals, "
        "* where the interval excludes 0",
        *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows),
    ]
    share = agg.get("control_noimage", {}).get("image_share")
    if share is not None:
        m, h = share
        shown = m >= SHARE_TARGET and significant(share)
        lines.append(
            f"image-driven share of the forgetting: {fmt(m, h)} (target >= {SHARE_TARGET} with "
            f"its interval above 0: {'met' if shown else 'not met'})"
        )
    stop = agg.get("control_stop", {}).get("stop_share")
    if stop is not None:
        lines.append(
            f"stop-control share of the forgetting: {fmt(*stop)} (the image tokens' MoE weight "
            "updates: what routing by modality can act on)"
        )
    return "\n".join(lines)


def _star(interval: tuple[float, float]) -> str:
    if math.isnan(interval[0]):
        return ""
    return fmt(*interval, sign="+") + (" *" if significant(interval) else "")


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Writes ``report.md``, ``mrd.png`` and ``retention_vs_accuracy.png`` into ``out_dir``: the
    sections of :mod:`smar.testbed.report_sections`, in order."""
    out = Path(out_dir)
    agg = aggregate(results)
    base = results["base"]
    arms = [g for g in agg if not g.startswith("control_")]
    learned = [k[5:] for k in learned_benchmarks(base["scores"])]
    lines = [
        *run_section(results, out),
        *vision_section(base),
        *language_section(base),
        *calibration_section(agg),
        *arms_section(agg, arms),
        *noise_section(agg, arms),
        *paired_section(agg, learned),
        *benchmark_sections(agg, base),
        *plot_section(agg, arms, tuple(results["config"]["tune"]["band"]), out),
    ]
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
