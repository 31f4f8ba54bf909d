"""The ``smar real`` command: ``sanity`` (the base model loads, answers and upcycles without
changing) and ``run`` (the experiment, :func:`smar.testbed.real.run.run`)."""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from typing import TYPE_CHECKING

from smar.testbed.errors import UsageError

if TYPE_CHECKING:
    from smar.testbed.real.run import RealConfig

__all__ = ["add_parser", "main"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    real = subparsers.add_parser(
        "real", help="SMAR on a real pretrained LM (SmolLM2-135M-Instruct)"
    )
    real.add_argument("stage", choices=("sanity", "run"),
                      help="sanity: the base model's greedy answers to three prompts and the "
                      "largest logit change upcycling makes; run: the experiment (stages 0-3, "
                      "the arms over seeds, retention, report)")  # fmt: skip
    real.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="training: bf16 autocast where the CPU has bf16 matrix instructions (auto)",
    )
    real.add_argument("--eval-precision", default="auto", choices=("auto", "bf16", "fp32"),
                      help="run: the scores' precision (stage 1's and every run's; auto: bf16 "
                      "autocast where the CPU has bf16 matrix instructions)")  # fmt: skip
    real.add_argument("--cache", help="folder of the model file (default <smar cache>/real)")
    real.add_argument("--out", default="smar-real", help="run: output folder (smar-real)")
    real.add_argument("--smoke", action="store_true",
                      help="run: tiny sizes, every stage and arm, a few minutes")  # fmt: skip
    real.add_argument("--arms", help="run: comma-separated, of none,smar,hard,stop,noimage,"
                      "stop_sample,smar_sample,hard_sample (default none,smar,stop)")  # fmt: skip
    real.add_argument("--freeze-dense", action="store_true", help="run: the dense MLPs between "
                      "the MoE layers frozen in stage 3 (any arm)")  # fmt: skip
    real.add_argument("--seeds", help="run: comma-separated seeds (default 0,1,2)")
    real.add_argument("--steps", type=int, help="run: stage-3 optimizer steps per run")
    real.add_argument("--lr", type=float, help="run: stage-3 learning rate")
    real.add_argument("--router-lr", type=float, help="run: the routers' and modality "
                      "biases' own stage-3 learning rate (default 2e-2; give --lr's value "
                      "for one rate)")  # fmt: skip
    real.add_argument("--align-steps", type=int, help="run: stage-1 (projector alignment) "
                      "optimizer steps (cached per value)")  # fmt: skip
    real.add_argument("--align-lr", type=float, help="run: stage-1 learning rate")
    real.add_argument("--workers", type=int, default=1, help="run: stage-3 runs side by side, "
                      "each in its own process with a share of the cores (default 1)")  # fmt: skip
    real.add_argument("--quiet", action="store_true", help="run: no progress bars")
    real.add_argument("--force", action="store_true", help="run: set aside finished runs in "
                      "--out trained with other settings and train them again")  # fmt: skip
    return real


