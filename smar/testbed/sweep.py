"""``smar sweep``: arms x seeds x text ratios x bands x learning rates, with 95% intervals."""

from __future__ import annotations

import argparse

from smar.testbed.config import sweep_config
from smar.testbed.overrides import apply_overrides
from smar.testbed.pipeline import run_pipeline
from smar.testbed.report import summary_text


def sweep_main(args: argparse.Namespace) -> int:
    """``smar sweep [overrides]``; bands are ``low:high`` pairs (``bands=1.5:2,0:0``), read as
    ``smar demo`` reads them."""
    cfg = apply_overrides(sweep_config(), list(getattr(args, "overrides", []) or []))
    print(summary_text(run_pipeline(cfg)))
    print(f"report: {cfg.out}/report.md")
    return 0
