"""``smar analyze``: run a MoE model over evaluation data, stream its routing into
:class:`smar.metrics.RoutingStats`, and write ``routing.json``, the plots and ``index.html``.

A :class:`Source` is what is analysed: a name and a function that yields, batch after batch, the
raw router logits of each MoE layer and the modality ids of the batch. Only the statistics stay
in memory (``O(L * M * E)``), so the amount of data is limited by time alone. Sources:

- a Hugging Face model folder (:func:`hf_source`) with a JSONL file of samples in LLaVA's
  conversation format (``{"image": "a.png", "conversations": [{"from": "human", "value":
  "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}``, image paths relative to the
  file) or plain text (``{"text": "..."}``), read with the model's own processor;
- a testbed run folder, read by :mod:`smar.testbed.analyze_run` (the command layer passes its
  loader in: the library never imports the testbed).

Several sources given together are compared in one report.

Shapes legend: L MoE layers, T tokens, E experts, M modalities.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from smar.atomic import output_problem
from smar.metrics import MODALITY_NAMES, RoutingStats

__all__ = [
    "Source",
    "Analysis",
    "stream_stats",
    "analyze",
    "hf_source",
    "write_analysis",
    "add_parser",
    "main",
]

log = logging.getLogger(__name__)

Routed = tuple[list[Tensor], Tensor]  # L tensors (T, E) of raw logits, modality ids (T,)


@dataclass
class Source:
    """What ``smar analyze`` runs: a model and its data, as batches of routing.

    Attributes:
        name: shown in the report (unique among the sources compared).
        batches: a function returning an iterator of ``(router_logits, modality_ids)`` per batch.
        top_k: experts per token.
        router: ``"softmax"`` or ``"sigmoid"``.
        total: the number of batches, for the progress bar (None: unknown).
        layers: the decoder layer index of each MoE layer (labels only).
        band: the MRD band to shade, or None.
        history: training records ``{"step", "mrd": [per layer]}`` (testbed runs), or None.
        info: lines about the model and the data, shown in the report.
    """

    name: str
    batches: Callable[[], Iterator[Routed]]
    top_k: int
    router: str = "softmax"
    total: int | None = None
    layers: list[int] | None = None
    band: tuple[float, float] | None = (1.5, 2.0)
    history: list[dict] | None = None
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class Analysis:
    """The statistics of one source."""

    source: Source
    stats: RoutingStats


def stream_stats(
    batches: Iterable[Routed],
    *,
    top_k: int,
    router: str = "softmax",
    modalities=(0, 1),
    total: int | None = None,
    desc: str = "routing",
    progress: bool = True,
) -> RoutingStats:
    """Folds batches of routing into one :class:`RoutingStats`, one batch in memory at a time.

    Shapes:
        batches: each ``(L tensors (T, E), (T,) modality ids)``; T may differ between batches.
    """
    from tqdm.auto import tqdm

    stats = RoutingStats(modalities, router=router)
    for logits, ids in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
        stats.update(logits, ids, top_k=top_k)
    if stats.prob_sum is None:
        raise ValueError(f"{desc}: no batch was analysed (is the data empty?)")
    return stats


def analyze(source: Source, *, progress: bool = True) -> Analysis:
    """Runs one source through :func:`stream_stats` (text and image tokens)."""
    stats = stream_stats(
        source.batches(),
        top_k=source.top_k,
        router=source.router,
        total=source.total,
        desc=source.name,
        progress=progress,
    )
    return Analysis(source, stats)


# ------------------------------------------------------------------------------ Hugging Face
def hf_source(model_dir: str | os.PathLike, data: str | os.PathLike, **kwargs) -> Source:
    """A Hugging Face model folder and a JSONL file of samples as a :class:`Source`; see
    :func:`smar.hf.source.hf_source` (imports transformers)."""
    from smar.hf.source import hf_source as source

    return source(model_dir, data, **kwargs)


# ------------------------------------------------------------------------------------ output
def _floats(x: Tensor):
    """Nested lists of floats, NaN as None (strict JSON)."""
    return [_floats(v) for v in x] if x.dim() else (None if math.isnan(float(x)) else float(x))


def exclusive_experts(stats: RoutingStats, threshold: float = 0.9) -> list[dict]:
    """Experts that one modality holds almost alone (``share >= threshold`` of their top-k
    slots), as ``{"layer", "expert", "modality", "share", "slots"}`` (layers count from 0)."""
    slots = stats.select_count.sum(dim=1)  # (L, E)
    top, which = (stats.select_count / slots.clamp_min(1.0)[:, None, :]).max(dim=1)  # (L, E)
    names = modality_names(stats)
    hits = torch.nonzero((top >= threshold) & (slots > 0)).tolist()
    return [
        dict(
            layer=i,
            expert=e,
            modality=names[int(which[i, e])],
            share=float(top[i, e]),
            slots=float(slots[i, e]),
        )  # fmt: skip
        for i, e in hits
    ]


def routing_record(a: Analysis, threshold: float = 0.9) -> dict:
    """One source's entry of ``routing.json``: per-layer arrays by modality, the flagged experts,
    and the raw sums (``sums``) from which :class:`RoutingStats` can be rebuilt and merged."""
    st, src = a.stats, a.source
    names = modality_names(st)
    per_slot = st.select_count / st.select_count.sum(dim=1, keepdim=True).clamp_min(1.0)
    ent = st.entropy_sum / st.tokens[None, :] / math.log(st.num_experts)  # (L, M)
    loads = st.select_count.sum(dim=1)  # (L, E)
    imbalance = loads.max(-1).values / loads.sum(-1).clamp_min(1.0) * st.num_experts  # (L,)
    arrays = {"mass": st.distributions(), "load": st.load(), "share": per_slot, "entropy": ent}
    sums = ("prob_sum", "select_count", "entropy_sum", "tokens")
    return {
        "name": src.name,
        "info": src.info,
        "layers": src.layers,
        "num_layers": st.num_layers,
        "num_experts": st.num_experts,
        "top_k": st.top_k,
        "router": st.router,
        "modalities": names,
        "band": list(src.band) if src.band else None,
        "tokens": {n: float(st.tokens[m]) for m, n in enumerate(names)},
        "mrd": _floats(st.mrd()) if {0, 1} <= set(st.modalities) else None,
        **{k: {n: _floats(x[:, m]) for m, n in enumerate(names)} for k, x in arrays.items()},
        "imbalance": _floats(imbalance),
        "exclusive_threshold": threshold,
        "exclusive": exclusive_experts(st, threshold),
        "history": src.history,
        "sums": {k: _floats(getattr(st, k)) for k in sums},
    }


def write_analysis(analyses: list[Analysis], out_dir, *, title=None, threshold=0.9) -> dict:
    """Writes ``routing.json``, the PNGs and ``index.html`` into ``out_dir`` and returns their
    paths by name (see :func:`smar.html_report.write_report`)."""
    from smar.html_report import write_report

    records = [routing_record(a, threshold) for a in analyses]
    return write_report(analyses, records, Path(out_dir), title=title, threshold=threshold)


# ------------------------------------------------------------------------------------- command
def add_parser(subparsers) -> None:
    """Adds ``smar analyze`` to an argparse subparsers object (``func=main``)."""
    p = subparsers.add_parser(
        "analyze", help="routing statistics, plots and an HTML report for runs or HF models"
    )
    what = "testbed run folders or Hugging Face model folders (several: compared)"
    p.add_argument("dirs", nargs="+", metavar="DIR", help=what)
    p.add_argument("--data", help="JSONL samples (LLaVA conversations or text) for HF models")
    p.add_argument("--out", help="output folder (default: analysis/ in the first DIR)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward (default 8)")
    p.add_argument("--max-samples", type=int, help="analyse at most this many samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-bias", action="store_true",
                   help="HF folders: leave smar_bias.safetensors out (the model without its "
                   "trained modality bias)")  # fmt: skip
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out (and count) samples whose image is missing or unreadable "
                   "instead of stopping")  # fmt: skip
    p.set_defaults(func=main)


class AnalyzeError(ValueError):
    """A bad argument of ``smar analyze``, said in one line."""


def report_dir(args) -> Path:
    """``--out``, else ``analysis/`` in the first folder."""
    return Path(args.out) if args.out else Path(args.dirs[0]) / "analysis"


def sources_for(args, run_loader=None) -> list[Source]:
    """One :class:`Source` per folder: testbed runs through ``run_loader`` (a callable
    ``(path, batch_size=, max_samples=) -> list[Source] | None``, None when the folder is not a
    testbed run), else HF model folders with ``--data``."""
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise AnalyzeError("--batch-size and --max-samples must be >= 1")
    if args.data is not None and not os.path.isfile(args.data):
        raise AnalyzeError(f"--data {args.data}: no such file")
    if args.out is not None and not args.out.strip():
        raise AnalyzeError("--out is empty; fix: pass --out DIR")
    for d in args.dirs:
        if not os.path.isdir(d):
            raise AnalyzeError(f"{d}: no such directory")
    out_dir = report_dir(args)
    why = output_problem(out_dir)
    if why:  # checked before any model loads
        named = f"--out {out_dir}" if args.out else f"the report folder {out_dir}"
        raise AnalyzeError(f"{named} {why}; fix: pass --out DIR, a folder this user can write")
    out: list[Source] = []
    for d in args.dirs:
        found = run_loader(d, batch_size=args.batch_size, max_samples=args.max_samples) if (
            run_loader) else None  # fmt: skip
        if found is not None:
            if args.data is not None:
                raise AnalyzeError(f"{d} is a testbed run, analysed on its own held-out data: "
                                   "--data is for Hugging Face model folders; drop it")  # fmt: skip
            out += found
            continue
        if (Path(d) / "results.json").exists() and (Path(d) / "model.safetensors").exists():
            raise AnalyzeError(f"{d} looks like a testbed run: analyse it with the smar command")
        if not (Path(d) / "config.json").exists():
            raise AnalyzeError(f"{d} has no config.json (not a model folder nor a testbed run)")
        if args.data is None:
            raise AnalyzeError(f"{d} is a model folder: pass --data FILE.jsonl")
        try:
            source = hf_source(d, args.data, batch_size=args.batch_size,
                               max_samples=args.max_samples, bias=not args.no_bias,
                               skip_bad_images=args.skip_bad_images)  # fmt: skip
        except ValueError as e:  # bad samples or folder: said in one line
            raise AnalyzeError(str(e)) from None
        print(f"smar analyze: {source.info['bias']}")
        if "skipped" in source.info:
            print(f"smar analyze: skipped {source.info['skipped']}")
        out.append(source)
    names: dict[str, int] = {}
    for s in out:  # names unique in the comparison
        k = names[s.name] = names.get(s.name, 0) + 1
        if k > 1:
            s.name = f"{s.name}#{k}"
    return out


def main(args, run_loader=None) -> int:
    """``smar analyze``: analyses every folder and writes the report; 0 on success, 2 (and one
    line on stderr) for a bad argument."""
    import sys

    try:
        sources = sources_for(args, run_loader)
    except AnalyzeError as e:
        print(f"smar: error: {e}", file=sys.stderr)
        return 2
    out = report_dir(args)
    analyses = [analyze(s, progress=not args.quiet) for s in sources]
    paths = write_analysis(analyses, out)
    print(f"report: {paths['html']} (routing.json, {len(paths) - 2} plots)")
    return 0


def modality_names(stats: RoutingStats) -> list[str]:
    return [MODALITY_NAMES.get(m, f"modality{m}") for m in stats.modalities]
