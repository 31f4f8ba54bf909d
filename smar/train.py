"""The testbed pipeline (SPEC section 5): vision pretraining, language pretraining, alignment,
upcycling + visual instruction tuning per arm, evaluation, report.

Stages 0-2 are cached in ``cache_dir()/stages`` under a hash of every config they depend on, so
runs with the same early config reuse them. Stage-3 runs (one per arm, control or sweep point)
are independent processes with one thread each; each writes its resolved config, metrics and
checkpoint to ``<out>/<run>/`` and is skipped when already complete (interrupted sweeps resume).

Presets are functions: :func:`demo_config`, :func:`smoke_config`, :func:`sweep_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smar import routing_objective
from smar.arms import make_arm
from smar.config import cache_dir, config_hash, read_json, to_dict, write_json
from smar.metrics import RoutingStats
from smar.tiny import TinyConfig, TinyModel

log = logging.getLogger(__name__)

STAGE_VERSION = 1  # bump when a stage's code changes what it produces


# ------------------------------------------------------------------------------------ configs
@dataclass
class DataConfig:
    """Data options. ``text_files``: local text instead of the Shakespeare corpus."""

    text_files: list[str] = field(default_factory=list)
    vocab_size: int = 2048
    skill_examples: int = 60000
    image_size: int = 32
    eval_text: int = 1000
    eval_mm: int = 200
    prose_bytes: int = 60000
    seed: int = 0


@dataclass
class StageConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50


@dataclass
class TuneConfig:
    """Stage 3: upcycling and visual instruction tuning."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    text_ratio: float = 0.025
    text_len: int = 48
    trainable: str = "moe"
    layers: str = "all"
    num_experts: int = 4
    top_k: int = 2
    noise: float = 0.0
    label_prompt: bool = True
    smar_weight: float = 1.0
    band: tuple[float, float] = (1.5, 2.0)
    lb_weight: float = 0.01