def _items(text: str, flag: str, example: str) -> list[str]:
    """A comma-separated list: not empty, no item twice."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"{flag} {text!r} is empty", f"e.g. {flag} {example}")
    twice = sorted({s for s in items if items.count(s) > 1})
    if twice:
        raise UsageError(f"{flag} {text!r} names {', '.join(twice)} twice",
                         "give each once (a run would be trained twice)")  # fmt: skip
    return items


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from smar.testbed.real.run import MAX_SEED

    items = _items(text, flag, "0,1,2")
    try:
        values = tuple(int(s) for s in items)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of integers",
                         f"e.g. {flag} 0,1,2") from None  # fmt: skip
    bad = [v for v in values if not 0 <= v <= MAX_SEED]
    if bad:
        raise UsageError(f"{flag} {bad[0]} is out of range", f"seeds are 0 to {MAX_SEED}")
    twice = sorted({v for v in values if values.count(v) > 1})  # 1,01 and 1,+1 are one seed
    if twice:
        raise UsageError(f"{flag} {text!r} names seed {twice[0]} twice",
                         "give each once (a run would be trained twice)")  # fmt: skip
    return values


def _config(args: argparse.Namespace, precision: str, eval_precision: str = "fp32") -> RealConfig:
    from smar.testbed.real.run import MAX_STEPS, RealConfig
    from smar.testbed.real.train import ARMS

    kw: dict = {"precision": precision, "eval_precision": eval_precision,
                "freeze_dense": args.freeze_dense}  # fmt: skip
    if args.arms is not None:
        kw["arms"] = tuple(_items(args.arms, "--arms", "none,smar,stop"))
        bad = [a for a in kw["arms"] if a not in ARMS]
        if bad:
            raise UsageError(f"--arms {args.arms!r}: unknown arm(s) {bad}",
                             f"choose among {','.join(ARMS)}")  # fmt: skip
    if args.seeds is not None:
        kw["seeds"] = _ints(args.seeds, "--seeds")
    for name in ("steps", "lr", "router_lr", "align_steps", "align_lr"):
        value = getattr(args, name)
        if value is not None:
            flag = f"--{name.replace('_', '-')}"
            if not value > 0 or not math.isfinite(value):
                raise UsageError(f"{flag} must be positive; got {value}")
            if name.endswith("steps") and value > MAX_STEPS:
                raise UsageError(
                    f"{flag} {value} is more than {MAX_STEPS} (a step takes about 15 s on 2 "
                    f"cores and its 8 samples stay in memory, some 20 KiB each: "
                    f"{value * 15 / 3600:.0f} hours and {value * 8 * 20 / 2**20:.1f} GiB of "
                    "samples a run)",
                    f"{flag} {MAX_STEPS} or fewer",
                )
            kw[name] = value
    if not 1 <= args.workers <= (os.cpu_count() or 1):
        raise UsageError(f"--workers must be 1 to {os.cpu_count() or 1} (the cores here); got "
                         f"{args.workers}")  # fmt: skip
    return RealConfig.smoke(**kw) if args.smoke else RealConfig(**kw)


def main(args: argparse.Namespace) -> int:
    from smar.testbed.real.precision import resolve_precision

    precision, why = resolve_precision(args.precision)
    print(f"precision: {precision} ({why})")
    if args.stage == "run":
        return _run(args, precision)
    return _sanity(args)


def _run(args: argparse.Namespace, precision: str) -> int:
    from smar.testbed.real import outdir
    from smar.testbed.real.base import MODEL_ID, check_cache, load_base
    from smar.testbed.real.precision import resolve_precision
    from smar.testbed.real.run import run

    evaluation, why = resolve_precision(args.eval_precision)
    print(f"evaluation precision: {evaluation} ({why})")
    cfg = _config(args, precision, evaluation)
    check_cache(args.cache)
    out = outdir.claim(args.out)  # before the model loads: a folder it may not write is refused
    # the model loads once the folder is held and its finished runs judged (other settings
    # without --force, or another run on the folder, are refused first)
    res = run(cfg, out, base=lambda: load_base(args.cache), model_id=MODEL_ID,
              progress=not args.quiet, workers=args.workers, force=args.force)  # fmt: skip
    print(open(f"{args.out}/report.md", encoding="utf-8").read())
    print(f"results: {args.out}/results.json; runs (smar analyze reads them): {args.out}/runs/; "
          f"peak memory {res['peak_memory_gib']:.1f} GiB a process")  # fmt: skip
    return 0


def _sanity(args: argparse.Namespace) -> int:
    from smar.testbed.real.base import SANITY_PROMPTS, greedy, load_base
    from smar.testbed.real.model import CHAT_TEMPLATE, build_vlm, text_gap

    t = time.perf_counter()
    model, tok = load_base(args.cache)
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {type(model).__name__}, {n / 1e6:.1f}M parameters, loaded in "
          f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    for prompt, answer in zip(SANITY_PROMPTS, greedy(model, tok), strict=True):
        print(f"  {prompt!r} -> {answer!r}")
    vlm, _, _ = build_vlm(model, tok, chat_template=CHAT_TEMPLATE)
    n = sum(p.numel() for p in vlm.parameters())
    print(f"LLaVA around it (CLIP tower, MLPs of alternate layers upcycled to 4 experts, top-2): "
          f"{n / 1e6:.1f}M parameters; on text, max |logit difference| to the base "
          f"{text_gap(model, vlm):.2e}")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak memory: {peak:.2f} GiB")
    return 0
