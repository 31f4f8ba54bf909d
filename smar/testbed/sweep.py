"""``smar sweep``: arms x seeds x text ratios x bands x learning rates, with 95% intervals."""

from __future__ import annotations

import logging

from smar.testbed.config import sweep_config
from smar.testbed.overrides import apply_overrides
from smar.testbed.pipeline import run_pipeline

log = logging.getLogger(__name__)


def sweep_main(args) -> int:
    """``smar sweep [overrides]``; ``bands=1.5:2.0,0:0`` gives bands as ``low:high`` pairs."""
    overrides = []
    bands = None
    for item in list(getattr(args, "overrides", []) or []):
        if item.startswith("bands="):
            fix = f"{item!r}: write bands as low:high pairs, e.g. bands=1.5:2,0:0"
            try:
                bands = [tuple(float(x) for x in b.split(":")) for b in item[6:].split(",")]
            except ValueError as err:
                raise ValueError(fix) from err
            if any(len(b) != 2 for b in bands):
                raise ValueError(fix)
        else:
            overrides.append(item)
    cfg = apply_overrides(sweep_config(), overrides)
    if bands is not None:
        cfg.bands = bands
    run_pipeline(cfg)
    log.info("wrote %s/report.md", cfg.out)
    return 0