@dataclass
class RunConfig:
    """Everything the pipeline needs; ``arms`` and ``controls`` say which stage-3 runs to make."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TinyConfig = field(
        default_factory=lambda: TinyConfig(
            dim=96,
            n_layers=4,
            n_heads=4,
            ffn_hidden=256,
            max_seq_len=128,
            image_size=32,
            patch_size=4,
            vision_dim=64,
            vision_layers=2,
            vision_heads=4,
        )
    )
    vision: StageConfig = field(default_factory=lambda: StageConfig(800, 32, 3e-3, 30))
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(1100, 16, 2e-3, 60))
    align: StageConfig = field(default_factory=lambda: StageConfig(300, 32, 3e-3, 20))
    tune: TuneConfig = field(default_factory=TuneConfig)
    arms: list[str] = field(
        default_factory=lambda: [
            "none",
            "lb",
            "bias_lb",
            "smar_lb",
            "smar",
            "hard",
            "align",
            "limoe",
            "smar_sample",
            "hard_sample",
        ]
    )
    controls: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    text_ratios: list[float] = field(default_factory=list)
    bands: list[tuple[float, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    workers: int = 2
    out: str = "runs/demo"


def demo_config() -> RunConfig:
    return RunConfig()


def smoke_config() -> RunConfig:
    """Tiny sizes: the whole pipeline in well under two minutes (used by the tests)."""
    return RunConfig(
        data=DataConfig(
            vocab_size=512,
            skill_examples=3000,
            image_size=16,
            eval_text=1000,
            eval_mm=20,
            prose_bytes=4000,
        ),
        model=TinyConfig(
            dim=32,
            n_layers=2,
            n_heads=2,
            ffn_hidden=64,
            max_seq_len=128,
            image_size=16,
            vision_dim=32,
            vision_layers=1,
            vision_heads=2,
        ),
        vision=StageConfig(20, 32, 2e-3, 2),
        pretrain=StageConfig(60, 8, 3e-3, 5),
        align=StageConfig(20, 8, 2e-3, 2),
        tune=TuneConfig(steps=15, batch_size=8, warmup=2, text_len=16),
        arms=["none", "smar", "hard_sample"],
        out="runs/smoke",
    )


def sweep_config() -> RunConfig:
    """Arms x seeds for the confidence intervals of the README (long; not in CI)."""
    cfg = RunConfig(out="runs/sweep", controls=False, seeds=[0, 1, 2])
    cfg.arms = ["none", "lb", "smar", "hard", "smar_sample", "hard_sample"]
    return cfg


# ------------------------------------------------------------------------------------ helpers
def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=kw.pop("disable", None), mininterval=1.0, **kw)


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


@dataclass
class Bundle:
    """Data shared by the stages: tokenizer, token streams, held-out prose."""

    tok: object
    train_ids: torch.Tensor
    held_out: str


def load_bundle(cfg: RunConfig) -> Bundle:
    """Corpus, skill text and tokenizer (cached by the data config)."""
    from smar import data

    key = config_hash(STAGE_VERSION, cfg.data, cfg.model.image_size)
    root = cache_dir() / "data" / key
    train_text, held_out = data.load_corpus(cfg.data.text_files or None)
    if (root / "train_ids.pt").exists() and (root / "tokenizer.json").exists():
        tok = data.Tokenizer.train([], cfg.data.vocab_size, root / "tokenizer.json")
        return Bundle(tok, torch.load(root / "train_ids.pt"), held_out)
    skills = data.skill_text(cfg.data.skill_examples, cfg.data.seed)
    rng = random.Random(0)
    captions = [data.caption(im, rng) for im in data.vision_samples(400, 0, cfg.data.image_size)]
    qa = [s.text for t in data.QA_TYPES for s in data.qa_samples(t, 100, 0, "train", 8)]
    tok = data.Tokenizer.train(
        [train_text, skills, "\n".join(captions + qa)],
        cfg.data.vocab_size,
        root / "tokenizer.json",
    )
    ids = torch.tensor(tok.encode(train_text) + tok.encode("\n" + skills), dtype=torch.long)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(ids, root / "train_ids.tmp")
    os.replace(root / "train_ids.tmp", root / "train_ids.pt")
    return Bundle(tok, ids, held_out)


def _model_config(cfg: RunConfig, tok) -> TinyConfig:
    from smar import data

    return dataclasses.replace(
        cfg.model,
        vocab_size=tok.vocab_size,
        image_token_id=tok.image_id,
        image_size=cfg.data.image_size,
        vision_classes=data.VISION_CLASSES,
        moe_layers=[],
    )


def _stage_dir(name: str, *parts) -> Path:
    return cache_dir() / "stages" / f"{name}-{config_hash(STAGE_VERSION, *parts)}"


def _cached(path: Path) -> TinyModel | None:
    if (path / "metrics.json").exists():
        return TinyModel.load(path)
    return None


# ------------------------------------------------------------------------------------ stages
def stage_vision(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 0: the vision encoder learns to name digits and scene attributes (multi-label)."""
    from smar import data

    out = _stage_dir("vision", cfg.data, cfg.model, cfg.vision)
    model = _cached(out)
    if model is not None:
        return model
    torch.manual_seed(cfg.data.seed)
    model = TinyModel(_model_config(cfg, bundle.tok))
    samples = data.vision_samples(4000, cfg.data.seed, cfg.data.image_size)
    x = torch.stack([s.pixels for s in samples])
    y = torch.stack([s.target() for s in samples])
    model.set_trainable("vision")
    opt = _optimizer(model, cfg.vision.lr)
    g = torch.Generator().manual_seed(cfg.data.seed)
    for step in _progress(range(cfg.vision.steps), desc="stage 0: vision", disable=quiet):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg.vision.steps, cfg.vision.warmup, cfg.vision.lr)
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
    """Stage 1: the dense LM learns prose and the skill tasks."""
    from smar.data import TextStream

    out = _stage_dir("pretrain", cfg.data, cfg.model, cfg.vision, cfg.pretrain)
    model = _cached(out)
    if model is not None:
        return model
    model = stage_vision(cfg, bundle, quiet)
    torch.manual_seed(cfg.data.seed + 1)
    model.set_trainable("lm")
    opt = _optimizer(model, cfg.pretrain.lr)
    stream = TextStream(bundle.train_ids, cfg.data.seed)
    S = cfg.model.max_seq_len
    t0 = time.time()
    bar = _progress(range(cfg.pretrain.steps), desc="stage 1: language", disable=quiet)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg.pretrain.steps, cfg.pretrain.warmup, cfg.pretrain.lr)
        x, y = stream.batch(cfg.pretrain.batch_size, S)
        loss = model(x, labels=y).loss
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


def _mm_batch(items, bundle, cfg: RunConfig, modality: str, label_prompt: bool):
    from smar.data import collate

    if label_prompt:  # train on the question text too, not only on the answer
        items = [([], p + t, im) for p, t, im in items]
    return collate(items, bundle.tok, image_tokens=cfg.model.image_tokens, modality=modality)


