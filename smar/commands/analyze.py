"""The ``smar analyze`` command: its options, the folders it is given turned into
:class:`smar.analyze.Source` objects (testbed runs through the loader the command layer passes
in, Hugging Face model folders through :func:`smar.analyze.hf_source`), and the report written.
The analysis itself is :mod:`smar.analyze`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from smar.analyze import Source, analyze, hf_source, write_analysis
from smar.atomic import output_problem
from smar.errors import AnalyzeError

__all__ = ["add_parser", "main", "sources_for", "report_dir", "AnalyzeError"]

# (path, batch_size=, max_samples=) -> the run's sources, or None when it is not a testbed run
RunLoader = Callable[..., list[Source] | None]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
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


def report_dir(args: argparse.Namespace) -> Path:
    """``--out``, else ``analysis/`` in the first folder."""
    return Path(args.out) if args.out else Path(args.dirs[0]) / "analysis"


def sources_for(args: argparse.Namespace, run_loader: RunLoader | None = None) -> list[Source]:
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


def main(args: argparse.Namespace, run_loader: RunLoader | None = None) -> int:
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
