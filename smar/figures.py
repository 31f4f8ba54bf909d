"""The matplotlib plumbing of :mod:`smar.plots`: pyplot imported on first use (headless), figures
written atomically, integer ticks, and the MRD axis' scale chosen from the values."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from smar.atomic import publish

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

__all__ = ["pyplot", "integer_ticks", "save", "mrd_scale"]


def pyplot() -> ModuleType:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'smar[plot]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def integer_ticks() -> MaxNLocator:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Writes the figure atomically (temp file, then rename) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        fig.clf()
        pyplot().close(fig)
    return path


def mrd_scale(ax: Axes, values: Sequence[float]) -> None:
    """Chooses the MRD axis' scale from the values (band included) and labels its ticks as plain
    numbers.

    A log axis only helps where values span decades; over less (MRD of 0.5 to 3, say) it shows a
    single labelled tick (10^0), so such ranges get a linear axis. From 1.5 decades on the axis
    is symlog, linear below the smallest positive value's decade so that a zero MRD still
    shows, with ticks at 1, 2 and 5 per decade where there are few decades (always >= 3 labels).
    """
    from matplotlib.ticker import (
        FuncFormatter,
        MaxNLocator,
        NullFormatter,
        ScalarFormatter,
        SymmetricalLogLocator,
    )

    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    positive = [v for v in finite if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    if decades < 1.5 or any(v < 0 for v in finite):
        ax.set_yscale("linear")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=3))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        return
    linthresh = 10.0 ** math.floor(math.log10(min(positive)))
    subs = [1.0, 2.0, 5.0] if decades < 3.0 else [1.0]
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=linthresh, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    minor = [float(k) for k in range(2, 10)]
    ax.yaxis.set_minor_locator(SymmetricalLogLocator(base=10, linthresh=linthresh, subs=minor))
    ax.yaxis.set_minor_formatter(NullFormatter())