def stage_align(cfg: RunConfig, bundle: Bundle, quiet: bool = False) -> TinyModel:
    """Stage 2: only the projector trains, on captions (LLaVA stage 1)."""
    from smar import data

    out = _stage_dir("align", cfg.data, cfg.model, cfg.vision, cfg.pretrain, cfg.align)
    model = _cached(out)
    if model is not None:
        return model
    model = stage_pretrain(cfg, bundle, quiet)
    torch.manual_seed(cfg.data.seed + 2)
    model.set_trainable("projector")
    opt = _optimizer(model, cfg.align.lr)
    caps = data.caption_samples(
        cfg.align.steps * cfg.align.batch_size, cfg.data.seed, cfg.data.image_size
    )
    tok = bundle.tok
    for step in _progress(range(cfg.align.steps), desc="stage 2: alignment", disable=quiet):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg.align.steps, cfg.align.warmup, cfg.align.lr)
        chunk = caps[step * cfg.align.batch_size : (step + 1) * cfg.align.batch_size]
        b = data.collate(
            [([], tok.encode(c), im) for im, c in chunk], tok, image_tokens=cfg.model.image_tokens
        )
        loss = model(b.input_ids, b.pixel_values, b.labels, attention_mask=b.attention_mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save(out)
    write_json(out / "metrics.json", {"caption_loss": loss.item()})
    return model


# ------------------------------------------------------------------------------- evaluation
def eval_sets(cfg: RunConfig, bundle: Bundle):
    """The held-out benchmarks (deterministic): text skills and multimodal question types."""
    from smar import data
    from smar.evaluate import mm_items, text_items

    seed = 10_000 + cfg.data.seed  # disjoint from the pretraining examples' seed
    text = {
        t: text_items(data.skill_examples(t, cfg.data.eval_text, seed), bundle.tok)
        for t in data.SKILLS
    }
    mm = {
        t: mm_items(
            data.qa_samples(t, cfg.data.eval_mm, seed, "eval", cfg.data.image_size), bundle.tok
        )
        for t in data.QA_TYPES
    }
    return text, mm


def evaluate_model(model: TinyModel, cfg: RunConfig, bundle: Bundle, sets, modality="token"):
    from smar.evaluate import choice_accuracy, choice_logprobs, prose_bits_per_byte

    model.eval()
    tok = bundle.tok
    kw = dict(
        bos_id=tok.bos_id,
        pad_id=tok.pad_id,
        image_id=tok.image_id,
        image_tokens=cfg.model.image_tokens,
        modality=modality,
    )
    bpb = prose_bits_per_byte(
        model, tok, bundle.held_out, seq_len=cfg.model.max_seq_len, max_bytes=cfg.data.prose_bytes
    )
    scores = {"text/prose": 1.0 / bpb}
    text, mm = sets
    for name, items in text.items():
        scores[f"text/{name}"] = choice_accuracy(
            choice_logprobs(model, items, **kw), [it.answer for it in items]
        )
    for name, items in mm.items():
        scores[f"mm/{name}"] = choice_accuracy(
            choice_logprobs(model, items, **kw, batch_size=64), [it.answer for it in items]
        )
    return scores, {"prose_bpb": bpb}


@torch.no_grad()
def routing_summary(model: TinyModel, cfg: RunConfig, bundle: Bundle, modality: str) -> dict:
    """Per-layer MRD and expert load on a held-out mix (half pure text), at token level."""
    from smar.data import TextStream, collate, mixed_items

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


# --------------------------------------------------------------------------------- stage 3
@dataclass
class Job:
    """One stage-3 run."""

    name: str
    arm: str
    seed: int = 0
    text_ratio: float | None = None
    band: tuple[float, float] | None = None
    lr: float | None = None
    drop_images: bool = False


def tune(cfg: RunConfig, job: Job, bundle: Bundle, base: TinyModel, quiet: bool = True):
    """Stage 3 for one job: upcycle with the arm's router options, tune, return the model."""
    from smar import data

    t = cfg.tune
    ratio = t.text_ratio if job.text_ratio is None else job.text_ratio
    band = tuple(t.band if job.band is None else job.band)
    lr = t.lr if job.lr is None else job.lr
    arm = make_arm(job.arm, smar_weight=t.smar_weight, lb_weight=t.lb_weight, band=band)
    torch.manual_seed(1000 + job.seed)
    model = base
    model.cfg.num_experts, model.cfg.top_k = t.num_experts, t.top_k
    model.cfg.modality_bias, model.cfg.hard = arm.modality_bias, arm.hard_routing
    gen = torch.Generator().manual_seed(1000 + job.seed)
    model.upcycle_(layers=t.layers, noise=t.noise, generator=gen)
    model.set_trainable(t.trainable)
    model.train()
    opt = _optimizer(model, lr)
    stream = data.TextStream(bundle.train_ids, 500 + job.seed)
    items = data.mixed_items(
        t.steps * t.batch_size,
        tok=bundle.tok,
        text=stream,
        seed=job.seed,
        text_ratio=ratio,
        text_len=t.text_len,
        image_size=cfg.data.image_size,
        drop_images=job.drop_images,
    )
    history = []
    for step in range(t.steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, t.steps, t.warmup, lr)
        b = _mm_batch(
            items[step * t.batch_size : (step + 1) * t.batch_size],
            bundle,
            cfg,
            arm.modality,
            t.label_prompt,
        )
        out = model(
            b.input_ids,
            b.pixel_values,
            b.labels,
            attention_mask=b.attention_mask,
            modality_ids=b.modality_ids,
        )
        aux, terms = routing_objective(
            out.router_logits,
            out.modality_ids,
            top_k=t.top_k,
            smar_weight=arm.smar_weight,
            band=arm.band,
            lb_weight=arm.lb_weight,
            z_weight=arm.z_weight,
            limoe_weight=arm.limoe_weight,
        )
        loss = out.loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == t.steps - 1:
            mrd = terms.get("mrd")
            history.append(
                {
                    "step": step,
                    "lm": out.loss.item(),
                    "aux": float(aux.detach()),
                    "mrd": [] if mrd is None else mrd.tolist(),
                }
            )
    return model, arm, history


_NOT_IN_RUN = ("arms", "controls", "seeds", "text_ratios", "bands", "lrs", "workers", "out")


def run_job(cfg_dict: dict, job_dict: dict, base_dir: str) -> dict:
    """Worker entry point: tune one job from the cached stage-2 model, evaluate, save."""
    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    job = Job(**job_dict)
    out = Path(cfg.out) / job.name
    # what the run depends on: not which other runs share its folder, nor where it is
    run = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_RUN}
    resolved = {"run": run, "job": dataclasses.asdict(job)}
    # config.json beside model.safetensors is the model's (TinyModel.save); the run's own
    # resolved config goes to run_config.json
    if (out / "results.json").exists() and (out / "run_config.json").exists():
        if read_json(out / "run_config.json") == json_roundtrip(resolved):
            return read_json(out / "results.json")
    t0 = time.time()
    bundle = load_bundle(cfg)
    base = TinyModel.load(base_dir)
    model, arm, history = tune(cfg, job, bundle, base)
    train_s = time.time() - t0
    scores, extra = evaluate_model(model, cfg, bundle, eval_sets(cfg, bundle), arm.modality)
    routing = routing_summary(model, cfg, bundle, arm.modality)
    results = {
        "name": job.name,
        "arm": job.arm,
        "seed": job.seed,
        "scores": scores,
        **extra,
        "routing": routing,
        "history": history,
        "train_s": train_s,
        "total_s": time.time() - t0,
    }
    model.save(out)
    write_json(out / "run_config.json", resolved)
    write_json(out / "results.json", results)
    return results


