"""Every check of a resolved :class:`~smar.testbed.config.RunConfig` and its input files, run
before any work (``smar demo`` and ``smar sweep``): ranges, names (with the closest known one),
duplicates, seeds that fit the random generators, an output folder and a cache that can be
written, and text files that exist and hold enough text. Each failure is one
:class:`~smar.errors.UsageError` naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smar.errors import UsageError
from smar.testbed.config import BASES, InstructConfig, RunConfig, StageConfig, TuneConfig

if TYPE_CHECKING:  # the job system (and torch) load only when the jobs are computed
    from smar.testbed.tune import Job

__all__ = ["validate_config", "check_text_files", "MIN_TEXT_CHARS"]

# the held-out 5% of local text must hold several windows of prose to score
MIN_TEXT_CHARS = 20_000
# seeds are offset (1000 + seed, ...) and passed to torch's 64-bit generators
MAX_SEED = 2**31 - 1
LAYERS = ("all", "alternate")


def _at_least(name: str, value: float, low: float, fix: str | None = None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{name}={value} must be a finite number", fix)
    if value < low:
        raise UsageError(f"{name}={value} must be at least {low}", fix)


def _seed(name: str, value: int) -> None:
    _at_least(name, value, 0)
    if value > MAX_SEED:
        raise UsageError(f"{name}={value} must be at most {MAX_SEED}", "give a smaller seed")


def _writable(cfg: RunConfig) -> None:
    """The output folder and the cache (stages, data, locks) can be written."""
    from smar.atomic import output_problem
    from smar.testbed.io import cache_dir

    if not str(cfg.out).strip():
        raise UsageError("the output folder is empty (--out '' or out=)", "pass --out DIR")
    why = output_problem(cfg.out)
    if why:
        raise UsageError(f"output folder {cfg.out} {why}", "pass another --out (or out=)")
    cache = cache_dir()
    where = f"SMAR_CACHE={cache}" if os.environ.get("SMAR_CACHE") else f"the smar cache {cache}"
    why = output_problem(cache)
    if why:
        raise UsageError(
            f"{where} {why}", "set SMAR_CACHE to a writable folder (it holds the cached stages)"
        )


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name}={value} must be a finite number above 0")


def _ratio(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise UsageError(f"{name}={value} must be between 0 and 1")


def _band(name: str, band: tuple[float, float]) -> None:
    low, high = band
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"{name}={low:g}:{high:g} must be finite")
    if low < 0:
        raise UsageError(f"{name}={low:g}:{high:g}: the band is on a divergence, low must be >= 0")
    if low > high:
        raise UsageError(f"{name}={low:g}:{high:g}: low is above high", f"write {high:g}:{low:g}")


def _unique(name: str, values: Sequence[Any], show: Callable[[Any], str] = str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            shown = ",".join(show(x) for x in values)
            raise UsageError(f"{name}={shown}: {show(v)} appears twice", "give each value once")
        seen.add(v)


def _stage(
    name: str, st: StageConfig | InstructConfig | TuneConfig, *, min_steps: int = 1
) -> None:
    _at_least(f"{name}.steps", st.steps, min_steps)
    _at_least(f"{name}.batch_size", st.batch_size, 1)
    _positive(f"{name}.lr", st.lr)
    _at_least(f"{name}.warmup", st.warmup, 0)


def _arms(cfg: RunConfig) -> list:
    from smar.testbed.arms import ARM_NAMES, make_arm

    if not cfg.arms:
        raise UsageError("arms= is empty", "name at least one arm, e.g. arms=none,smar")
    _unique("arms", cfg.arms)
    known = [*ARM_NAMES, *(f"{a}_sample" for a in ARM_NAMES)]
    arms = []
    for name in cfg.arms:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(ARM_NAMES)}"
            raise UsageError(
                f"unknown arm {name!r} in arms=", hint + " (add _sample for sample ids)"
            )
        arms.append(make_arm(name))
    return arms


def _model(cfg: RunConfig) -> None:
    from smar.testbed.data.tokenizer import SPECIALS
    from smar.testbed.model import TinyConfig

    _at_least("data.vocab_size", cfg.data.vocab_size, 256 + len(SPECIALS))
    try:
        TinyConfig(
            **{
                **dataclasses.asdict(cfg.model),
                "vocab_size": cfg.data.vocab_size,
                "image_token_id": 1,
                "image_size": cfg.data.image_size,
                "moe_layers": [],
                "num_experts": cfg.tune.num_experts,
                "top_k": cfg.tune.top_k,
            }
        )
    except ValueError as e:
        raise UsageError(
            f"model: {e} (data.image_size, model.* or tune.num_experts/top_k)"
        ) from None


def validate_config(cfg: RunConfig, *, check_files: bool = True) -> list[Job]:
    """Raises :class:`UsageError` on the first field of ``cfg`` that cannot run, before any work.
    Returns the stage-3 runs ``cfg`` asks for (:func:`smar.testbed.jobs.jobs_for`, computed here
    once the arms are known to exist; each of its own name)."""
    d = cfg.data
    for name in ("skill_examples", "descriptions"):
        _at_least(f"data.{name}", getattr(d, name), 0)
    _seed("data.seed", d.seed)
    for name in ("image_size", "eval_text", "eval_mm", "prose_bytes", "vision_examples"):
        _at_least(f"data.{name}", getattr(d, name), 1)
    for name in ("vision", "pretrain", "align"):
        _stage(name, getattr(cfg, name))
    _stage("instruct", cfg.instruct, min_steps=0)
    _ratio("instruct.text_ratio", cfg.instruct.text_ratio)
    t = cfg.tune
    _stage("tune", t)
    _ratio("tune.text_ratio", t.text_ratio)
    _at_least("tune.text_len", t.text_len, 1)
    _at_least("tune.num_experts", t.num_experts, 1)
    if not 1 <= t.top_k <= t.num_experts:
        raise UsageError(f"tune.top_k={t.top_k} must be in [1, tune.num_experts={t.num_experts}]")
    for name in ("noise", "smar_weight", "lb_weight"):
        _at_least(f"tune.{name}", getattr(t, name), 0.0)
    _band("tune.band", t.band)
    from smar.testbed.model import TRAINABLE

    for name, value, known in (
        ("tune.trainable", t.trainable, TRAINABLE),
        ("tune.layers", t.layers, LAYERS),
        ("tune.base", t.base, BASES),
    ):
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"one of {', '.join(known)}"
            raise UsageError(f"{name}={value!r} is not one of {', '.join(known)}", hint)
    _model(cfg)
    arms = _arms(cfg)
    if any(a.hard_routing for a in arms) and t.num_experts < 2:
        raise UsageError(f"hard routing needs tune.num_experts >= 2; got {t.num_experts}")
    if not cfg.seeds:
        raise UsageError("seeds= is empty", "give at least one seed, e.g. seeds=0,1,2")
    for s in cfg.seeds:
        _seed("seeds", s)
    _unique("seeds", cfg.seeds)
    _at_least("control_seeds", cfg.control_seeds, 0)
    _at_least("workers", cfg.workers, 1)
    for r in cfg.text_ratios:
        _ratio("text_ratios", r)
    _unique("text_ratios", cfg.text_ratios, lambda r: f"{r:g}")
    for b in cfg.bands:
        _band("bands", b)
    _unique("bands", [tuple(b) for b in cfg.bands], lambda b: f"{b[0]:g}:{b[1]:g}")
    for lr in cfg.lrs:
        _positive("lrs", lr)
    _unique("lrs", cfg.lrs, lambda r: f"{r:g}")
    jobs = _jobs(cfg)
    _writable(cfg)
    if check_files and d.text_files:
        check_text_files(d.text_files)
    return jobs


def _jobs(cfg: RunConfig) -> list[Job]:
    """The stage-3 runs; two of one name would write one folder: refused."""
    from smar.testbed.jobs import jobs_for

    jobs = jobs_for(cfg)
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(
            f"two runs would both write {cfg.out}/{dup[0]}", "give each value of the lists once"
        )
    return jobs


def _resolve(f: str | os.PathLike) -> Path:
    try:
        return Path(f).expanduser().resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise UsageError(
            f"data.text_files: {f} is a symlink loop", "point the link at a text file"
        ) from None


def check_text_files(files: Sequence[str | os.PathLike]) -> int:
    """Checks that each file exists, is text (UTF-8, no NUL bytes) and is not empty, and that
    together they hold :data:`MIN_TEXT_CHARS` characters. Returns that count."""
    from smar.testbed.data.corpus import clean_text

    total = 0
    resolved = [_resolve(f) for f in files]
    _unique("data.text_files", [str(p) for p in resolved])
    for f, p in zip(files, resolved, strict=True):
        where = f"data.text_files: {f}"
        if not p.exists():
            raise UsageError(f"{where} not found", "check the path (comma-separated, no spaces)")
        if not p.is_file():
            raise UsageError(f"{where} is not a file", "name text files, not folders")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise UsageError(f"{where} cannot be read ({e.strerror})") from None
        if not raw.strip():
            raise UsageError(f"{where} is empty", "name files that hold plain text")
        if b"\0" in raw[:65536]:
            raise UsageError(f"{where} is binary, not text (it holds NUL bytes)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{where} is not UTF-8 text (byte {e.start})") from None
        total += len(clean_text(text).strip())
    if total < MIN_TEXT_CHARS:
        raise UsageError(
            f"data.text_files ({', '.join(map(str, files))}) hold {total} characters of text; "
            f"the testbed needs at least "
            f"{MIN_TEXT_CHARS}",
            "add more text",
        )
    return total
