"""``smar real run``'s results: retention per benchmark, paired by seed, and ``report.md``.

Retention of a benchmark is the tuned model's score over the stage-1 model's: for bits per byte
(lower is better) ``bpb_stage1 / bpb``, for knowledge ``accuracy / accuracy_stage1``; ``R`` is the
mean over the language benchmarks. Every arm is compared with ``none`` on the same seed (same
samples, same order); intervals are 95% t intervals over seeds. The stop and no-image controls'
shares are ``(R_control - R_none) / (1 - R_none)`` per seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from smar.atomic import write_text
from smar.testbed.io import write_json
from smar.testbed.real.train import ARMS
from smar.testbed.stats import confidence_interval, image_driven_share

if TYPE_CHECKING:
    from smar.testbed.real.run import RealConfig

__all__ = ["retention", "aggregate", "write"]

LOWER_IS_BETTER = ("chat_bpb", "code_bpb", "prose_bpb")
BENCHMARKS = {
    "chat_bpb": "chat (base answers, bpb)",
    "code_bpb": "code (HumanEval, bpb)",
    "prose_bpb": "prose (Shakespeare, bpb)",
    "knowledge": "knowledge (exact)",
}
CONTROLS = {"stop": "image-gradient stop", "noimage": "no images",
            "stop_sample": "image-sample gradient stop"}  # fmt: skip


def retention(language: dict, base: dict) -> dict[str, float]:
    """Per-benchmark retention of one run's language scores against the stage-1 model's."""
    return {k: (base[k] / v if k in LOWER_IS_BETTER else v / base[k]) for k, v in language.items()}


LEARNS = {"train_loss": "training loss (mean of logged steps)",
          "image_answer_loss": "held-out image-answer loss (nats/token)"}


def _share(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


def _mean(values: Iterable[float | None]) -> float:
    """The mean of the finite values (None: not measured, e.g. no image token), NaN if none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ci(values: Iterable[float]) -> list[float]:
    mean, half = confidence_interval(list(values))
    return [mean, half]


