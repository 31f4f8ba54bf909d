"""Testbed runs for ``smar analyze``: a run folder (``results.json``, ``run_config.json``,
``model.safetensors``) as a :class:`smar.analyze.Source` over the run's own held-out evaluation
mix (the one :func:`smar.testbed.evaluate.routing_summary` measures MRD on), with the run's
training history and band; and a pipeline output folder (``runs/demo``) as all of its runs.

The command layer passes :func:`load_runs` to :func:`smar.commands.analyze.main` (the library never
imports the testbed); :func:`write_run_html` writes the same report beside ``report.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from smar.analyze import Source, analyze, write_analysis
from smar.errors import AnalyzeError, UsageError
from smar.source import Routed
from smar.testbed.arms import make_arm
from smar.testbed.data.bundle import load_bundle
from smar.testbed.data.mixing import TextStream, collate, mixed_items
from smar.testbed.io import read_json
from smar.testbed.jobs import recorded_config
from smar.testbed.model import TinyModel

__all__ = ["is_run_dir", "run_dirs", "load_run", "load_runs", "write_run_html"]

EVAL_SAMPLES = 128  # as routing_summary


def is_run_dir(path: str | os.PathLike) -> bool:
    """A stage-3 run folder written by :func:`smar.testbed.jobs.run_job`."""
    p = Path(path)
    names = ("results.json", "run_config.json", "model.safetensors", "config.json")
    return all((p / n).is_file() for n in names)


def run_dirs(path: str | os.PathLike) -> list[Path] | None:
    """The run folders ``path`` stands for: itself, or every run of a pipeline output folder
    (``results.json`` with ``"runs"``) in its order; None when it is neither."""
    p = Path(path)
    if is_run_dir(p):
        return [p]
    if (p / "results.json").is_file():
        runs = read_json(p / "results.json").get("runs")
        if isinstance(runs, dict):
            return [p / name for name in runs if is_run_dir(p / name)]
    return None


def load_run(
    path: str | os.PathLike, *, batch_size: int = 32, max_samples: int | None = None
) -> Source:
    """One run folder as a :class:`smar.analyze.Source`.

    The data is the run's held-out mix (half pure text, seed 99), ``max_samples`` items
    (default 128); the router sees the arm's modality ids (token or sample level), the
    statistics count image tokens as image (token level), padding ignored.
    """
    p = Path(path)
    run_cfg = read_json(p / "run_config.json")
    results = read_json(p / "results.json")
    try:  # the pipeline's config (the run's own records its text files by hash only)
        cfg = recorded_config(p)
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    job = run_cfg["job"]
    band = tuple(cfg.tune.band if job.get("band") is None else job["band"])
    arm = make_arm(job["arm"], band=band)
    model = TinyModel.load(p).eval()
    n = max_samples or EVAL_SAMPLES

    def batches() -> Iterator[Routed]:
        bundle = load_bundle(cfg)
        tok = bundle.tok
        items = mixed_items(
            n,
            tok=tok,
            text=TextStream(bundle.train_ids, 99),
            seed=99,
            text_ratio=0.5,
            text_len=cfg.tune.text_len,
            image_size=cfg.data.image_size,
        )
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                b = collate(
                    items[i : i + batch_size],
                    tok,
                    image_tokens=model.cfg.image_tokens,
                    modality=arm.modality,
                )
                out = model(
                    b.input_ids,
                    b.pixel_values,
                    attention_mask=b.attention_mask,
                    modality_ids=b.modality_ids,
                )
                ids = (b.input_ids == tok.image_id).long()  # (B, S) token level
                yield out.router_logits, ids.masked_fill(b.attention_mask == 0, -1).reshape(-1)

    return Source(
        name=p.name,
        batches=batches,
        top_k=model.cfg.top_k,
        total=-(-n // batch_size),
        layers=list(model.cfg.moe_layers),
        band=band,
        history=results.get("history"),
        info={
            "run": f"arm {job['arm']}, seed {job.get('seed')} ({p})",
            "model": f"TinyModel, {model.cfg.n_layers} layers, MoE layers "
            f"{model.cfg.moe_layers}, {model.cfg.num_experts} experts top-{model.cfg.top_k}",
            "data": f"held-out mix, {n} samples (half pure text), batches of {batch_size}",
        },
    )


def load_runs(
    path: str | os.PathLike, *, batch_size: int = 32, max_samples: int | None = None
) -> list[Source] | None:
    """The sources of a run folder or a pipeline output folder; None for anything else (the
    ``run_loader`` of :func:`smar.commands.analyze.main`)."""
    dirs = run_dirs(path)
    if dirs is None:
        return None
    if not dirs:
        raise UsageError(f"{path}: its results.json names no run folder that is complete")
    return [load_run(d, batch_size=batch_size, max_samples=max_samples) for d in dirs]


def write_run_html(out_dir: str | os.PathLike, *, quiet: bool = True) -> dict[str, Path]:
    """``index.html``, ``routing.json`` and the routing plots of every run of a pipeline output
    folder, written into ``out_dir/analysis/`` (beside ``report.md``'s own plots)."""
    sources = load_runs(out_dir) or []
    analyses = [analyze(s, progress=not quiet) for s in sources]
    title = f"SMAR testbed: routing of the runs in {Path(out_dir).name}"
    return write_analysis(analyses, Path(out_dir) / "analysis", title=title)
