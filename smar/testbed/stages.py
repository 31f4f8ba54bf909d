"""Stages 0-2 of the testbed (docs/method.md#experiment), each cached under a hash of what it
depends on (the content of the data files included): vision pretraining (stage 0), language
pretraining (stage 1), alignment (stage 2) and instruction tuning (stage 2b), each trained by
:func:`smar.testbed.loop.train`; and the one place that knows the stage cache's layout.

A stage is built under a lock (two commands on one cache build it once), checked on load (a
corrupt file is set aside and the stage built again), and never cached when its loss or weights
are not finite: :class:`~smar.errors.Diverged` names the stage, the step and the rate.
The cache key holds torch's thread count: sums reduce in another order on another count, so a
stage built with 2 threads differs from one built with 1 in the last digits, and the two are
never mixed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smar.errors import CorruptFile
from smar.losses import load_balancing_loss
from smar.testbed.config import STAGE_VERSION, RunConfig
from smar.testbed.data import images, questions
from smar.testbed.data.bundle import Bundle, data_key
from smar.testbed.data.mixing import TextStream, collate, mixed_items, qa_batch
from smar.testbed.data.tokenizer import Tokenizer
from smar.testbed.io import (
    cache_dir,
    file_lock,
    read_cached_json,
    read_json,
    set_aside,
    write_json,
)
from smar.testbed.loop import check_weights, train
from smar.testbed.model import TinyConfig, TinyModel, TinyOutput
from smar.testbed.overrides import config_hash

# a stage's model and its metrics
Built = tuple[TinyModel, dict[str, Any]]


def model_config(cfg: RunConfig, tok: Tokenizer) -> TinyConfig:
    """The stage models' config: ``cfg.model`` with the tokenizer's vocabulary and image id."""
    return dataclasses.replace(
        cfg.model,
        vocab_size=tok.vocab_size,
        image_token_id=tok.image_id,
        image_size=cfg.data.image_size,
        vision_classes=images.VISION_CLASSES,
        moe_layers=[],
    )


STAGES = ("vision", "pretrain", "align", "instruct")


def stage_dir(cfg: RunConfig, name: str) -> Path:
    """The cache folder of stage ``name``, keyed on every config the stage depends on and on
    torch's thread count (the last digits of a stage follow it)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {STAGES}")
    data = data_key(cfg.data)
    if name == "vision":  # what stage 0 does not read: evaluation sizes, stage-1 text
        for key in ("eval_text", "eval_mm", "prose_bytes", "descriptions"):
            data.pop(key)
    parts = [data, cfg.model, cfg.vision]
    if name != "vision":
        parts.append(cfg.pretrain)
        if cfg.tune.base == "native":  # a MoE LM from stage 1 on: its shape is part of the key
            t = cfg.tune
            parts.append(
                {
                    "base": "native",
                    "experts": t.num_experts,
                    "top_k": t.top_k,
                    "layers": t.layers,
                    "lb_weight": t.lb_weight,
                }
            )
    if name in ("align", "instruct"):
        parts.append(cfg.align)
    if name == "instruct":
        parts += [cfg.instruct, {"text_len": cfg.tune.text_len, "label": cfg.tune.label_prompt}]
    parts.append({"threads": torch.get_num_threads()})
    return cache_dir() / "stages" / f"{name}-{config_hash(STAGE_VERSION, *parts)}"


# The stage cache, known here alone: stage_dir() holds the stage's model (TinyModel.save),
# metrics.json (written last: the stage is complete) and, for the models the pipeline scores,
# scores.json; "<folder>.lock" beside it is held while any of them is written.
METRICS = "metrics.json"
SCORES = "scores.json"