def aggregate(stage1: dict, runs: dict) -> dict:
    """Per arm: retention per benchmark, ``R``, multimodal accuracy and the last logged per-layer
    MRD (means and intervals over seeds); per arm but ``none``: paired differences to ``none``;
    per control: its share of ``none``'s forgetting."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in runs.values():
        ret = retention(r["language"], stage1["language"])
        mm = r["multimodal"]
        last = r["log"][-1] if r["log"] else {}
        mrd = {k.split("/")[1]: v for k, v in last.items() if k.startswith("smar/layer")}
        losses = [row["loss"] for row in r["log"] if "loss" in row]
        by_arm.setdefault(r["arm"], {})[r["seed"]] = {
            "retention": ret, "R": sum(ret.values()) / len(ret), "mm": mm,
            "mm_mean": sum(mm.values()) / len(mm), "mrd": mrd, "probes": r.get("probes", {}),
            "learns": {"train_loss": _mean(losses), "image_answer_loss": r.get("image_answer_loss"),
                       "eval_share": _share(r.get("eval_seconds"), r.get("train_seconds"))},
        }  # fmt: skip
    out = {}
    for arm, seeds in by_arm.items():
        rows = list(seeds.values())
        a = {
            "seeds": sorted(seeds),
            "retention": {b: _ci(r["retention"][b] for r in rows) for b in rows[0]["retention"]},
            "R": _ci(r["R"] for r in rows),
            "multimodal": {t: _ci(r["mm"][t] for r in rows) for t in rows[0]["mm"]},
            "multimodal_mean": _ci(r["mm_mean"] for r in rows),
            "mrd": {k: _mean([r["mrd"].get(k) for r in rows]) for k in rows[0]["mrd"]},
            "R_by_seed": {s: r["R"] for s, r in seeds.items()},
            "learns": {k: _ci(r["learns"][k] for r in rows) for k in LEARNS
                       if all(r["learns"][k] is not None for r in rows)},
            "eval_share_max": max((x for r in rows if (x := r["learns"]["eval_share"]) is not None),
                                  default=math.nan),
            "probes": {
                p: _ci(r["probes"][p] for r in rows)
                for p in PROBES
                if all(r["probes"].get(p) is not None for r in rows)
            },  # fmt: skip
        }
        out[arm] = a
    none = by_arm.get("none", {})
    for arm, seeds in by_arm.items():
        paired = [s for s in seeds if s in none]
        if arm == "none" or not paired:
            continue
        diff = {b: _ci(seeds[s]["retention"][b] - none[s]["retention"][b] for s in paired)
                for b in none[paired[0]]["retention"]}  # fmt: skip
        diff["R"] = _ci(seeds[s]["R"] - none[s]["R"] for s in paired)
        diff["multimodal_mean"] = _ci(seeds[s]["mm_mean"] - none[s]["mm_mean"] for s in paired)
        out[arm]["learns_vs_none"] = {  # ratios to none's, paired by seed
            k: _ci(seeds[s]["learns"][k] / none[s]["learns"][k] for s in paired)
            for k in ("train_loss", "image_answer_loss")
            if all(x[s]["learns"][k] for s in paired for x in (seeds, none))
        }  # fmt: skip
        out[arm]["vs_none"] = diff
        if arm in CONTROLS:
            shares = [image_driven_share(none[s]["R"], seeds[s]["R"]) for s in paired]
            out[arm]["share"] = _ci(shares)
            out[arm]["share_by_seed"] = shares
    return out


def _f(x: list[float] | float, digits: int = 3) -> str:
    if isinstance(x, list):
        mean, half = x
        return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")
    return f"{x:.{digits}f}"


def _markdown(cfg: RealConfig, stage1: dict, agg: dict, meta: dict) -> str:
    arms = [a for a in ARMS if a in agg]
    lines = ["# smar real: SMAR on SmolLM2-135M-Instruct", "",
             f"Model: {meta['model']}; seeds {list(cfg.seeds)}; stage 3: {cfg.steps} steps of "
             f"{cfg.batch} samples, lr {cfg.lr}, {cfg.text_ratio:.1%} pure text; precision "
             f"{cfg.precision}. Intervals: 95% over seeds.", "",
             "## Stage-1 model (the reference)", "",
             "| benchmark | score |", "|---|---|"]  # fmt: skip
    lines += [f"| {BENCHMARKS[b]} | {v:.4f} |" for b, v in stage1["language"].items()]
    lines += [
        f"| knowledge questions scored (the base answers them right) | "
        f"{stage1['knowledge_asked']} |"
    ]
    lines += [f"| image: {t} | {v:.3f} |" for t, v in stage1["multimodal"].items()]
    lines += ["", "## Language retention (1 = as the stage-1 model)", "",
              "| arm | " + " | ".join(BENCHMARKS[b] for b in BENCHMARKS) + " | R | image acc. |",
              "|---" * (len(BENCHMARKS) + 3) + "|"]  # fmt: skip
    for arm in arms:
        a = agg[arm]
        cells = [_f(a["retention"][b]) if b in a["retention"] else "-" for b in BENCHMARKS]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_f(a['R'])} | "
                     f"{_f(a['multimodal_mean'])} |")  # fmt: skip
    none = agg.get("none")
    if none:
        below = [BENCHMARKS[b] for b, (m, h) in none["retention"].items() if m + h < 1]
        lines += ["", "Forgetting (none's retention with its 95% interval below 1): "
                  + (", ".join(below) if below else "**none**: no benchmark")]  # fmt: skip
    diffs = [a for a in arms if "vs_none" in agg[a]]
    if diffs:
        lines += ["", "## Paired differences to none (retention; image accuracy)", "",
                  "| arm | " + " | ".join(BENCHMARKS[b] for b in BENCHMARKS)
                  + " | R | image acc. |", "|---" * (len(BENCHMARKS) + 3) + "|"]  # fmt: skip
        for arm in diffs:
            d = agg[arm]["vs_none"]
            lines.append(f"| {arm} | " + " | ".join(_f(d[b]) if b in d else "-" for b in BENCHMARKS)
                         + f" | {_f(d['R'])} | {_f(d['multimodal_mean'])} |")  # fmt: skip
    shares = [a for a in arms if "share" in agg[a]]
    if shares:
        lines += ["", "## What routing by modality can act on", ""]
        for arm in shares:
            lines.append(
                f"- {CONTROLS[arm]} control's share of none's forgetting, "
                f"(R_{arm} - R_none) / (1 - R_none): {_f(agg[arm]['share'], 2)}"
            )
    lines += _probe_lines(stage1, agg, arms)
    lines += _learn_lines(stage1, agg, arms)
    lines += ["", "## Per-layer MRD (last logged training step, mean over seeds)", "",
              "| arm | " + " | ".join(next(iter(agg.values()))["mrd"]) + " |",
              "|---" * (len(next(iter(agg.values()))["mrd"]) + 1) + "|"]  # fmt: skip
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in agg[arm]["mrd"].values())
                     + " |")  # fmt: skip
    t = meta["timing"]
    lines += ["", f"This invocation: {t['total'] / 60:.1f} min, finished runs reused (base "
              f"answers {t['base_answers']:.0f} s, "
              f"stages 0-1 {t['vision_align']:.0f} s, stage 3 {t['stage3'] / 60:.1f} min in "
              f"{t['workers']} process(es) side by side); peak memory "
              f"{meta['peak_memory_gib']:.1f} GiB a process."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _learn_lines(stage1: dict, agg: dict, arms: list[str]) -> list[str]:
    """Whether each arm still learns the multimodal task (its losses, and their ratio to none's
    paired by seed), and what evaluation cost against training."""
    lines = ["", "## Still learning, and the cost of evaluation", "",
             "| arm | " + " | ".join(LEARNS.values()) + " | training loss / none's | "
             "image-answer loss / none's | evaluation / training time (largest run) |",
             "|---" * 6 + "|"]  # fmt: skip
    if stage1.get("image_answer_loss") is not None:
        lines.append(f"| stage 1 | - | {stage1['image_answer_loss']:.3f} | - | - | - |")
    for arm in arms:
        a, vs = agg[arm], agg[arm].get("learns_vs_none", {})
        cells = [_f(a["learns"][k]) if k in a["learns"] else "-" for k in LEARNS]
        cells += [_f(vs[k]) if k in vs else "-" for k in ("train_loss", "image_answer_loss")]
        share = a.get("eval_share_max", math.nan)
        cells.append("-" if math.isnan(share) else f"{share:.0%}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


PROBES = {
    "format_free": "knowledge, format-free (rank 1 of 5)",
    "format_kept": "base answer frame kept",
    "first_token_kl": "first-token KL to stage 1 (nats)",
    "code_defines": "code: defines the function",
    "code_length": "code: length / base's",
}


def _probe_lines(stage1: dict, agg: dict, arms: list[str]) -> list[str]:
    """The format and fact probes: absolute values (mean over seeds), stage 1 first."""
    names = [p for p in PROBES if any(p in agg[a].get("probes", {}) for a in arms)]
    if not names:
        return []
    lines = ["", "## Format and fact apart (absolute; 95% intervals over seeds)", "",
             "| model | " + " | ".join(PROBES[p] for p in names) + " |",
             "|---" * (len(names) + 1) + "|"]  # fmt: skip
    first = stage1.get("probes", {})
    lines.append("| stage 1 | " + " | ".join(
        "0.000" if p == "first_token_kl" else _f(first[p]) if first.get(p) is not None else "-"
        for p in names) + " |")  # fmt: skip
    for arm in arms:
        got = agg[arm].get("probes", {})
        lines.append(f"| {arm} | " + " | ".join(_f(got[p]) if p in got else "-" for p in names)
                     + " |")  # fmt: skip
    return lines


def write(out: str | Path, cfg: RealConfig, stage1: dict, runs: dict, meta: dict) -> dict:
    """Writes ``results.json`` and ``report.md`` into ``out``; returns the results."""
    out = Path(out)
    agg = aggregate(stage1, runs)
    results = {"stage1": stage1, "arms": agg, **meta,
               "runs": {k: {x: v.get(x) for x in ("arm", "seed", "language", "multimodal",
                                                  "probes", "image_answer_loss",
                                                  "train_seconds", "eval_seconds")}
                        for k, v in runs.items()}}  # fmt: skip
    write_json(out / "results.json", results)
    write_text(out / "report.md", _markdown(cfg, stage1, agg, meta))
    return results
