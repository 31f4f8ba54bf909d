"""The ``smar`` command: thin commands over the library.

Every option and override is checked before any work. An expected error (a
:class:`smar.errors.SmarError`: bad input, a corrupt file, a diverged stage) is one line
on stderr, ``smar: error: <problem>; fix: <fix>``, and exit code 2; ``--debug`` adds the
traceback. Ctrl-C or SIGTERM stops every worker, keeps what finished and prints the command that
resumes (exit code 130); anything else is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from smar.adapters import Adapter

log = logging.getLogger("smar")

COMMANDS = ("analyze", "demo", "inspect", "real", "retention", "sweep")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (and exit code 2, as argparse has)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _demo(args: argparse.Namespace) -> int:
    """The paper's experiment end to end: stages 0-3 for every arm and control, then the report."""
    from smar.testbed.config import demo_config, smoke_config
    from smar.testbed.overrides import apply_overrides
    from smar.testbed.pipeline import run_pipeline
    from smar.testbed.report import summary_text

    _refuse_torchrun("demo")
    cfg = smoke_config() if args.smoke else demo_config()
    if args.out is not None:  # --out '' is refused by validation, not dropped
        given = [o for o in args.overrides if o.split("=", 1)[0] == "out"]
        if given:
            from smar.errors import UsageError

            raise UsageError(f"the output folder is given twice (--out {args.out!r} and "
                             f"{given[0]})", "give it once")  # fmt: skip
        cfg.out = args.out
    cfg = apply_overrides(cfg, args.overrides)
    result = run_pipeline(cfg, quiet=args.quiet)
    print(summary_text(result))
    print(f"report: {cfg.out}/report.md ({result['timings']['total_s']:.0f} s)")
    return 0


def _refuse_torchrun(command: str) -> None:
    """The testbed runs in one process (its stage-3 runs already use worker processes): under
    torchrun every rank would train the same runs and write the same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        from smar.errors import UsageError

        raise UsageError(
            f"smar {command} runs in one process, not under torchrun (WORLD_SIZE={world}): every "
            "rank would train the same stage-3 runs and write the same files",
            f"run `smar {command}` directly; its stage-3 runs use `workers=` processes "
            "(e.g. workers=4)",
        )


def _real(args: argparse.Namespace) -> int:
    from smar.testbed.real.command import main as real_main

    return real_main(args)


def _analyze(args: argparse.Namespace) -> int:
    from smar.commands.analyze import main as analyze_main
    from smar.testbed.analyze_run import load_runs

    return analyze_main(args, run_loader=load_runs)


def _retention(args: argparse.Namespace) -> int:
    from smar.commands.retention import main as retention_main
    from smar.testbed.lm_eval_tasks import open_pair

    return retention_main(args, open_models=open_pair)


def _version() -> str:
    """``smar.__version__`` (the code that runs, even from a source tree or a stale editable
    install), else the installed distribution's."""
    import smar

    found = getattr(smar, "__version__", None)
    if found:
        return found
    from importlib.metadata import version

    return version("smar")


# reST in the docstrings that help texts come from: ``code``, :role:`~pkg.Name` and `title`
_REST = [
    (re.compile(r"``(.+?)``"), r"\1"),
    (re.compile(r":[a-z]+(?::[a-z]+)?:`~[\w.]*?(\w+)`"), r"\1"),  # :class:`~a.B`: B, as Sphinx
    (re.compile(r":[a-z]+(?::[a-z]+)?:`([^`]+)`"), r"\1"),
    (re.compile(r"(?<![\w`])`([^`]+)`(?![\w`])"), r"\1"),
]


