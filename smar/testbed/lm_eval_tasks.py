"""The testbed's text benchmarks as lm-evaluation-harness tasks, and the testbed model served to
lm-eval: :func:`export_tasks` writes one YAML + local JSONL per benchmark (no downloads) and
:class:`TestbedLM` is a small ``lm_eval.api.model.LM`` over a :class:`TinyModel`.

The export and the model together reproduce :func:`smar.testbed.evaluate.evaluate_model`'s text
scores: choice requests are scored by the testbed's own :func:`choice_logprobs` (one document's
continuations as one item, in document order, batches of 256: the same computation), ties count
wrong (the tasks' ``process_results``, lm-eval's argmax would pick the first), and the prose
document is the held-out text cut to the whole windows that :func:`prose_bits_per_byte` scores,
read in the same non-overlapping windows (lm-eval's rolling windows with one token of context).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only while none is registered)
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from smar.errors import CorruptFile, UsageError
from smar.testbed.config import RunConfig
from smar.testbed.data import skills
from smar.testbed.data.bundle import Bundle, load_bundle
from smar.testbed.data.tokenizer import Tokenizer
from smar.testbed.jobs import recorded_config  # noqa: F401  (part of this module's interface)
from smar.testbed.model import TinyModel, TinyOutput
from smar.testbed.scoring import ChoiceItem, choice_logprobs

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from typing_extensions import Self

__all__ = [
    "TASKS",
    "GROUP",
    "export_tasks",
    "TestbedLM",
    "load_model",
    "recorded_config",
    "open_pair",
    "text_scores",
]

GROUP = "testbed_text"
TASKS = {f"testbed_{t}": f"text/{t}" for t in ("prose", *skills.SKILLS)}  # lm-eval -> testbed

_UTILS = '''"""Written by smar.testbed.lm_eval_tasks: accuracy with ties counted wrong."""


def process_results(doc, results):
    lls = [r[0] for r in results]
    gold = lls[doc["answer"]]
    return {"acc": float(max(lls) == gold and lls.count(gold) == 1)}
'''

_CHOICE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_PROSE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def export_tasks(cfg: RunConfig, out_dir: str | Path, bundle: Bundle | None = None) -> Path:
    """Writes the testbed's text benchmarks of ``cfg`` as lm-eval tasks into ``out_dir`` (pass
    it as ``TaskManager(include_path=...)``): ``testbed_prose`` (bits per byte of the held-out
    prose) and ``testbed_<skill>`` (accuracy among four choices), grouped as ``testbed_text``.

    The documents are those of :func:`smar.testbed.evaluate.eval_sets` (same seed, same count)
    and the prose is cut to the whole ``max_seq_len`` windows the testbed scores.
    """
    bundle = bundle or load_bundle(cfg)
    tok, out = bundle.tok, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(_UTILS)
    seed = 10_000 + cfg.data.seed  # as eval_sets: disjoint from the pretraining examples' seed
    for task in skills.SKILLS:
        rows = [
            {"prompt": e.prompt, "choices": list(e.choices), "answer": e.answer}
            for e in skills.skill_examples(task, cfg.data.eval_text, seed)
        ]
        _write(out, f"testbed_{task}", rows, _CHOICE_YAML)
    # the testbed scores [bos] + encode(text) in whole windows of max_seq_len and drops the rest
    seq_len = cfg.model.max_seq_len
    ids = tok.encode(bundle.held_out[: cfg.data.prose_bytes])
    kept = ids[: len(ids) // seq_len * seq_len]
    if not kept:
        raise UsageError(f"held-out prose too short for one window of {seq_len} tokens")
    text = tok.decode(kept)
    if tok.encode(text) != kept:  # the cut re-encodes differently: the scores would not match
        raise UsageError(
            "the held-out prose cut at a window boundary does not re-encode to the same tokens; "
            "fix: change data.prose_bytes slightly"
        )
    _write(out, "testbed_prose", [{"text": text}], _PROSE_YAML)
    (out / f"{GROUP}.yaml").write_text(
        f"group: {GROUP}\ntask:\n" + "".join(f"  - {t}\n" for t in TASKS)
    )
    return out


def _write(out: Path, name: str, rows: list[dict], template: str) -> None:
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{name}.yaml").write_text(template.format(name=name, data=json.dumps(str(data))))


class _Recorder:
    """Calls the model and keeps its greedy token after every context it saw, keyed by that
    context (for ``is_greedy``: one forward pass gives both the log-likelihoods and the argmax).
    A packed row's position sees the tokens its attention mask allows: the prefix and its own
    continuation."""

    def __init__(self, model: TinyModel):
        self.model = model
        self.greedy: dict[tuple[int, ...], int] = {}  # context -> greedy next token

    def __call__(
        self,
        ids: torch.Tensor,
        pixels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor,
        modality_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        **kw: Any,
    ) -> TinyOutput:
        kw["logits"] = "all"  # the argmax of every position, not only those scored
        out = self.model(
            ids, pixels, attention_mask=attention_mask, modality_ids=modality_ids,
            attn_mask=attn_mask, **kw,
        )  # fmt: skip
        top = out.logits.argmax(-1).tolist()  # (B, S)
        for r, n in enumerate(attention_mask.sum(1).tolist()):
            row = ids[r]
            for t in range(n):
                seen = row[: t + 1] if attn_mask is None else row[attn_mask[r, t]]
                self.greedy[tuple(seen.tolist())] = top[r][t]
        return out


@register_model("smar-testbed")
class TestbedLM(LM):
    """A testbed :class:`TinyModel` and its tokenizer as an lm-eval model (text only).

    ``loglikelihood`` scores each document's continuations with :func:`choice_logprobs` after
    ``[bos] + context`` (context and continuation encoded separately, as the testbed does);
    ``loglikelihood_rolling`` reads ``[bos] + text`` in non-overlapping windows of
    ``max_seq_len``; ``generate_until`` is not supported. Contexts longer than the model's
    window lose their first tokens.
    """

    def __init__(self, model: TinyModel, tok: Tokenizer, *, batch_size: int = 256):
        super().__init__()
        if model.cfg.vocab_size != tok.vocab_size:
            raise UsageError(
                f"the model has {model.cfg.vocab_size} token ids but the tokenizer "
                f"{tok.vocab_size}: pass the tokenizer of the model's data config"
            )
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, config: RunConfig | None = None, **kw: Any
    ) -> Self:
        """The model in a testbed run or stage folder, with the tokenizer of ``config`` (by
        default the config recorded with the run: :func:`recorded_config`)."""
        model = load_model(folder)
        cfg = config or recorded_config(folder)
        return cls(model, load_bundle(cfg).tok, **kw)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> Self:
        """``pretrained=DIR[,batch_size=N]``, as lm-eval's ``--model_args``."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        if "pretrained" not in args:
            raise UsageError("smar-testbed needs model_args pretrained=<run or stage folder>")
        bs = int(args.get("batch_size") or (additional_config or {}).get("batch_size") or 256)
        return cls.from_folder(args["pretrained"], batch_size=bs)

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        # one item per (task, document, context): its continuations are its choices, so that a
        # testbed task is scored item for item as evaluate_model scores it
        groups: dict[tuple, list[int]] = {}
        order = sorted(
            range(len(requests)),
            key=lambda k: (str(requests[k].task_name), requests[k].doc_id or 0, requests[k].idx),
        )
        for k in order:
            r = requests[k]
            groups.setdefault((r.task_name, r.doc_id, r.args[0]), []).append(k)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # empty continuations
        by_task: dict[str, list[tuple[ChoiceItem, list[int]]]] = {}
        limit = self.model.cfg.max_seq_len
        for (task, _, context), ks in groups.items():
            conts = [self.tok.encode(requests[k].args[1]) for k in ks]
            kept = [(k, c) for k, c in zip(ks, conts, strict=True) if c]
            if not kept:
                continue
            longest = max(len(c) for _, c in kept)
            if longest > limit - 1:
                raise UsageError(
                    f"a continuation of {longest} tokens does not fit the model's {limit}"
                )
            prompt = self.tok.encode(context)[-(limit - longest) :] if limit > longest else []
            item = ChoiceItem(prompt, [c for _, c in kept], 0)
            by_task.setdefault(task, []).append((item, [k for k, _ in kept]))
        for pairs in by_task.values():
            rec = _Recorder(self.model)
            items = [p[0] for p in pairs]
            lps = choice_logprobs(
                rec,
                items,
                bos_id=self.tok.bos_id,
                pad_id=self.tok.pad_id,
                image_id=self.tok.image_id,
                image_tokens=self.model.cfg.image_tokens,
                batch_size=self.batch_size,
            )
            for (item, ks), lp in zip(pairs, lps, strict=True):
                for j, k in enumerate(ks):
                    out[k] = (lp[j], _is_greedy(rec.greedy, item, j, self.tok.bos_id))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        S = self.model.cfg.max_seq_len
        out = []
        for r in requests:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok.encode(r.args[0]),
                    prefix_token=self.tok.bos_id,
                    max_seq_len=S,
                    context_len=1,
                )
            ]  # (context, predicted): one token of context after the first window, as the testbed
            total = 0.0
            for b in range(0, len(windows), 16):
                chunk = windows[b : b + 16]
                rows = [c + p for c, p in chunk]
                width = max(len(x) for x in rows) - 1
                ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for i, x in enumerate(rows):
                    ids[i, : len(x) - 1] = torch.tensor(x[:-1])
                    mask[i, : len(x) - 1] = 1
                logp = F.log_softmax(self.model(ids, attention_mask=mask).logits.float(), -1)
                for i, (c, p) in enumerate(chunk):  # position s predicts token s + 1
                    pos = torch.arange(len(c) - 1, len(c) - 1 + len(p))
                    total += float(logp[i, pos, torch.tensor(p)].sum())
            out.append(total)
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the testbed model scores by log-likelihood only; generate_until tasks (GSM8K, "
            "MBPP, ...) need a generating model: use multiple_choice, loglikelihood or "
            "loglikelihood_rolling tasks with it"
        )


