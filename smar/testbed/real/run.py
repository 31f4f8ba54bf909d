"""``smar real run``: the paper's experiment on SmolLM2-135M-Instruct, stage by stage, cached.

Stages (each cached in ``<cache>/real/stages`` under a key of everything it depends on, so a rerun
with other arms or seeds reuses them):

1. the base model's greedy answers: held-out chat instructions (scored by likelihood later), the
   training instructions (the pure-text share of stage 3), the knowledge questions (only those it
   answers right are kept);
2. stage 0 (the CLIP tower learns the images, frozen) and stage 1 (the projector aligns), one file
   of the tower's and projector's weights;
3. the stage-1 model's scores (the reference of every retention);
4. stage 3 of each ``(arm, seed)`` in ``<out>/runs/<arm>-seed<k>/``: the trained model (loadable by
   :func:`smar.hf.load_model_folder`, with its bias) and ``scores.json``; a finished run is not
   redone, an interrupted one starts again.

Then :func:`smar.testbed.real.report.write` pairs the runs by seed and writes ``results.json`` and
``report.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smar.atomic import output_problem
from smar.errors import CorruptFile, UsageError
from smar.testbed.io import (
    cache_dir,
    load_tensors,
    save_tensors,
    set_aside,
    sha256_file,
    write_json,
)
from smar.testbed.real import evaluate, outdir, texts
from smar.testbed.real.data import description_chat, qa_chat, write_analyze_data
from smar.testbed.real.model import VisionSpec, build_run_vlm
from smar.testbed.real.probes import code_closed
from smar.testbed.real.schema import BASE_ANSWERS, STAGE1_SCORES, read_checked
from smar.testbed.real.scores import (
    ANSWERS,
    CHAT_TOKENS,
    CODE_TOKENS,
    EVALUATION,
    KNOWLEDGE_TOKENS,
    first_token_reference,
    score,
)
from smar.testbed.real.train import ARMS, align, instruct
from smar.testbed.real.workers import run_parallel

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase, ProcessorMixin

    from smar.testbed.real.base import CausalLM

    Base = tuple[CausalLM, PreTrainedTokenizerBase]  # the language model and its tokenizer

__all__ = ["RealConfig", "run", "MAX_SEED", "MAX_STEPS"]

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1  # numpy's and the Trainer's seeds
# A stage-3 step takes about 15 s on 2 cores (SmolLM2, batch 8), and a run holds all its samples
# in memory (about 20 KiB each): 5000 steps are some 20 hours and 0.8 GiB of samples a run.
MAX_STEPS = 5000


@dataclass(frozen=True)
class RealConfig:
    """Sizes and settings of ``smar real run`` (the defaults are the README's run)."""

    arms: tuple[str, ...] = ("none", "smar", "stop")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 24  # stage 3 optimizer steps per run
    batch: int = 8
    lr: float = 2e-4
    # the routers' and biases' own learning rate (None: lr); at lr alone 24 steps move them too
    # little for SMAR's band to be reached (docs/real.md#results)
    router_lr: float | None = 2e-2
    text_ratio: float = 0.025  # pure-text share of stage 3 (the paper's 2.5%)
    descriptions: float = 0.25  # share of the image samples that ask for a description
    layers: str = "alternate"
    vision: VisionSpec = VisionSpec()
    vision_steps: int = 600
    align_steps: int = 40
    align_lr: float = 1e-3
    eval_chat: int = 32  # held-out instructions (base answers scored by likelihood)
    eval_code: int = 16  # HumanEval problems
    eval_prose: int = 8  # Shakespeare passages
    # questions asked, None: the whole pool (those the base answers right are scored)
    eval_knowledge: int | None = None
    eval_images: int = 16  # image questions per type
    precision: str = "fp32"
    # the scores' precision (stage 1's and every run's; the base's answers stay float32): bf16
    # autocast makes evaluation 2-3x cheaper where the CPU has bf16 matrix units
    eval_precision: str = "fp32"
    freeze_dense: bool = False  # the dense MLPs between the MoE layers frozen in stage 3

    def __post_init__(self) -> None:
        bad: list[str | int] = [a for a in self.arms if a not in ARMS]
        if bad:
            raise UsageError(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
        for name in ("precision", "eval_precision"):
            if getattr(self, name) not in ("bf16", "fp32"):
                raise UsageError(f"{name} {getattr(self, name)!r} is not bf16 or fp32",
                                 "resolve 'auto' first (smar.testbed.real.precision)")  # fmt: skip
        if not self.arms or not self.seeds or self.steps < 1 or self.batch < 1:
            raise UsageError("need at least one arm and seed, steps >= 1 and batch >= 1")
        bad = [s for s in self.seeds if not _seed(s)]
        if bad:
            raise UsageError(f"seed {bad[0]!r} is not an integer from 0 to {MAX_SEED}")
        for name, items in (("arms", self.arms), ("seeds", self.seeds)):
            twice = sorted({str(x) for x in items if items.count(x) > 1})
            if twice:
                raise UsageError(f"{name} {list(items)} name {', '.join(twice)} twice",
                                 "give each once (a run would be trained twice)")  # fmt: skip

    @classmethod
    def smoke(cls, **kw: Any) -> RealConfig:
        """A couple of minutes: every stage and arm, tiny sizes."""
        small = dict(seeds=(0, 1), steps=2, batch=2, vision_steps=20, align_steps=2,
                     eval_chat=4, eval_code=2, eval_prose=2, eval_knowledge=8, eval_images=2,
                     vision=VisionSpec(hidden_size=32, layers=1, heads=2))  # fmt: skip
        return cls(**{**small, **kw})


def _seed(s: object) -> bool:
    return isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------
# stages


def base_answers(lm: CausalLM, tok: PreTrainedTokenizerBase, cfg: RealConfig, stages: Path,
                 model_id: str) -> dict:  # fmt: skip
    """Stage 1's cached file: the base model's greedy answers."""
    chat_eval = texts.instructions("eval")[: cfg.eval_chat]
    n_text = max(1, round(cfg.steps * cfg.batch * cfg.text_ratio))
    chat_train = texts.instructions("train")[:n_text]
    questions = texts.knowledge_questions()
    random.Random("knowledge").shuffle(questions)
    questions = questions[: cfg.eval_knowledge]
    code = texts.code_instructions()
    key = _key(model_id, chat_eval, chat_train, questions, code, CHAT_TOKENS, KNOWLEDGE_TOKENS,
               CODE_TOKENS, ANSWERS)  # fmt: skip
    path = stages / f"base-answers-{key}.json"
    asked = {"chat_eval": chat_eval, "chat_train": chat_train,
             "knowledge": [q for q, _ in questions], "code": [q for q, _ in code]}  # fmt: skip
    cached = read_checked(path, BASE_ANSWERS, lambda d: next(
        (f"its {k} answer other questions" for k, qs in asked.items()
         if [r[0] for r in d[k]] != qs), None))  # fmt: skip
    if cached is not None:
        return cached
    log.info("base answers: %d instructions, %d questions", len(chat_eval) + n_text,
             len(questions))  # fmt: skip
    ask = [[{"role": "user", "content": q}] for q in [*chat_eval, *chat_train]]
    said = evaluate.generate(lm, tok, ask, max_new_tokens=CHAT_TOKENS)
    know = evaluate.generate(lm, tok, [[{"role": "user", "content": q}] for q, _ in questions],
                             max_new_tokens=KNOWLEDGE_TOKENS)  # fmt: skip
    coded = evaluate.generate(lm, tok, [[{"role": "user", "content": q}] for q, _ in code],
                              max_new_tokens=CODE_TOKENS, stop=code_closed)  # fmt: skip
    out = {
        "code": [[q, n, a] for (q, n), a in zip(code, coded, strict=True)],
        "chat_eval": [[q, a] for q, a in zip(chat_eval, said[: len(chat_eval)], strict=True)],
        "chat_train": [[q, a] for q, a in zip(chat_train, said[len(chat_eval) :], strict=True)],
        "knowledge": [[q, g, a] for (q, g), a in zip(questions, know, strict=True)],
    }
    write_json(path, out)
    return out


def _vision_parts(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()
            if k.startswith(("vision_tower.", "multi_modal_projector."))}  # fmt: skip


def see(model: LlavaForConditionalGeneration, proc: ProcessorMixin, cfg: RealConfig, stages: Path,
        model_id: str) -> dict:  # fmt: skip
    """Stages 0 and 1, cached: the tower learns the images, then the projector aligns."""
    from smar.testbed.real.vision import pretrain_tower

    names = ("vision", "vision_steps", "align_steps", "align_lr", "layers")
    keep = {name: getattr(cfg, name) for name in names}
    path = stages / f"vision-{_key(model_id, keep)}.safetensors"
    if path.exists():
        try:
            tensors, meta = load_tensors(path)
            info = json.loads(meta["info"])
            want = _vision_parts(model)
            if {k: v.shape for k, v in tensors.items()} != {k: v.shape for k, v in want.items()}:
                raise CorruptFile(path, "its tensors are not the tower's and projector's")
        except (CorruptFile, KeyError, ValueError) as e:
            set_aside(path, getattr(e, "why", str(e)))  # rebuilt below, as docs/errors.md says
        else:
            model.model.load_state_dict(tensors, strict=False)
            model.model.vision_tower.requires_grad_(False)
            return info
    log.info("stage 0: the vision tower learns the images (%d steps)", cfg.vision_steps)
    t = time.perf_counter()
    tower = pretrain_tower(model, proc, steps=cfg.vision_steps, seed=0)
    samples = description_chat(max(64, cfg.align_steps * 8), seed=1000) + qa_chat(
        max(64, cfg.align_steps * 8), seed=1000, split="train")  # fmt: skip
    log.info("stage 0 probe %s; stage 1: alignment (%d steps)", tower["probe"], cfg.align_steps)
    losses = align(model, proc, samples, steps=cfg.align_steps, lr=cfg.align_lr,
                   precision=cfg.precision)  # fmt: skip
    info = {"vision": tower, "align_loss_first": losses[0],
            "align_loss_last": sum(losses[-5:]) / len(losses[-5:]),
            "seconds": time.perf_counter() - t}  # fmt: skip
    save_tensors(path, _vision_parts(model), {"info": json.dumps(info)})
    return info


def train_samples(cfg: RealConfig, seed: int, answers: dict) -> list[dict]:
    """Stage 3's samples of one seed: image questions and descriptions, and the pure-text share
    (the base's own answers to the training instructions), shuffled."""
    total = cfg.steps * cfg.batch
    n_text = len(answers["chat_train"])
    n_desc = round((total - n_text) * cfg.descriptions)
    n_qa = total - n_text - n_desc
    text = [{"messages": [{"role": "user", "content": [{"type": "text", "text": q}]},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}],
             "images": []} for q, a in answers["chat_train"]]  # fmt: skip
    samples = qa_chat(n_qa, seed, "train") + description_chat(n_desc, seed) + text
    random.Random(seed).shuffle(samples)
    return samples


# ----------------------------------------------------------------------------------------------
# the whole run


def run(cfg: RealConfig, out: str | Path, *, base: Base | Callable[[], Base] | None = None,
        model_id: str | None = None, stages: str | Path | None = None, progress: bool = True,
        workers: int = 1, force: bool = False) -> dict:  # fmt: skip
    """Runs every stage not cached yet and writes ``<out>/results.json`` and ``report.md``.

    Args:
        base: ``(model, tokenizer)`` of the language model (default: SmolLM2-135M-Instruct,
            :func:`smar.testbed.real.base.load_base`); ``model_id`` then names it in cache keys.
            ``base`` may also be a function returning that pair: it is called once the output
            folder is known to be usable (a refused folder costs no model load).
        stages: the stage cache (default ``<smar cache>/real/stages``).
        workers: stage-3 runs side by side, each in its own process with its share of the cores
            (:mod:`smar.testbed.real.workers`). Workers are spawned: a script that calls this
            with ``workers > 1`` needs Python's ``if __name__ == "__main__":`` guard.
        force: set aside finished runs of other settings and train them again (without it they
            are refused: :mod:`smar.testbed.real.outdir`).
    """
    out = outdir.claim(out)
    with outdir.hold(out):
        return _run(cfg, out, base, model_id, stages, progress, workers, force)


def _run(cfg: RealConfig, out: Path, base: Base | Callable[[], Base] | None, model_id: str | None,
         stages: str | Path | None, progress: bool, workers: int, force: bool) -> dict:  # fmt: skip
    from smar.testbed.real import report

    t0 = time.perf_counter()
    stages = Path(stages) if stages is not None else cache_dir() / "real" / "stages"
    if output_problem(stages):
        raise UsageError(f"the stage cache {stages}: {output_problem(stages)}",
                         "set SMAR_CACHE to a folder smar can write")  # fmt: skip
    stages.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    folder_config = read_checked(out / "config.json", {})  # the runs' settings before this
    settings = outdir.run_settings(cfg)
    runs, jobs = {}, []
    for seed in cfg.seeds:  # which runs are finished (checked before any model work)
        for arm in cfg.arms:
            name = f"{arm}-seed{seed}"
            folder = out / "runs" / name
            done = outdir.reusable(folder, arm, seed, settings, force=force,
                                   folder_config=folder_config)  # fmt: skip
            if done is not None:
                runs[name] = done
            else:
                jobs.append((name, arm, seed, folder))
    outdir.record_legacy_settings(out, folder_config)  # before config.json changes
    write_json(out / "config.json", dataclasses.asdict(cfg))
    if base is None:
        from smar.testbed.real.base import MODEL_ID, load_base

        base, model_id = load_base(), MODEL_ID
    elif callable(base):
        base = base()
    lm, tok = base
    model_id = model_id or f"{type(lm).__name__}-{lm.num_parameters()}"
    timing = {}
    t = time.perf_counter()
    answers = base_answers(lm, tok, cfg, stages, model_id)
    timing["base_answers"] = time.perf_counter() - t
    model, proc = build_run_vlm(lm, tok, cfg.vision, cfg.layers)
    t = time.perf_counter()
    seen = see(model, proc, cfg, stages, model_id)
    timing["vision_align"] = time.perf_counter() - t
    images = qa_chat(cfg.eval_images * 5, 0, "eval")
    write_analyze_data(out / "analyze", images, answers)
    evals = {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("eval_")}
    key = _key(model_id, seen, evals, answers["chat_eval"], answers["knowledge"], cfg.precision,
               EVALUATION)  # fmt: skip
    log.info("scores of the stage-1 model")
    stage1 = _cached_scores(stages / f"stage1-scores-{key}.json",
                            lambda: score(model, proc, cfg, answers, images))  # fmt: skip
    first = stages / f"stage1-first-tokens-{key}.safetensors"
    reference = first_token_reference(model, proc, cfg.eval_precision, answers, first)
    for *_, folder in jobs:
        outdir.clear_unfinished(folder)  # an interrupted run starts again
    workers = max(1, min(workers, len(jobs)))
    t = time.perf_counter()
    if workers > 1:
        log.info("stage 3: %d runs, %d at a time", len(jobs), workers)
        run_parallel(model, lm.config, tok, cfg, jobs, answers, images, workers,
                     done=runs.__setitem__, progress=progress, reference=reference)  # fmt: skip
    else:
        start = copy.deepcopy(model.state_dict())
        for i, (name, arm, seed, folder) in enumerate(jobs):
            log.info("stage 3: %s (%d/%d)", name, i + 1, len(jobs))
            model.load_state_dict(start)
            runs[name] = train_and_score(model, proc, cfg, answers, images, arm, seed, folder,
                                         progress=progress, reference=reference)  # fmt: skip
    timing["stage3"] = time.perf_counter() - t
    timing["workers"] = workers
    timing["total"] = time.perf_counter() - t0
    peak = max([_peak_gib(), *(r.get("peak_memory_gib", 0.0) for r in runs.values())])
    meta = {"vision": seen, "timing": timing, "peak_memory_gib": peak, "model": model_id}
    return report.write(out, cfg, stage1, runs, meta)


def train_and_score(model: LlavaForConditionalGeneration, proc: ProcessorMixin, cfg: RealConfig,
                    answers: dict, images: list[dict], arm: str, seed: int, folder: Path,
                    progress: bool = True,
                    reference: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Stage 3 of one ``(arm, seed)`` from ``model``'s weights, then its scores; writes the model
    and ``scores.json`` (last: a folder without it is an unfinished run) into ``folder``."""
    t = time.perf_counter()
    trainer = instruct(model, proc, train_samples(cfg, seed, answers), str(folder), arm=arm,
                       steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, seed=seed,
                       precision=cfg.precision, progress=progress,
                       router_lr=cfg.router_lr, freeze_dense=cfg.freeze_dense)  # fmt: skip
    trained = time.perf_counter() - t
    res = score(model, proc, cfg, answers, images, reference)
    evaluated = time.perf_counter() - t - trained
    log.info("%s-seed%d: trained in %.0f s, evaluated in %.0f s (%.0f%% of training)", arm, seed,
             trained, evaluated, 100 * evaluated / max(trained, 1e-9))  # fmt: skip
    res.update(arm=arm, seed=seed, train_seconds=trained,
               eval_seconds=evaluated, peak_memory_gib=_peak_gib(),
               log=[r for r in trainer.state.log_history if "loss" in r])  # fmt: skip
    trainer.smar.detach()
    model_file = folder / outdir.MODEL_FILE
    res.update(settings=outdir.run_settings(cfg),
               model_sha256=sha256_file(model_file) if model_file.is_file() else None)  # fmt: skip
    write_json(folder / "scores.json", res)
    return res


def _cached_scores(path: Path, compute: Callable[[], dict]) -> dict:
    cached = read_checked(path, STAGE1_SCORES)  # a corrupt one is set aside: computed again
    if cached is None:
        cached = compute()
        write_json(path, cached)
    return cached
