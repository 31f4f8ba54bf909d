"""Stages 0-2 of the testbed (SPEC section 5), each cached under a hash of what it depends on:
vision pretraining (stage 0), language pretraining (stage 1), alignment (stage 2); and the
training-loop helpers the stages share with stage 3 (learning-rate schedule, optimizer, progress).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from smar.losses import load_balancing_loss
from smar.testbed.config import STAGE_VERSION, RunConfig
from smar.testbed.data import images
from smar.testbed.data.bundle import Bundle
from smar.testbed.data.mixing import TextStream, collate, mixed_items, qa_batch
from smar.testbed.io import cache_dir, write_json
from smar.testbed.model import TinyConfig, TinyModel
from smar.testbed.overrides import config_hash, to_dict


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=kw.pop("disable", None), mininterval=1.0, **kw)


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def _model_config(cfg: RunConfig, tok) -> TinyConfig:
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
    """The cache folder of stage ``name``, keyed on every config the stage depends on."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {STAGES}")
    data = to_dict(cfg.data)
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
    return cache_dir() / "stages" / f"{name}-{config_hash(STAGE_VERSION, *parts)}"


def _cached(path: Path) -> TinyModel | None:
    if (path / "metrics.json").exists():
        return TinyModel.load(path)
    return None


# ------------------------------------------------------------------------------------ stages
def stage_vision(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 0: the vision encoder learns to name digits and scene attributes (multi-label)."""
    out = stage_dir(cfg, "vision")
    model = _cached(out)
    if model is not None:
        return model
    torch.manual_seed(cfg.data.seed)
    model = TinyModel(_model_config(cfg, bundle.tok))
    samples = images.vision_samples(4000, cfg.data.seed, cfg.data.image_size)
    x = torch.stack([s.pixels for s in samples])
    y = torch.stack([s.target() for s in samples])
    model.set_trainable("vision")
    opt = make_optimizer(model, cfg.vision.lr)
    g = torch.Generator().manual_seed(cfg.data.seed)
    for step in progress(range(cfg.vision.steps), desc="stage 0: vision", disable=quiet):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg.vision.steps, cfg.vision.warmup, cfg.vision.lr)
        idx = torch.randint(0, len(x), (cfg.vision.batch_size,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model.vision.classify(x[idx]), y[idx]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model.vision.classify(x[:500]) > 0
        acc = (pred == (y[:500] > 0.5)).all(-1).float().mean().item()
    model.save(out)
    write_json(out / "metrics.json", {"loss": loss.item(), "exact_match_train": acc})
    return model


def stage_pretrain(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 1: the LM learns prose and the skill tasks: a dense LM (``tune.base="upcycle"``,
    MoE-LLaVA), or a MoE LM with independent experts and load balancing (``"native"``)."""
    out = stage_dir(cfg, "pretrain")
    model = _cached(out)
    if model is not None:
        return model
    model = stage_vision(cfg, bundle, quiet)
    torch.manual_seed(cfg.data.seed + 1)
    native = cfg.tune.base == "native"
    if native:
        model.cfg.num_experts, model.cfg.top_k = cfg.tune.num_experts, cfg.tune.top_k
        gen = torch.Generator().manual_seed(cfg.data.seed + 1)
        model.make_moe_(layers=cfg.tune.layers, generator=gen)
    model.set_trainable("lm")
    opt = make_optimizer(model, cfg.pretrain.lr)
    stream = TextStream(bundle.train_ids, cfg.data.seed)
    S = cfg.model.max_seq_len
    t0 = time.time()
    bar = progress(range(cfg.pretrain.steps), desc="stage 1: language", disable=quiet)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg.pretrain.steps, cfg.pretrain.warmup, cfg.pretrain.lr)
        x, y = stream.batch(cfg.pretrain.batch_size, S)
        out_ = model(x, labels=y)
        loss = out_.loss
        if native:
            lb = load_balancing_loss(out_.router_logits, top_k=cfg.tune.top_k)
            loss = loss + cfg.tune.lb_weight * lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    secs = time.time() - t0
    model.save(out)
    tokens = cfg.pretrain.steps * cfg.pretrain.batch_size * S
    write_json(out / "metrics.json", {"loss": loss.item(), "tokens_per_s": tokens / secs})
    return model


def stage_align(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 2: only the projector trains, on captions (LLaVA stage 1)."""
    out = stage_dir(cfg, "align")
    model = _cached(out)
    if model is not None:
        return model
    model = stage_pretrain(cfg, bundle, quiet)
    torch.manual_seed(cfg.data.seed + 2)
    model.set_trainable("projector")
    opt = make_optimizer(model, cfg.align.lr)
    caps = images.caption_samples(
        cfg.align.steps * cfg.align.batch_size, cfg.data.seed, cfg.data.image_size
    )
    tok = bundle.tok
    for step in progress(range(cfg.align.steps), desc="stage 2: alignment", disable=quiet):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg.align.steps, cfg.align.warmup, cfg.align.lr)
        chunk = caps[step * cfg.align.batch_size : (step + 1) * cfg.align.batch_size]
        b = collate(
            [([], tok.encode(c), im) for im, c in chunk], tok, image_tokens=cfg.model.image_tokens
        )
        loss = model(b.input_ids, b.pixel_values, b.labels, attention_mask=b.attention_mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save(out)
    write_json(out / "metrics.json", {"caption_loss": loss.item()})
    return model


def final_stage(cfg: RunConfig) -> str:
    """The stage whose model stage 3 starts from: ``"instruct"`` when stage II runs."""
    return "instruct" if cfg.instruct.steps > 0 else "align"


def stage_instruct(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 2b (MoE-LLaVA's stage II): the whole LM and the projector learn the question/answer
    mix (``instruct.text_ratio`` pure text); the vision encoder stays frozen. Without
    ``instruct.steps`` this is the stage-2 model itself."""
    if cfg.instruct.steps <= 0:
        return stage_align(cfg, bundle, quiet)
    out = stage_dir(cfg, "instruct")
    model = _cached(out)
    if model is not None:
        return model
    model = stage_align(cfg, bundle, quiet)
    torch.manual_seed(cfg.data.seed + 3)
    model.set_trainable("all")
    for p in model.vision.parameters():
        p.requires_grad_(False)
    c = cfg.instruct
    opt = make_optimizer(model, c.lr)
    items = mixed_items(
        c.steps * c.batch_size,
        tok=bundle.tok,
        text=TextStream(bundle.train_ids, 300 + cfg.data.seed),
        seed=300 + cfg.data.seed,  # other samples than any stage-3 seed's
        text_ratio=c.text_ratio,
        text_len=cfg.tune.text_len,
        image_size=cfg.data.image_size,
    )
    for step in progress(range(c.steps), desc="stage 2b: instruction", disable=quiet):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, c.steps, c.warmup, c.lr)
        b = qa_batch(
            items[step * c.batch_size : (step + 1) * c.batch_size],
            bundle.tok,
            image_tokens=cfg.model.image_tokens,
            label_prompt=cfg.tune.label_prompt,
        )
        loss = model(b.input_ids, b.pixel_values, b.labels, attention_mask=b.attention_mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.save(out)
    write_json(out / "metrics.json", {"loss": loss.item()})
    return model