def plain(text: str | None) -> str | None:
    """``text`` without reST markup, as a terminal shows it."""
    if not text:
        return text
    for pattern, repl in _REST:
        text = pattern.sub(repl, text)
    return text


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Strips reST from every help text of ``parser`` and its subcommands: several come from
    docstrings (the modules adding commands write theirs), which --help would show raw."""
    parser.description = plain(parser.description)
    parser.epilog = plain(parser.epilog)
    for action in parser._actions:
        action.help = plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the one-line helps listed by `smar --help`
                choice.help = plain(choice.help)
            for sub in set(action.choices.values()):
                _plain_help(sub)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="smar", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (anywhere in the line)"
    )
    p.add_argument("--version", action="version", version=f"smar {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the paper's experiment end to end on this machine")
    demo.add_argument("--smoke", action="store_true", help="tiny sizes, under two minutes")
    demo.add_argument("--out", help="output folder (default runs/demo, runs/smoke)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("overrides", nargs="*", help="section.field=value, e.g. tune.lr=3e-4")
    demo.set_defaults(func=_demo)

    insp = sub.add_parser("inspect", help="list the MoE routers smar finds in a saved HF model")
    insp.add_argument("model_dir", help="a directory written by save_pretrained")
    insp.add_argument(
        "--adapter",
        action="append",
        help="package.module:NAME of a smar.adapters.Adapter for routers the model does not "
        "declare (repeatable)",
    )
    insp.set_defaults(func=_inspect)

    from smar.testbed.real.command import add_parser as add_real

    add_real(sub).set_defaults(func=_real)

    sweep = sub.add_parser("sweep", help="arms x seeds x text ratios x bands x learning rates")
    sweep.add_argument("overrides", nargs="*", help="e.g. seeds=0,1,2 bands=1.5:2,0:0")
    sweep.set_defaults(func=_sweep)

    from smar.commands.analyze import add_parser as add_analyze
    from smar.commands.retention import add_parser as add_retention

    add_analyze(sub)
    sub.choices["analyze"].set_defaults(func=_analyze)
    add_retention(sub)
    sub.choices["retention"].set_defaults(func=_retention)
    _plain_help(p)
    return p


def _check_model_dir(path: str) -> None:
    """``smar inspect``'s folder: exists, is a folder, holds a config.json that parses."""
    from smar.errors import UsageError

    hub = "a model-hub id? download it first: hf download ID --local-dir DIR"
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such directory", f"pass a save_pretrained folder ({hub})")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is a file", "pass the folder written by save_pretrained")
    config = os.path.join(path, "config.json")
    if os.path.isdir(config):
        raise UsageError(f"{path} has a folder where config.json should be",
                         "pass a folder written by save_pretrained")  # fmt: skip
    if not os.path.isfile(config):
        raise UsageError(f"{path} has no config.json", "pass a folder written by save_pretrained")
    try:
        with open(config, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, OSError) as e:
        raise UsageError(
            f"{config} is not valid JSON ({str(e)[:80]})",
            "restore the config.json saved with these weights (save_pretrained writes it)",
        ) from None


def _inspect(args: argparse.Namespace) -> int:
    from smar.errors import UsageError

    _check_model_dir(args.model_dir)
    from smar.hf.inspect import inspect_model_dir, load_adapter

    adapters: list[Adapter] = []
    for spec in args.adapter or ():
        try:
            adapters += load_adapter(spec)
        except (ImportError, AttributeError, ValueError) as e:
            raise UsageError(
                f"--adapter {spec}: {e}", "name a smar.adapters.Adapter as package.module:NAME"
            ) from None
        except Exception as e:  # the user's module failed while it was imported
            raise UsageError(
                f"--adapter {spec}: importing its module raised {type(e).__name__}: {str(e)[:120]}",
                "fix that module (run `python -c 'import MODULE'` to see it)",
            ) from None
    try:
        import transformers

        transformers.AutoConfig.from_pretrained(args.model_dir)
    except (ValueError, OSError, KeyError) as e:
        raise UsageError(
            f"{args.model_dir}/config.json: {str(e).split('. ')[0][:200]}",
            "pass a folder written by save_pretrained with a transformers model type",
        ) from None
    print(inspect_model_dir(args.model_dir, adapters or None))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from smar.testbed.sweep import sweep_main

    _refuse_torchrun("sweep")
    return sweep_main(args)


@contextlib.contextmanager
def _smar_warnings_in_one_line() -> Iterator[None]:
    """A warning of smar's own is one line, ``smar: warning: <problem>; fix: <fix>``, rather than
    Python's two (the second a line of smar's code); other libraries' warnings are left as
    they are."""
    import warnings

    here = os.path.dirname(os.path.abspath(__file__))
    show = warnings.showwarning

    def one_line(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not os.path.abspath(filename).startswith(here + os.sep):
            return show(message, category, filename, lineno, file, line)
        text = (str(message).splitlines() or [category.__name__])[0]
        print(f"smar: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the command as Ctrl-C does (workers stopped, finished work kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = "--debug" in argv  # accepted after the command too: `smar demo --smoke --debug`
    try:
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    from smar.errors import SmarError

    resume = shlex.join(["smar", *argv])
    try:
        with _sigterm_as_interrupt(), _smar_warnings_in_one_line():
            return args.func(args)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        print(
            f"smar: interrupted ({e or 'Ctrl-C'}); finished stages and runs are kept",
            file=sys.stderr,
        )
        print(f"smar: resume with: {resume}", file=sys.stderr)
        return 130
    except SmarError as e:
        if debug:
            traceback.print_exc()
        kind = "interrupted" if e.exit_code == 130 else "error"
        print(f"smar: {kind}: {e}", file=sys.stderr)
        if e.exit_code == 130:
            print(f"smar: resume with: {resume}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
