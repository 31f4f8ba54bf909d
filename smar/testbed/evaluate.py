"""Evaluation of a testbed model: the held-out benchmarks (text skills, multimodal questions,
prose), per-layer routing statistics on a held-out mix, and retention against the stage-1 LM.

Benchmark names are ``text/<task>`` and ``mm/<question type>``; scores are higher-is-better
(:mod:`smar.testbed.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from smar.errors import UsageError
from smar.metrics import RoutingStats
from smar.testbed.config import RunConfig
from smar.testbed.data import questions, skills
from smar.testbed.data.bundle import Bundle, data_key
from smar.testbed.data.mixing import TextStream, collate, mixed_items
from smar.testbed.model import TinyModel
from smar.testbed.overrides import config_hash
from smar.testbed.scoring import (
    ChoiceItem,
    choice_correct,
    choice_logprobs,
    mm_items,
    prose_bits_per_byte,
    text_items,
)
from smar.testbed.stats import mean_retention, mean_without_outlier, retention

__all__ = ["eval_sets", "evaluate_model", "routing_summary", "learned_benchmarks", "summarize"]


# benchmark name -> its items: the text skills' and the multimodal question types'
EvalSets = tuple[dict[str, list[ChoiceItem]], dict[str, list[ChoiceItem]]]

_SETS: dict[str, EvalSets] = {}  # the last evaluation sets built in this process, by data key


def eval_sets(cfg: RunConfig, bundle: Bundle) -> EvalSets:
    """The held-out benchmarks (deterministic): text skills and multimodal question types.

    Built once per process and data config (a stage-3 worker evaluates several runs on the
    same sets; building them draws 1000 images and encodes 7000 questions)."""
    key = config_hash(data_key(cfg.data), cfg.model.image_tokens)
    if key not in _SETS:
        _SETS.clear()
        _SETS[key] = _build_eval_sets(cfg, bundle)
    return _SETS[key]


def _build_eval_sets(cfg: RunConfig, bundle: Bundle) -> EvalSets:
    seed = 10_000 + cfg.data.seed  # disjoint from the pretraining examples' seed
    text = {
        t: text_items(skills.skill_examples(t, cfg.data.eval_text, seed), bundle.tok)
        for t in skills.SKILLS
    }
    mm = {
        t: mm_items(
            questions.qa_samples(t, cfg.data.eval_mm, seed, "eval", cfg.data.image_size), bundle.tok
        )
        for t in questions.QA_TYPES
    }
    return text, mm


def evaluate_model(
    model: TinyModel, cfg: RunConfig, bundle: Bundle, sets: EvalSets, modality: str = "token"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Scores of ``model`` on every benchmark, and extras: the prose bits per byte and each
    benchmark's per-example outcomes (``examples``: ``"correct"`` as a 0/1 string for choice
    benchmarks, ``"bits"``/``"bytes"`` per window for prose) for bootstraps over examples."""
    model.eval()
    tok = bundle.tok
    kw: dict[str, Any] = dict(
        bos_id=tok.bos_id,
        pad_id=tok.pad_id,
        image_id=tok.image_id,
        image_tokens=cfg.model.image_tokens,
        modality=modality,
    )
    windows: list[tuple[float, int]] = []
    bpb = prose_bits_per_byte(
        model,
        tok,
        bundle.held_out,
        seq_len=cfg.model.max_seq_len,
        max_bytes=cfg.data.prose_bytes,
        windows_out=windows,
    )
    scores = {"text/prose": 1.0 / bpb}
    examples: dict[str, dict] = {
        "text/prose": {"bits": [w[0] for w in windows], "bytes": [w[1] for w in windows]}
    }
    text, mm = sets
    for prefix, group, batch in (("text", text, 256), ("mm", mm, 64)):
        for name, items in group.items():
            lp = choice_logprobs(model, items, **kw, batch_size=batch)
            right = choice_correct(lp, [it.answer for it in items])
            scores[f"{prefix}/{name}"] = sum(right) / len(right)
            examples[f"{prefix}/{name}"] = {"correct": "".join("1" if r else "0" for r in right)}
    return scores, {"prose_bpb": bpb, "examples": examples}


@torch.no_grad()
def routing_summary(model: TinyModel, cfg: RunConfig, bundle: Bundle, modality: str) -> dict:
    """Per-layer MRD and expert load on a held-out mix (half pure text), at token level."""
    if not model.cfg.moe_layers:
        return {}
    items = mixed_items(
        128,
        tok=bundle.tok,
        text=TextStream(bundle.train_ids, 99),
        seed=99,
        text_ratio=0.5,
        text_len=cfg.tune.text_len,
        image_size=cfg.data.image_size,
    )
    stats = RoutingStats()
    for i in range(0, len(items), 32):
        b = collate(
            items[i : i + 32], bundle.tok, image_tokens=cfg.model.image_tokens, modality=modality
        )
        out = model(
            b.input_ids,
            b.pixel_values,
            attention_mask=b.attention_mask,
            modality_ids=b.modality_ids,
        )
        token_ids = (
            (b.input_ids == bundle.tok.image_id).long().masked_fill(b.attention_mask == 0, -1)
        )
        stats.update(out.router_logits, token_ids, top_k=model.cfg.top_k)
    return stats.summary()


LEARNED = 0.9  # a choice benchmark counts in mean retention when the base model scores >= this


def learned_benchmarks(base: dict[str, float], threshold: float = LEARNED) -> list[str]:
    """Text benchmarks the base model has learned: prose always, choice tasks scored
    ``>= threshold`` (chance is 1/4 for the text skills). Retention on a task the base model
    never learned measures noise, not forgetting. When fewer than two qualify (a tiny
    ``--smoke`` model learns no skill), every text benchmark counts, so that mean retention
    without the outlier stays defined."""
    text = [k for k in base if k.startswith("text/")]
    learned = [k for k in text if k == "text/prose" or base[k] >= threshold]
    return learned if len(learned) >= 2 else text


def summarize(
    scores: dict[str, float], base: dict[str, float], *, include: Sequence[str] | None = None
) -> dict[str, float | str]:
    """Retention per text benchmark, mean retention (over ``include``, default every text
    benchmark), mean without the most-moved benchmark and mean multimodal accuracy, as a flat
    dict."""
    text = {k: v for k, v in scores.items() if k.startswith("text/")}
    ret = retention(text, base)
    if include is not None:
        missing = [k for k in include if k not in ret]
        if missing:
            raise UsageError(f"include names benchmarks without scores: {missing}")
    out_all = ret
    ret = ret if include is None else {k: ret[k] for k in include}
    wo, worst = mean_without_outlier(ret)
    mm = [v for k, v in scores.items() if k.startswith("mm/")]
    out: dict[str, float | str] = {f"retention/{k[5:]}": v for k, v in out_all.items()}
    out["retention/mean"] = mean_retention(ret)
    out["retention/mean_wo_outlier"] = wo
    out["retention/outlier"] = worst
    if mm:
        out["mm/mean"] = sum(mm) / len(mm)
    return out
