"""Language retention measured with lm-evaluation-harness: both models on the same tasks, a
score per task, retention per task (tuned / base, on a higher-is-better score), the mean and the
mean without the task that moved most, as JSON.

A model is an ``lm_eval.api.model.LM`` object or a local Hugging Face model folder (served by
lm-eval's own ``"hf"`` model). Tasks are lm-eval task, group or tag names: the installed
harness's (MMLU, GSM8K, ... wherever their data can be reached) and local ones from
``include_path`` (YAML + local JSONL). lm-eval is imported only here, inside the functions.

For a lower-is-better metric (bits per byte, perplexity) the score is its inverse, so that
retention is always ``score_tuned / score_base`` and 1.0 means nothing moved. The command
(``smar retention``) is :mod:`smar.commands.retention`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

from smar.errors import UsageError

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

    IncludePath: TypeAlias = str | os.PathLike | Sequence[str | os.PathLike]  # task folders
    Model: TypeAlias = LM | str | os.PathLike  # an lm-eval LM, or a model or adapter folder

__all__ = [
    "make_task_manager",
    "check_tasks",
    "evaluate_tasks",
    "task_scores",
    "summarize",
    "measure_retention",
]

log = logging.getLogger(__name__)

# the metric a task is scored by when none is named: the first of these it reports
PRIMARY = ("acc", "exact_match", "pass@1", "bits_per_byte", "f1", "acc_norm", "mcc")
LOWER_IS_BETTER = ("bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity")


def make_task_manager(
    include_path: IncludePath | None = None, *, local_only: bool = False
) -> TaskManager:
    """lm-eval's ``TaskManager`` over ``include_path`` (a folder or a list of folders) and, unless
    ``local_only``, every task of the installed harness (indexing those takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not isinstance(include_path, (str, os.PathLike)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    return TaskManager(include_path=include_path, include_defaults=not local_only)


def check_tasks(tasks: Sequence[str], task_manager: TaskManager) -> None:
    """Raises ``ValueError`` naming each task lm-eval does not know, with close names."""
    if not tasks:
        raise UsageError("no task given; fix: name lm-eval tasks, e.g. --tasks mmlu,gsm8k")
    known = set(task_manager.all_tasks)
    for t in tasks:
        testbed_known = any(k.startswith("testbed_") for k in known)
        if t not in known and t.startswith("testbed_") and not testbed_known:
            raise UsageError(
                f"{t!r} is a task of the testbed's own models (smar demo run folders), which "
                "these Hugging Face folders are not",
                "name lm-eval tasks for them, e.g. --tasks arc_easy,hellaswag (with "
                "--include-path for local YAML tasks)",
            )
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(
                f"unknown lm-eval task {t!r}{hint}; fix: check the name (`lm-eval ls tasks`) or "
                "pass --include-path with the folder of its YAML"
            )


def _check_model(model: Model) -> None:
    """An LM object, or a local Hugging Face model or PEFT adapter folder; anything else a
    ``ValueError`` naming the fix (checked for both models before either runs)."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return
    d = Path(model)
    if not d.is_dir():
        raise UsageError(f"model folder {d} does not exist; fix: pass a local model folder")
    if (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
        return  # a PEFT adapter folder: its base model is checked when it loads
    file = d / "config.json"
    if file.is_dir():
        raise UsageError(f"{d} has a folder where config.json should be; fix: pass a folder "
                         "written by save_pretrained")  # fmt: skip
    if not file.is_file():
        raise UsageError(
            f"{d} has no readable config.json: not a model folder; fix: pass a Hugging Face model "
            "folder (config.json + weights), e.g. one written by save_pretrained"
        )
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise UsageError(
            f"{file} is not readable JSON ({first}); fix: restore the config.json saved with "
            "these weights (save_pretrained writes it)"
        ) from None
    if not isinstance(cfg, dict) or not ("model_type" in cfg or "architectures" in cfg):
        raise UsageError(
            f"{d}/config.json names no model_type: not a Hugging Face model folder; fix: pass "
            "one, or for a testbed run or stage folder use `smar retention` (it serves the "
            "testbed model) or smar.testbed.lm_eval_tasks.TestbedLM"
        )


def _open_model(model: Model, batch_size: int | None, bias: bool = True) -> LM:
    """An ``lm_eval`` LM: an LM object as is; a local folder loaded by
    :func:`smar.hf.loading.load_model_folder` (a causal LM, a vision-language model read on text
    alone, a PEFT adapter; its trained modality bias attached unless ``bias=False``) and served
    by lm-eval's ``HFLM``."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    _check_model(model)
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from smar.hf.loading import load_model_folder

    loaded = load_model_folder(model, bias=bias, tokenizer=True)
    print(f"smar retention: {loaded.note}", file=sys.stderr)
    assert loaded.tokenizer_path is not None  # asked for with tokenizer=True
    tokenizer = _tokenizer(transformers, loaded.tokenizer_path)
    # A vision-language model run on input_ids alone is its language model (the text row of
    # the bias applies): retention measures what the vision training left of it.
    lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, backend="causal",
              batch_size=batch_size or 1,
              device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    lm._smar_loaded = loaded  # the bias wrappers live as long as the LM
    return lm


def _tokenizer(transformers: ModuleType, folder: str) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, with a bos or eos token: lm-eval puts one before every text it
    scores (without, it fails deep inside)."""
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 (a garbled vocabulary or model file: any error)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"{folder}: its tokenizer does not load ({type(e).__name__}: {first}); "
                         "fix: save the tokenizer into the folder again with "
                         "save_pretrained") from None  # fmt: skip
    if tok.bos_token_id is None and tok.eos_token_id is None:
        raise UsageError(
            f"{folder}: its tokenizer has neither a bos nor an eos token, and lm-eval puts one "
            "before every text it scores; fix: set eos_token (the token the model ends a text "
            "with) in tokenizer_config.json"
        )
    return tok


def evaluate_tasks(
    model: Model,
    tasks: Sequence[str],
    *,
    include_path: IncludePath | None = None,
    limit: int | float | None = None,
    batch_size: int | None = None,
    metrics: Mapping[str, str] | None = None,
    task_manager: TaskManager | None = None,
    bias: bool = True,
) -> dict[str, dict[str, Any]]:
    """Runs lm-eval's ``simple_evaluate`` on one model and returns its score per task.

    Args:
        model: an ``lm_eval.api.model.LM`` or a local Hugging Face model folder.
        tasks: lm-eval task, group or tag names.
        include_path: folder(s) of local task YAMLs.
        limit: documents per task (lm-eval's ``limit``; for quick checks only).
        batch_size: passed to lm-eval's ``"hf"`` model.
        metrics: ``task -> metric`` (e.g. ``{"hellaswag": "acc_norm"}``); default
            :data:`PRIMARY`.
        task_manager: a ``TaskManager`` to reuse (it indexes every task once).
        bias: attach a folder's ``smar_bias.safetensors`` (its trained modality bias).

    Returns:
        :func:`task_scores` of the run.
    """
    import lm_eval

    tm = task_manager or make_task_manager(include_path)
    check_tasks(tasks, tm)
    lm = _open_model(model, batch_size, bias)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=tm,
        limit=limit,
        bootstrap_iters=0,  # no stderr: retention is a ratio of two point estimates
        log_samples=False,
        verbosity="WARNING",
    )
    return task_scores(out, tasks, metrics)


def _metric(row: Mapping[str, Any], wanted: str | None, task: str) -> str | None:
    keys = [k for k in row if "," in k and "_stderr" not in k and _number(row[k])]
    names = [wanted] if wanted else list(PRIMARY)
    for name in names:
        for k in keys:
            if k.split(",")[0] == name:
                return k
    if wanted:
        have = sorted({k.split(",")[0] for k in keys})
        raise UsageError(f"task {task!r} reports no metric {wanted!r}; it reports {have}")
    return keys[0] if keys else None


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def task_scores(
    results: Mapping[str, Any], tasks: Sequence[str], metrics: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Score per task from lm-eval's results dict: a task or a group with an aggregate score is
    one entry; a group without one or a tag gives one entry per task in it.

    Returns:
        ``task -> {"metric", "value", "higher_is_better", "score"}`` where ``score`` is
        ``value``, or ``1 / value`` for a lower-is-better metric.
    """
    metrics = metrics or {}
    rows, groups = results["results"], results.get("group_subtasks", {})
    hib = results.get("higher_is_better", {})
    configs = results.get("configs", {})
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, metric: str | None = None) -> None:
        row = rows.get(name, {})
        key = _metric(row, metrics.get(name, metric), name)
        if key is None:
            members = groups.get(name) or [
                t for t, c in configs.items() if name in _as_list(c.get("tag"))
            ]
            if not members:
                raise UsageError(f"lm-eval returned no score for task {name!r}")
            for m in members:
                add(m, metrics.get(name))
            return
        base = key.split(",")[0]
        higher = hib.get(name, {}).get(base, base not in LOWER_IS_BETTER)
        value = float(row[key])
        if not higher and not value > 0:
            raise UsageError(f"task {name!r}: {key} is {value}, cannot invert it into a score")
        score = value if higher else 1.0 / value
        out[name] = {"metric": key, "value": value, "higher_is_better": higher, "score": score}

    for t in tasks:
        add(t)
    return out


def _as_list(x: object) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def summarize(
    base: Mapping[str, dict[str, Any]], tuned: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    """Retention per task (``tuned score / base score``), the mean, the mean without the task
    that moved most (largest ``|retention - 1|``) and that task, as a JSON-ready dict."""
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise UsageError(f"tasks scored for one model only: {missing}")
    tasks: dict[str, dict[str, Any]] = {}
    for name, b in base.items():
        t = tuned[name]
        if not b["score"] > 0:
            raise UsageError(
                f"the base model scores {b['value']} on {name!r}: retention needs a score > 0"
            )
        tasks[name] = {
            "metric": b["metric"],
            "higher_is_better": b["higher_is_better"],
            "base": b["value"],
            "tuned": t["value"],
            "retention": t["score"] / b["score"],
        }
    ret = {k: v["retention"] for k, v in tasks.items()}
    out: dict[str, Any] = {"tasks": tasks, "mean": sum(ret.values()) / len(ret)}
    if len(ret) >= 2:
        worst = max(ret, key=lambda k: abs(ret[k] - 1.0))
        rest = [v for k, v in ret.items() if k != worst]
        out.update(mean_wo_outlier=sum(rest) / len(rest), outlier=worst)
    else:
        out.update(mean_wo_outlier=None, outlier=None)  # one task: nothing left to average
    return out


def measure_retention(
    base: Model,
    tuned: Model,
    tasks: Sequence[str],
    *,
    include_path: IncludePath | None = None,
    limit: int | float | None = None,
    batch_size: int | None = None,
    metrics: Mapping[str, str] | None = None,
    task_manager: TaskManager | None = None,
    local_only: bool = False,
    bias: bool = True,
) -> dict[str, Any]:
    """Both models on ``tasks`` (see :func:`evaluate_tasks` for the arguments; ``local_only``:
    see :func:`make_task_manager`) and their :func:`summarize`, plus the task list and lm-eval's
    version."""
    from importlib.metadata import version

    for m in (base, tuned):  # both models and every task checked before either runs
        _check_model(m)
    tm = task_manager or make_task_manager(include_path, local_only=local_only)
    check_tasks(tasks, tm)
    kw: dict[str, Any] = dict(
        limit=limit, batch_size=batch_size, metrics=metrics, task_manager=tm, bias=bias
    )
    b = evaluate_tasks(base, tasks, **kw)
    t = evaluate_tasks(tuned, tasks, **kw)
    return {
        **summarize(b, t),
        "requested": list(tasks),
        "limit": limit,
        "lm_eval_version": version("lm_eval"),
    }