def json_roundtrip(x):
    import json

    return json.loads(json.dumps(x))


def config_from_dict(d: dict) -> RunConfig:
    d = dict(d)
    cfg = RunConfig(
        data=DataConfig(**d.pop("data")),
        model=TinyConfig.from_dict(d.pop("model")),
        vision=StageConfig(**d.pop("vision")),
        pretrain=StageConfig(**d.pop("pretrain")),
        align=StageConfig(**d.pop("align")),
        tune=TuneConfig(**{**d.pop("tune")}),
    )
    cfg.tune.band = tuple(cfg.tune.band)
    d["bands"] = [tuple(b) for b in d.get("bands", [])]
    for k, v in d.items():
        setattr(cfg, k, v)
    return cfg


def jobs_for(cfg: RunConfig, sweep: bool = False) -> list[Job]:
    """The stage-3 runs: arms x seeds (x text ratios x bands x learning rates for a sweep),
    plus the calibration controls."""
    jobs = []
    ratios = cfg.text_ratios or [None]
    bands = cfg.bands or [None]
    lrs = cfg.lrs or [None]
    for arm in cfg.arms:
        make_arm(arm)  # fail early on an unknown name
        for seed in cfg.seeds:
            for r in ratios:
                for b in bands:
                    for lr in lrs:
                        parts = [arm]
                        if r is not None:
                            parts.append(f"text{r:g}")
                        if b is not None:
                            parts.append(f"band{b[0]:g}-{b[1]:g}")
                        if lr is not None:
                            parts.append(f"lr{lr:g}")
                        parts.append(f"seed{seed}")
                        jobs.append(Job("_".join(parts), arm, seed, r, b, lr))
    if cfg.controls:
        for seed in cfg.seeds:
            jobs += [
                Job(f"control_text_seed{seed}", "none", seed, text_ratio=1.0),
                Job(f"control_noimage_seed{seed}", "none", seed, drop_images=True),
                Job(f"control_none50_seed{seed}", "none", seed, text_ratio=0.5),
            ]
    return jobs


