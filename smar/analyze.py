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

import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from smar.metrics import MODALITY_NAMES, RoutingStats
from smar.modality import modality_ids, special_token_ids

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
def read_jsonl(path: str | os.PathLike, max_samples: int | None = None) -> Iterator[dict]:
    """Samples of a JSONL file one by one; image paths are relative to the file."""
    path = Path(path)
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_samples is not None and n >= max_samples:
                return
            try:
                sample = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno} is not JSON ({e})") from None
            if not isinstance(sample, dict) or not ("conversations" in sample or "text" in sample):
                raise ValueError(
                    f"{path}:{lineno}: a sample needs 'conversations' (LLaVA format) or 'text'"
                )
            images = sample.get("image") or sample.get("images") or []
            images = [images] if isinstance(images, str) else list(images)
            sample["images"] = [str((path.parent / p).resolve()) for p in images]
            n += 1
            yield sample


def count_samples(path: str | os.PathLike, max_samples: int | None = None) -> int:  # noqa: D103
    with open(path, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    return n if max_samples is None else min(n, max_samples)


def _messages(sample: dict) -> list[dict]:
    """LLaVA conversation turns as chat messages; ``<image>`` marks become image entries."""
    if "conversations" not in sample:
        return [{"role": "user", "content": [{"type": "text", "text": sample["text"]}]}]
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for turn in sample["conversations"]:
        content = []
        for k, piece in enumerate(str(turn["value"]).split("<image>")):
            if k:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        out.append(
            {"role": roles.get(turn.get("from"), turn.get("from", "user")), "content": content}
        )
    return out


class HFEncoder:
    """Samples to model inputs with the model folder's own processor; when ``AutoProcessor``
    cannot be built (e.g. a video processor that needs torchvision), its tokenizer and image
    processor, each image's placeholder repeated as the processor would."""

    def __init__(self, model_dir: str, config, mm_token_types: bool = False):
        import transformers

        self.config, self.mm_token_types = config, mm_token_types
        self.processor = None
        try:
            proc = transformers.AutoProcessor.from_pretrained(model_dir)
            if isinstance(proc, transformers.ProcessorMixin):
                self.processor = proc
        except Exception as e:  # noqa: BLE001 (any failure: fall back to the parts)
            why = f"{type(e).__name__}: {str(e).strip()[:160]}"
            log.warning(
                "AutoProcessor(%s) failed (%s); tokenizer + image processor", model_dir, why
            )
        tok = getattr(self.processor, "tokenizer", None)
        self.tokenizer = tok or transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = getattr(self.processor, "image_processor", None)
        if self.processor is None and (Path(model_dir) / "preprocessor_config.json").exists():
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        image_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        self.image_token = getattr(self.processor, "image_token", None) or (
            self.tokenizer.convert_ids_to_tokens(image_id) if image_id is not None else None
        )
        self.template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )

    def text(self, sample: dict) -> str:
        msgs = _messages(sample)
        if self.template:
            owner = self.processor if self.processor is not None else self.tokenizer
            return owner.apply_chat_template(msgs, tokenize=False)
        parts = []
        for m in msgs:
            body = " ".join(self.image_token if c["type"] == "image" else c["text"]
                            for c in m["content"])  # fmt: skip
            parts.append(f"{m['role']}: {body}")
        return "\n".join(parts)

    def __call__(self, samples: list[dict]) -> dict:
        from PIL import Image

        texts = [self.text(s) for s in samples]
        images = [Image.open(p).convert("RGB") for s in samples for p in s["images"]]
        if images and self.image_token is None:
            raise ValueError("the model config names no image token: cannot place images")
        if self.processor is not None:
            return dict(self.processor(text=texts, images=images or None, padding=True,
                                       return_tensors="pt"))  # fmt: skip
        out = {}
        if images:
            if self.image_processor is None:
                raise ValueError("samples have images but the model folder has no image processor")
            out = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = iter(self._tokens_per_image(out, len(images)))
            texts = [self._expand(t, counts) for t in texts]
        enc = dict(self.tokenizer(texts, padding=True, return_tensors="pt"))
        if self.mm_token_types:  # what the processor would add (Qwen-VL's M-RoPE needs it)
            tokens = special_token_ids(self.config)
            enc["mm_token_type_ids"] = modality_ids(enc["input_ids"], token_ids=tokens)
        return {**enc, **out}

    def _tokens_per_image(self, out: dict, n: int) -> list[int]:
        if "image_grid_thw" in out:  # Qwen-VL style: patches merged merge_size x merge_size
            merge = getattr(self.image_processor, "merge_size", 1) ** 2
            return [int(g.prod()) // merge for g in out["image_grid_thw"]]
        seq = getattr(self.config, "image_seq_length", None)
        if seq is None:
            raise ValueError("cannot tell how many tokens an image takes: use a model folder "
                             "whose processor loads with AutoProcessor")  # fmt: skip
        return [int(seq)] * n

    def _expand(self, text: str, counts: Iterator[int]) -> str:
        pieces = text.split(self.image_token)
        return pieces[0] + "".join(self.image_token * next(counts) + p for p in pieces[1:])


def hf_source(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    name: str | None = None,
) -> Source:
    """A Hugging Face model folder (loaded by :func:`smar.hf.inspect.load_model_dir`, observed
    with :func:`smar.record`) and a JSONL file of samples, as a :class:`Source`; modality ids come
    from the inputs (placeholder tokens or ``mm_token_type_ids``), padding is ignored."""
    from smar.capture import record
    from smar.hf.inspect import load_model_dir

    model_dir = str(model_dir)
    model = load_model_dir(model_dir).eval()
    accepts = inspect.signature(model.forward).parameters
    encoder = HFEncoder(model_dir, model.config, "mm_token_type_ids" in accepts)
    rec = record(model)
    n = count_samples(data, max_samples)
    rec.detach()

    def batches() -> Iterator[Routed]:
        with record(model) as capture, torch.no_grad():
            chunk: list[dict] = []
            for sample in read_jsonl(data, max_samples):
                chunk.append(sample)
                if len(chunk) == batch_size:
                    yield _forward(model, capture, encoder(chunk))
                    chunk = []
            if chunk:
                yield _forward(model, capture, encoder(chunk))

    return Source(
        name=name or Path(model_dir).name,
        batches=batches,
        top_k=rec.top_k,
        router=rec.router,
        total=math.ceil(n / batch_size),
        layers=list(rec.layers),
        info={
            "model": f"{type(model).__name__} ({model_dir})",
            "data": f"{data} ({n} samples, batches of {batch_size})",
            "routers": f"{len(rec.sites)} ({rec.sites[0].adapter.name}), top-{rec.top_k}",
        },
    )


def _forward(model, capture, inputs: dict) -> Routed:
    model(**inputs)
    return [z.float() for z in capture.logits()], capture.modality_ids


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
    p.set_defaults(func=main)


class AnalyzeError(ValueError):
    """A bad argument of ``smar analyze``, said in one line."""


def sources_for(args, run_loader=None) -> list[Source]:
    """One :class:`Source` per folder: testbed runs through ``run_loader`` (a callable
    ``(path, batch_size=, max_samples=) -> list[Source] | None``, None when the folder is not a
    testbed run), else HF model folders with ``--data``."""
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise AnalyzeError("--batch-size and --max-samples must be >= 1")
    if args.data is not None and not os.path.isfile(args.data):
        raise AnalyzeError(f"--data {args.data}: no such file")
    out: list[Source] = []
    for d in args.dirs:
        if not os.path.isdir(d):
            raise AnalyzeError(f"{d}: no such directory")
        found = run_loader(d, batch_size=args.batch_size, max_samples=args.max_samples) if (
            run_loader) else None  # fmt: skip
        if found is not None:
            out += found
            continue
        if (Path(d) / "results.json").exists() and (Path(d) / "model.safetensors").exists():
            raise AnalyzeError(f"{d} looks like a testbed run: analyse it with the smar command")
        if not (Path(d) / "config.json").exists():
            raise AnalyzeError(f"{d} has no config.json (not a model folder nor a testbed run)")
        if args.data is None:
            raise AnalyzeError(f"{d} is a model folder: pass --data FILE.jsonl")
        out.append(hf_source(d, args.data, batch_size=args.batch_size,
                             max_samples=args.max_samples))  # fmt: skip
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
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "analysis"
    analyses = [analyze(s, progress=not args.quiet) for s in sources]
    paths = write_analysis(analyses, out)
    print(f"report: {paths['html']} (routing.json, {len(paths) - 2} plots)")
    return 0


def modality_names(stats: RoutingStats) -> list[str]:
    return [MODALITY_NAMES.get(m, f"modality{m}") for m in stats.modalities]
