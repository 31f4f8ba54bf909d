"""The ``smar retention`` command: its options checked before either model is evaluated, then
:func:`smar.retention.measure_retention` on ``--base`` and ``--tuned``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from smar.atomic import write_text
from smar.errors import UsageError
from smar.retention import measure_retention

__all__ = ["add_parser", "main"]

log = logging.getLogger("smar.retention")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``smar retention`` to an argparse subparsers object and returns its parser."""
    p = subparsers.add_parser(
        "retention",
        help="language retention of a tuned model with lm-evaluation-harness",
        description="Scores --base and --tuned on lm-eval tasks and writes retention per task, "
        "the mean and the mean without the most-moved task as JSON.",
    )
    p.add_argument("--base", required=True, help="model folder before tuning")
    p.add_argument("--tuned", required=True, help="model folder after tuning")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval tasks, groups or tags (testbed folders: testbed_text)",
    )
    p.add_argument("--include-path", action="append", help="folder of local task YAMLs")
    p.add_argument(
        "--metric", action="append", default=[], help="TASK=METRIC, e.g. hellaswag=acc_norm"
    )
    p.add_argument("--limit", type=float, help="documents per task (quick checks only)")
    p.add_argument("--batch-size", type=int, help="batch size of the model")
    p.add_argument("--out", help="JSON file to write (default: print it)")
    p.add_argument(
        "--local-only",
        action="store_true",
        help="only tasks from --include-path and testbed folders (skips indexing lm-eval's own)",
    )
    p.add_argument("--tasks-dir", help="where testbed tasks are exported (default: a temp dir)")
    p.add_argument("--no-bias", action="store_true",
                   help="leave the folders' smar_bias.safetensors out (the models without their "
                   "trained modality bias)")  # fmt: skip
    p.set_defaults(func=main)
    return p


OpenModels = Callable[..., "tuple | None"]


def main(args: argparse.Namespace, *, open_models: OpenModels | None = None) -> int:
    """``smar retention``: 0 on success; an expected error prints one line, exit code 2.

    ``open_models(base, tuned, workdir, batch_size=)`` may serve folders this library does not
    know (the CLI passes ``smar.testbed.lm_eval_tasks.open_pair``): it returns ``(base_lm,
    tuned_lm, include_path)`` or None.
    """
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        metrics = {}
        for m in args.metric:
            task, sep, metric = m.partition("=")
            if not sep or not task or not metric:
                raise UsageError(f"--metric {m!r} is not TASK=METRIC")
            metrics[task] = metric
        if args.batch_size is not None and args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
        limit = _limit(args.limit)
        _check_paths(args)
        with tempfile.TemporaryDirectory(prefix="smar-tasks-") as tmp:
            base, tuned, include = args.base, args.tuned, list(args.include_path or [])
            if open_models is not None:
                for f in (base, tuned):
                    if not Path(f).is_dir():
                        raise UsageError(f"model folder {f} does not exist; fix: pass its path")
                bs = args.batch_size or 256
                opened = open_models(base, tuned, args.tasks_dir or tmp, batch_size=bs)
                if opened is not None:
                    base, tuned, extra = opened
                    include.append(str(extra))
            report = measure_retention(
                base,
                tuned,
                tasks,
                include_path=include or None,
                limit=limit,
                batch_size=args.batch_size,
                metrics=metrics,
                local_only=args.local_only,
                bias=not getattr(args, "no_bias", False),
            )
        report = {"base": str(args.base), "tuned": str(args.tuned), **report}
    except ValueError as e:
        print(f"smar: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
        log.info("wrote %s", args.out)
    else:
        print(text)
    return 0


def _limit(limit: float | None) -> int | float | None:
    """``--limit``: a fraction of each task below 1, a whole number of documents from 1 on."""
    if limit is None:
        return None
    if not (math.isfinite(limit) and limit > 0):
        raise UsageError(
            f"--limit {limit:g}: must be above 0; fix: give a number of documents per task "
            "(e.g. --limit 100) or a fraction below 1 (e.g. --limit 0.1)"
        )
    if limit >= 1 and limit != int(limit):
        raise UsageError(f"--limit {limit:g}: from 1 on it counts documents; fix: give a whole "
                         f"number, e.g. --limit {int(limit)}")  # fmt: skip
    return int(limit) if limit >= 1 else limit


def _check_paths(args: argparse.Namespace) -> None:
    """``--include-path`` folders exist; ``--out`` and ``--tasks-dir`` can be written (checked
    before either model is evaluated)."""
    from smar.atomic import output_problem

    for p in args.include_path or ():
        if not Path(p).is_dir():
            what = "is not a folder" if Path(p).exists() else "does not exist"
            raise UsageError(f"--include-path {p} {what}; fix: pass the folder of the task YAMLs")
    for flag, path, fix in (
        ("--out", args.out, "a FILE.json this user can write (without it the JSON is printed)"),
        ("--tasks-dir", args.tasks_dir, "a folder this user can write (without it: a temp dir)"),
    ):
        why = path is not None and (output_problem(path, folder=flag != "--out")
                                    if path.strip() else "is empty")  # fmt: skip
        if why:
            raise UsageError(f"{flag} {path or repr(path)} {why}; fix: pass {fix}")