def image_text_ratio(cfg: RunConfig, bundle: Bundle, n: int = 400) -> float:
    """Image tokens per text token in the multimodal samples of stage 3 (LLaVA: about 6)."""
    from smar.data import TextStream, collate, mixed_items

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


def run_pipeline(cfg: RunConfig, *, quiet: bool = False) -> dict:
    """Runs (or reuses) every stage and every stage-3 job; writes results.json, report.md, plots.

    Returns the results dictionary that ``results.json`` holds.
    """
    from smar.evaluate import unigram_bits_per_byte
    from smar.report import write_report

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    bundle = load_bundle(cfg)
    timings = {"data_s": time.time() - t_start}
    base = stage_align(cfg, bundle, quiet)
    timings["stages_0_2_s"] = time.time() - t_start - timings["data_s"]
    base_dir = _stage_dir("align", cfg.data, cfg.model, cfg.vision, cfg.pretrain, cfg.align)
    pre_dir = _stage_dir("pretrain", cfg.data, cfg.model, cfg.vision, cfg.pretrain)
    base_scores_path = base_dir / "scores.json"
    if base_scores_path.exists():
        base_eval = read_json(base_scores_path)
        if "prose_ppl" not in base_eval:  # written by an older version
            base_eval.update(_base_extras(cfg, bundle, base_eval))
            write_json(base_scores_path, base_eval)
    else:
        scores, extra = evaluate_model(base, cfg, bundle, eval_sets(cfg, bundle))
        uni = unigram_bits_per_byte(
            bundle.tok, bundle.train_ids, bundle.held_out, max_bytes=cfg.data.prose_bytes
        )
        base_eval = {
            "scores": scores,
            **extra,
            "unigram_bpb": uni,
            "pretrain": read_json(pre_dir / "metrics.json"),
            "vision": read_json(
                _stage_dir("vision", cfg.data, cfg.model, cfg.vision) / "metrics.json"
            ),
        }
        base_eval.update(_base_extras(cfg, bundle, base_eval))
        write_json(base_scores_path, base_eval)
    timings["base_eval_s"] = time.time() - t_start - sum(timings.values())
    jobs = jobs_for(cfg)
    results = {}
    cfg_dict = to_dict(cfg)
    t3 = time.time()
    bar = _progress(total=len(jobs), desc=f"stage 3: {len(jobs)} runs", disable=quiet)
    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {
                pool.submit(run_job, cfg_dict, dataclasses.asdict(j), str(base_dir)): j
                for j in jobs
            }
            for f in as_completed(futs):
                results[futs[f].name] = f.result()
                bar.update(1)
    else:
        for j in jobs:
            results[j.name] = run_job(cfg_dict, dataclasses.asdict(j), str(base_dir))
            bar.update(1)
    bar.close()
    timings["stage3_s"] = time.time() - t3
    timings["total_s"] = time.time() - t_start
    summary = {
        "base": base_eval,
        "runs": {j.name: results[j.name] for j in jobs},
        "jobs": [dataclasses.asdict(j) for j in jobs],
        "timings": timings,
        "config": cfg_dict,
    }
    write_json(out / "results.json", summary)
    write_report(summary, out)
    return summary


def sweep_main(args) -> int:
    """``smar sweep [overrides]``; ``bands=1.5:2.0,0:0`` gives bands as ``low:high`` pairs."""
    from smar.config import apply_overrides

    overrides = []
    bands = None
    for item in list(getattr(args, "overrides", []) or []):
        if item.startswith("bands="):
            fix = f"{item!r}: write bands as low:high pairs, e.g. bands=1.5:2,0:0"
            try:
                bands = [tuple(float(x) for x in b.split(":")) for b in item[6:].split(",")]
            except ValueError as err:
                raise ValueError(fix) from err
            if any(len(b) != 2 for b in bands):
                raise ValueError(fix)
        else:
            overrides.append(item)
    cfg = apply_overrides(sweep_config(), overrides)
    if bands is not None:
        cfg.bands = bands
    run_pipeline(cfg)
    log.info("wrote %s/report.md", cfg.out)
    return 0
