"""The ``smar`` command: thin commands over the library."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("smar")

COMMANDS = ("demo", "inspect", "sweep")


def _demo(args: argparse.Namespace) -> int:
    """The paper's experiment end to end: stages 0-3 for every arm and control, then the report."""
    from smar.testbed.config import demo_config, smoke_config
    from smar.testbed.overrides import apply_overrides
    from smar.testbed.pipeline import run_pipeline

    cfg = smoke_config() if args.smoke else demo_config()
    if args.out:
        cfg.out = args.out
    cfg = apply_overrides(cfg, args.overrides)
    result = run_pipeline(cfg, quiet=args.quiet)
    print(f"report: {cfg.out}/report.md ({result['timings']['total_s']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smar", description=__doc__)
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

    sweep = sub.add_parser("sweep", help="arms x seeds x text ratios x bands x learning rates")
    sweep.add_argument("overrides", nargs="*", help="e.g. seeds=0,1,2 text_ratios=0.025,0.1")
    sweep.set_defaults(func=_sweep)
    return p


def _inspect(args: argparse.Namespace) -> int:
    from smar.hf.inspect import inspect_model_dir, load_adapter

    adapters = [a for spec in args.adapter or () for a in load_adapter(spec)]
    print(inspect_model_dir(args.model_dir, adapters or None))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from smar.testbed.sweep import sweep_main

    return sweep_main(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