def _is_greedy(
    greedy: dict[tuple[int, ...], int], item: ChoiceItem, j: int, bos_id: int
) -> bool:
    """Whether choice ``j`` is the model's greedy continuation: after the prompt and each of
    the choice's first tokens, the model's argmax is the choice's next token."""
    c = item.choices[j]
    prefix = [bos_id] + item.prompt
    return all(greedy.get(tuple(prefix + c[:k])) == t for k, t in enumerate(c))


def load_model(folder: str | Path) -> TinyModel:
    """The :class:`TinyModel` in a testbed run or stage folder; a clear ``ValueError`` when the
    folder is missing or holds no valid testbed model."""
    d = Path(folder)
    if not d.is_dir():
        raise UsageError(f"model folder {d} does not exist; fix: pass a run or stage folder")
    try:
        return TinyModel.load(d)
    except FileNotFoundError as e:
        raise UsageError(
            f"{d} holds no testbed model (config.json + model.safetensors); fix: pass a run "
            "folder (runs/<name>/<run>) or a stage folder of the cache"
        ) from e
    except CorruptFile as e:
        raise UsageError(f"{e}; fix: make the model again (smar demo reruns it)") from e


def _is_testbed_folder(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "n_layers" in d and "model_type" not in d


def open_pair(
    base: str, tuned: str, workdir: str | Path, *, batch_size: int = 256
) -> tuple[TestbedLM, TestbedLM, Path] | None:
    """For ``smar retention``: when both folders are testbed models, both as :class:`TestbedLM`
    and the testbed's tasks exported into ``workdir`` (returned as the include path); None when
    neither is (Hugging Face folders: smar's own loader serves them); a ``ValueError`` for one
    of each (their tokenizers differ: retention compares one model before and after tuning).
    """
    kinds = [_is_testbed_folder(base), _is_testbed_folder(tuned)]
    if not any(kinds):
        return None
    if not all(kinds):
        tb, other = (base, tuned) if kinds[0] else (tuned, base)
        raise UsageError(
            f"{tb} is a testbed model but {other} is not (a Hugging Face model folder?); fix: "
            "compare two testbed folders (run or stage) or two Hugging Face model folders"
        )
    models = [load_model(f) for f in (base, tuned)]
    cfg = recorded_config(tuned, base)
    bundle = load_bundle(cfg)
    lms = [TestbedLM(m, bundle.tok, batch_size=batch_size) for m in models]
    return lms[0], lms[1], export_tasks(cfg, workdir, bundle)


def text_scores(scores: dict[str, dict]) -> dict[str, float]:
    """Scores of the testbed's tasks from :func:`smar.retention.evaluate_tasks` under the
    testbed's names (``text/*``; prose as ``1 / bits per byte``, as evaluate_model scores it)."""
    return {TASKS[k]: v["score"] for k, v in scores.items() if k in TASKS}
