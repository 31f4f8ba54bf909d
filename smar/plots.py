"""Plots of what the metrics computed. Needs matplotlib (``pip install smar[plot]``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_mrd", "plot_retention_vs_accuracy"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'smar[plot]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Writes the figure atomically (temp file, then rename) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        fig.clf()
        _pyplot().close(fig)
    return path


def plot_mrd(
    mrd_per_arm: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    band: tuple[float, float] | None = (1.5, 2.0),
    title: str = "Modality routing divergence per MoE layer",
) -> Path:
    """Per-layer MRD, one line per arm, the SMAR band shaded.

    Args:
        mrd_per_arm: arm name -> MRD per MoE layer (NaN where undefined).
        path: output image (png, svg, pdf).
        band: the tolerance band to shade, or None.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if band is not None:
        ax.axhspan(band[0], band[1], color="tab:green", alpha=0.15, label=f"band {band}")
    for arm, values in mrd_per_arm.items():
        ax.plot(range(len(values)), list(values), marker="o", label=arm)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("MRD (symmetric KL, nats)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_retention_vs_accuracy(
    points: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str = "Language retention vs multimodal accuracy",
) -> Path:
    """One point per arm: mean retention (x) against mean multimodal accuracy (y).

    Args:
        points: arm name -> ``{"retention": r, "accuracy": a}``, optionally with ``"retention_ci"``
            and ``"accuracy_ci"`` half-widths drawn as error bars.
        path: output image.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, p in points.items():
        ax.errorbar(
            p["retention"],
            p["accuracy"],
            xerr=p.get("retention_ci"),
            yerr=p.get("accuracy_ci"),
            fmt="o",
            capsize=3,
            label=arm,
        )
        ax.annotate(
            arm,
            (p["retention"], p["accuracy"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("mean language retention (after / stage-1 LM)")
    ax.set_ylabel("mean multimodal accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
