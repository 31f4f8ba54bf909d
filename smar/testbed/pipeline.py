"""The testbed pipeline (docs/method.md#experiment) end to end: data, stages 0-2 (cached), the
stage-1 evaluation, every stage-3 job, ``results.json``, the report and its plots, and the routing
of every run (``analysis/index.html``, as ``smar analyze`` writes it).

Stages 0-2 are cached in ``cache_dir()/stages`` under a hash of every config they depend on, so
runs with the same early config reuse them. Stage-3 runs are independent processes
(:mod:`smar.testbed.jobs`); each writes its resolved config, metrics and checkpoint to
``<out>/<run>/`` and is skipped when already complete.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from smar.testbed.compare import aggregate, control_shares
from smar.testbed.config import RunConfig
from smar.testbed.data.bundle import Bundle, load_bundle
from smar.testbed.data.mixing import TextStream, collate, mixed_items
from smar.testbed.evaluate import eval_sets, evaluate_model
from smar.testbed.io import write_json
from smar.testbed.jobs import run_jobs
from smar.testbed.overrides import to_dict
from smar.testbed.report import write_report
from smar.testbed.scoring import unigram_bits_per_byte
from smar.testbed.stages import (
    final_stage,
    stage_align,
    stage_dir,
    stage_instruct,
    stage_metrics,
    stage_names,
    stage_scores,
)
from smar.testbed.validate import validate_config

log = logging.getLogger(__name__)


def image_text_ratio(cfg: RunConfig, bundle: Bundle, n: int = 400) -> float:
    """Image tokens per text token in the multimodal samples of stage 3 (LLaVA: about 6)."""
    items = mixed_items(
        n,
        tok=bundle.tok,
        text=TextStream(bundle.train_ids, 0),
        seed=0,
        text_ratio=0.0,
        text_len=cfg.tune.text_len,
        image_size=cfg.data.image_size,
    )
    b = collate(items, bundle.tok, image_tokens=cfg.model.image_tokens)
    image = int((b.input_ids == bundle.tok.image_id).sum())
    return image / (int(b.attention_mask.sum()) - image)


def _base_extras(cfg: RunConfig, bundle: Bundle, base_eval: dict) -> dict:
    """Per-token perplexities of the stage-1 LM and the unigram model on the held-out prose,
    and the image:text token ratio of stage 3."""
    text = bundle.held_out[: cfg.data.prose_bytes]
    tokens_per_byte = len(bundle.tok.encode(text)) / len(text.encode("utf-8"))
    nats = math.log(2) / tokens_per_byte  # nats per token for one bit per byte
    return {
        "prose_ppl": math.exp(base_eval["prose_bpb"] * nats),
        "unigram_ppl": math.exp(base_eval["unigram_bpb"] * nats),
        "image_text_ratio": image_text_ratio(cfg, bundle),
    }


def evaluate_base(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> dict:
    """Scores of the stage-2 model (the stage-1 LM with its aligned projector: the reference of
    retention), cached beside it in ``scores.json``: every benchmark, the unigram baseline, the
    metrics of stages 0 and 1, perplexities and the image:text token ratio. With stage II, the
    stage-II model's scores too (``"instruct"``: what stage II itself cost and taught)."""

    def base_scores() -> dict:
        base = stage_align(cfg, bundle, quiet)
        scores, extra = evaluate_model(base, cfg, bundle, eval_sets(cfg, bundle))
        uni = unigram_bits_per_byte(
            bundle.tok, bundle.train_ids, bundle.held_out, max_bytes=cfg.data.prose_bytes
        )
        out = {
            "scores": scores,
            **extra,
            "unigram_bpb": uni,
            "pretrain": stage_metrics(cfg, "pretrain"),
            "vision": stage_metrics(cfg, "vision"),
        }
        out.update(_base_extras(cfg, bundle, out))
        return out

    def instruct_scores() -> dict:
        model = stage_instruct(cfg, bundle, quiet)
        scores, extra = evaluate_model(model, cfg, bundle, eval_sets(cfg, bundle))
        return {"scores": scores, **extra}

    base_eval = stage_scores(cfg, "align", base_scores)
    if final_stage(cfg) == "instruct":
        base_eval = {**base_eval, "instruct": stage_scores(cfg, "instruct", instruct_scores)}
    return base_eval


def run_pipeline(cfg: RunConfig, *, quiet: bool = False) -> dict:
    """Runs (or reuses) every stage and every stage-3 job; writes results.json, report.md, plots.

    Returns the results dictionary that ``results.json`` holds (``"shares"``: the controls' shares
    of the forgetting, see :func:`smar.testbed.compare.control_shares`).
    """
    jobs = validate_config(cfg)  # every check before any work; the stage-3 runs
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    bundle = load_bundle(cfg)
    timings: dict[str, Any] = {"data_s": time.time() - t_start}
    stage_instruct(cfg, bundle, quiet)  # stages 0-2 (and stage II), cached
    timings["stages_0_2_s"] = time.time() - t_start - timings["data_s"]
    timings["stage_build_s"] = {  # when each stage was built (this run or an earlier one)
        name: stage_metrics(cfg, name).get("seconds") for name in stage_names(cfg)
    }
    t_base = time.time()
    base_eval = evaluate_base(cfg, bundle, quiet)
    timings["base_eval_s"] = time.time() - t_base
    base_dir = stage_dir(cfg, final_stage(cfg))
    t3 = time.time()
    results = run_jobs(cfg, jobs, base_dir, quiet=quiet)
    timings["stage3_s"] = time.time() - t3
    timings["total_s"] = time.time() - t_start
    summary = {
        "base": base_eval,
        "runs": {j.name: results[j.name] for j in jobs},
        "jobs": [dataclasses.asdict(j) for j in jobs],
        "timings": timings,
        "config": to_dict(cfg),
    }
    summary["shares"] = control_shares(aggregate(summary))  # the controls' shares, paired
    write_json(out / "results.json", summary)
    write_report(summary, out)
    try:  # the routing of every run, seen: analysis/index.html (smar analyze on this folder)
        from smar.testbed.analyze_run import write_run_html

        write_run_html(out, quiet=quiet)
    except ImportError as e:  # matplotlib missing: report.md says the rest
        log.warning("no analysis/index.html: %s", e)
    return summary
