"""The analysis of ``smar analyze``: run a MoE model over evaluation data, stream its routing into
:class:`smar.metrics.RoutingStats`, and write ``routing.json``, the plots and ``index.html``
(the command itself, its options and checks, is :mod:`smar.commands.analyze`).

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smar.errors import UsageError
from smar.metrics import MODALITY_NAMES, RoutingStats
from smar.pairs import pair_name
from smar.source import Routed, Source

__all__ = [
    "Source",
    "Analysis",
    "stream_stats",
    "analyze",
    "hf_source",
    "write_analysis",
]

log = logging.getLogger(__name__)


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
    modalities: Sequence[int] = (0, 1),
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
        raise UsageError(f"{desc}: no batch was analysed (is the data empty?)")
    return stats


def analyze(source: Source, *, progress: bool = True) -> Analysis:
    """Runs one source through :func:`stream_stats` (the modalities it names)."""
    stats = stream_stats(
        source.batches(),
        top_k=source.top_k,
        router=source.router,
        total=source.total,
        desc=source.name,
        progress=progress,
        modalities=source.modalities,
    )
    return Analysis(source, stats)


# ------------------------------------------------------------------------------ Hugging Face
def hf_source(model_dir: str | os.PathLike, data: str | os.PathLike, **kwargs: Any) -> Source:
    """A Hugging Face model folder and a JSONL file of samples as a :class:`Source`; see
    :func:`smar.hf.source.hf_source` (imports transformers)."""
    from smar.hf.source import hf_source as source

    return source(model_dir, data, **kwargs)


# ------------------------------------------------------------------------------------ output
def _floats(x: Tensor) -> list | float | None:
    """Nested lists of floats, NaN as None (strict JSON)."""
    return [_floats(v) for v in x] if x.dim() else (None if math.isnan(float(x)) else float(x))


def exclusive_experts(stats: RoutingStats, threshold: float = 0.9) -> list[dict]:
    """Experts that one modality holds almost alone (``share >= threshold`` of their top-k
    slots), as ``{"layer", "expert", "modality", "share", "slots"}`` (layers count from 0)."""
    select_count = stats._require_data()[1]  # (L, M, E)
    slots = select_count.sum(dim=1)  # (L, E)
    top, which = (select_count / slots.clamp_min(1.0)[:, None, :]).max(dim=1)  # (L, E)
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
    _, select_count, entropy_sum, tokens = st._require_data()
    E = select_count.shape[-1]
    per_slot = select_count / select_count.sum(dim=1, keepdim=True).clamp_min(1.0)
    ent = entropy_sum / tokens[None, :] / math.log(E)  # (L, M)
    loads = select_count.sum(dim=1)  # (L, E)
    imbalance = loads.max(-1).values / loads.sum(-1).clamp_min(1.0) * E  # (L,)
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
        "tokens": {n: float(tokens[m]) for m, n in enumerate(names)},
        "mrd": _floats(st.mrd()) if {0, 1} <= set(st.modalities) else None,
        **{k: {n: _floats(x[:, m]) for m, n in enumerate(names)} for k, x in arrays.items()},
        "imbalance": _floats(imbalance),
        "exclusive_threshold": threshold,
        "exclusive": exclusive_experts(st, threshold),
        "history": src.history,
        "sums": {k: _floats(getattr(st, k)) for k in sums},
        **pair_record(st, src),
    }


def held_pairs(
    src: Source, modalities: Sequence[int]
) -> dict[tuple[int, int], tuple[float, float] | None]:
    """The pairs a source holds in a band and their bands (None: no band to draw)."""
    if src.pairs is not None:  # pairs and bands as tuples (JSON gives lists)
        return {(p[0], p[1]): (b[0], b[1]) if b is not None else None for p, b in src.pairs.items()}
    band = (src.band[0], src.band[1]) if src.band else None
    return {(0, m): band for m in modalities if m != 0} if 0 in modalities else {}


def pair_record(st: RoutingStats, src: Source) -> dict:
    """``mrd_matrix`` (per layer, M x M, None where a modality was not seen) and ``pairs``
    (each held pair's name, ids, band and MRD per layer), for more than two modalities."""
    if len(st.modalities) < 3:
        return {}
    D = st.mrd_matrix()  # (L, M, M)
    index = {m: k for k, m in enumerate(st.modalities)}
    pairs = [
        {"pair": pair_name(p), "ids": list(p), "band": list(b) if b else None,
         "mrd": _floats(D[:, index[p[0]], index[p[1]]])}
        for p, b in held_pairs(src, st.modalities).items()
        if p[0] in index and p[1] in index
    ]  # fmt: skip
    return {"modality_ids": list(st.modalities), "mrd_matrix": _floats(D), "pairs": pairs}


def write_analysis(
    analyses: list[Analysis],
    out_dir: str | os.PathLike,
    *,
    title: str | None = None,
    threshold: float = 0.9,
) -> dict[str, Path]:
    """Writes ``routing.json``, the PNGs and ``index.html`` into ``out_dir`` and returns their
    paths by name (see :func:`smar.html_report.write_report`)."""
    from smar.html_report import write_report

    records = [routing_record(a, threshold) for a in analyses]
    return write_report(analyses, records, Path(out_dir), title=title, threshold=threshold)


def modality_names(stats: RoutingStats) -> list[str]:
    return [MODALITY_NAMES.get(m, f"modality{m}") for m in stats.modalities]