def _lock(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


def final_stage(cfg: RunConfig) -> str:
    """The stage whose model stage 3 starts from: ``"instruct"`` when stage II runs."""
    return "instruct" if cfg.instruct.steps > 0 else "align"


def stage_names(cfg: RunConfig) -> tuple[str, ...]:
    """The stages ``cfg`` builds, in order (stage II only with ``instruct.steps``)."""
    return STAGES[: STAGES.index(final_stage(cfg)) + 1]


def stage_metrics(cfg: RunConfig, name: str) -> dict:
    """What stage ``name`` recorded when it was built (``seconds`` included); {} before."""
    return read_cached_json(stage_dir(cfg, name) / METRICS) or {}


def stage_scores(cfg: RunConfig, name: str, build: Callable[[], dict]) -> dict:
    """The scores of stage ``name``'s model, cached beside it: ``build()`` under the stage's lock
    when missing (or corrupt)."""
    folder = stage_dir(cfg, name)
    with file_lock(_lock(folder), f"the scores in {folder}"):
        scores = read_cached_json(folder / SCORES)
        if scores is None:
            scores = build()
            write_json(folder / SCORES, scores)
    return scores


def _cached(path: Path) -> TinyModel | None:
    """The stage's model when the stage is complete and its files pass their checks; a corrupt
    file is set aside (with the completion marker, so the stage is built again)."""
    if not (path / METRICS).exists():
        return None
    try:
        read_json(path / METRICS)
        return TinyModel.load(path)
    except (CorruptFile, FileNotFoundError) as e:
        set_aside(getattr(e, "path", path / "model.safetensors"), getattr(e, "why", str(e)))
        set_aside(path / METRICS, "its stage is built again")
        return None


def _stage(
    cfg: RunConfig,
    name: str,
    build: Callable[[Any, RunConfig, Bundle, bool], Built],
    bundle: Bundle,
    quiet: bool,
    after: Callable[[RunConfig, Bundle, bool], TinyModel] | None = None,
) -> TinyModel:
    """The cached model of stage ``name``, or ``build(model, cfg, bundle, quiet)`` -> (model,
    metrics) under its lock, where ``model`` is the stage ``after(cfg, bundle, quiet)`` gives (the
    earlier stage's, built first when not cached, not counted in the recorded ``seconds``; None
    for the first stage)."""
    out = stage_dir(cfg, name)
    model = _cached(out)
    if model is not None:
        return model
    with file_lock(_lock(out), f"stage {name} ({out})"):
        model = _cached(out)
        if model is None:
            start = after(cfg, bundle, quiet) if after is not None else None
            t0 = time.time()
            model, metrics = build(start, cfg, bundle, quiet)
            metrics["seconds"] = time.time() - t0
            check_weights(model, f"stage {name}", f"lower {name}.lr or raise its warmup")
            model.save(out)
            write_json(out / METRICS, metrics)  # last: the stage is complete
    return model


# ------------------------------------------------------------------------------------ stages
def stage_vision(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 0: the vision encoder learns to name digits and scene attributes (multi-label)."""
    return _stage(cfg, "vision", _vision, bundle, quiet)


def _vision(_: None, cfg: RunConfig, bundle: Bundle, quiet: bool) -> Built:
    torch.manual_seed(cfg.data.seed)
    model = TinyModel(model_config(cfg, bundle.tok))
    samples = images.vision_samples(cfg.data.vision_examples, cfg.data.seed, cfg.data.image_size)
    x = torch.stack([s.pixels for s in samples])
    y = torch.stack([s.target() for s in samples])
    model.set_trainable("vision")
    g = torch.Generator().manual_seed(cfg.data.seed)

    def forward(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (cfg.vision.batch_size,), generator=g)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            model.vision.classify(x[idx]), y[idx]
        )

    c = cfg.vision
    loss = train(model, forward, steps=c.steps, warmup=c.warmup, lr=c.lr,
                 stage="stage 0 (vision)", field="vision.lr", desc="stage 0: vision",
                 quiet=quiet)  # fmt: skip
    with torch.no_grad():
        pred = model.vision.classify(x[:500]) > 0
        acc = (pred == (y[:500] > 0.5)).all(-1).float().mean().item()
    probe = vision_probe(model, 400, cfg.data.image_size)
    return model, {"loss": loss.item(), "exact_match_train": acc, "probe_eval": probe}


@torch.no_grad()
def vision_probe(model: TinyModel, n: int, size: int) -> dict[str, float]:
    """The vision head's accuracy on the held-out images of each multimodal benchmark (its
    question's answer read off the head's block for that attribute): the ceiling of what the
    language model can learn to answer from these features."""
    out = {}
    for task in questions.QA_TYPES:
        items = questions.qa_samples(task, n, 0, "eval", size)
        logits = model.vision.classify(torch.stack([s.image.pixels for s in items]))
        pred = logits[:, images.TARGET_SLICES[task]].argmax(-1)
        out[task] = (pred == torch.tensor([s.answer for s in items])).float().mean().item()
    return out


def stage_pretrain(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 1: the LM learns prose and the skill tasks: a dense LM (``tune.base="upcycle"``,
    MoE-LLaVA), or a MoE LM with independent experts and load balancing (``"native"``)."""
    return _stage(cfg, "pretrain", _pretrain, bundle, quiet, after=stage_vision)


def _pretrain(model: TinyModel, cfg: RunConfig, bundle: Bundle, quiet: bool) -> Built:
    torch.manual_seed(cfg.data.seed + 1)
    native = cfg.tune.base == "native"
    if native:
        model.cfg.num_experts, model.cfg.top_k = cfg.tune.num_experts, cfg.tune.top_k
        gen = torch.Generator().manual_seed(cfg.data.seed + 1)
        model.make_moe_(layers=cfg.tune.layers, generator=gen)
    model.set_trainable("lm")
    c = cfg.pretrain
    stream = TextStream(bundle.train_ids, cfg.data.seed)
    S = cfg.model.max_seq_len

    def forward(step: int) -> TinyOutput:
        x, y = stream.batch(c.batch_size, S)
        return model(x, labels=y, logits="none")

    # the native MoE LM keeps its experts in use
    def balance(out: TinyOutput) -> tuple[torch.Tensor, dict]:
        lb = load_balancing_loss(out.router_logits, top_k=cfg.tune.top_k)
        return cfg.tune.lb_weight * lb, {}

    t0 = time.time()
    loss = train(model, forward, steps=c.steps, warmup=c.warmup, lr=c.lr,
                 stage="stage 1 (language)", field="pretrain.lr",
                 routing_loss=balance if native else None, clip=True,
                 desc="stage 1: language", quiet=quiet)  # fmt: skip
    secs = time.time() - t0
    tokens = c.steps * c.batch_size * S
    return model, {"loss": loss.item(), "tokens_per_s": tokens / secs}


def stage_align(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 2: only the projector trains, on captions (LLaVA stage 1)."""
    return _stage(cfg, "align", _align, bundle, quiet, after=stage_pretrain)


def _align(model: TinyModel, cfg: RunConfig, bundle: Bundle, quiet: bool) -> Built:
    torch.manual_seed(cfg.data.seed + 2)
    model.set_trainable("projector")
    c = cfg.align
    caps = images.caption_samples(c.steps * c.batch_size, cfg.data.seed, cfg.data.image_size)
    tok = bundle.tok

    def forward(step: int) -> torch.Tensor:
        chunk = caps[step * c.batch_size : (step + 1) * c.batch_size]
        b = collate(
            [([], tok.encode(cap), im) for im, cap in chunk],
            tok,
            image_tokens=cfg.model.image_tokens,
        )
        return model(
            b.input_ids, b.pixel_values, b.labels, attention_mask=b.attention_mask, logits="none"
        ).loss

    loss = train(model, forward, steps=c.steps, warmup=c.warmup, lr=c.lr,
                 stage="stage 2 (alignment)", field="align.lr", desc="stage 2: alignment",
                 quiet=quiet)  # fmt: skip
    return model, {"caption_loss": loss.item()}


def stage_instruct(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 2b (MoE-LLaVA's stage II): the whole LM and the projector learn the question/answer
    mix (``instruct.text_ratio`` pure text); the vision encoder stays frozen. Without
    ``instruct.steps`` this is the stage-2 model itself."""
    if cfg.instruct.steps <= 0:
        return stage_align(cfg, bundle, quiet)
    return _stage(cfg, "instruct", _instruct, bundle, quiet, after=stage_align)


def _instruct(model: TinyModel, cfg: RunConfig, bundle: Bundle, quiet: bool) -> Built:
    torch.manual_seed(cfg.data.seed + 3)
    model.set_trainable("all")
    for p in model.vision.parameters():
        p.requires_grad_(False)
    c = cfg.instruct
    items = mixed_items(
        c.steps * c.batch_size,
        tok=bundle.tok,
        text=TextStream(bundle.train_ids, 300 + cfg.data.seed),
        seed=300 + cfg.data.seed,  # other samples than any stage-3 seed's
        text_ratio=c.text_ratio,
        text_len=cfg.tune.text_len,
        image_size=cfg.data.image_size,
    )

    def forward(step: int) -> torch.Tensor:
        b = qa_batch(
            items[step * c.batch_size : (step + 1) * c.batch_size],
            bundle.tok,
            image_tokens=cfg.model.image_tokens,
            label_prompt=cfg.tune.label_prompt,
        )
        return model(
            b.input_ids, b.pixel_values, b.labels, attention_mask=b.attention_mask, logits="none"
        ).loss

    loss = train(model, forward, steps=c.steps, warmup=c.warmup, lr=c.lr,
                 stage="stage 2b (instruction)", field="instruct.lr", clip=True,
                 desc="stage 2b: instruction", quiet=quiet)  # fmt: skip
    return model, {"loss": loss.item()}
