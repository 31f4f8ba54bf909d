"""Plots of what the metrics computed. Needs matplotlib (``pip install smar[plot]``).

Every plot takes plain numbers (lists or tensors) and writes one image atomically. The routing
plots of ``smar analyze`` take arrays shaped by the legend below, for any number of layers,
experts and modalities.

Shapes legend: L MoE layers, M modalities, E experts, R runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smar.errors import UsageError
from smar.figures import integer_ticks as _integer_ticks
from smar.figures import mrd_scale as _mrd_scale
from smar.figures import pyplot as _pyplot
from smar.figures import save as _save

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage
    from torch import Tensor

    Grid3 = Tensor | Sequence[Sequence[Sequence[float]]]  # (L, M, E)

__all__ = [
    "plot_mrd",
    "plot_retention_vs_accuracy",
    "plot_expert_usage",
    "plot_expert_composition",
    "plot_entropy",
    "plot_comparison",
    "plot_mrd_history",
]


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
    return _save(_mrd_figure(mrd_per_arm, band=band, title=title), path)


def _mrd_figure(
    mrd_per_arm: Mapping[str, Sequence[float]], *, band: tuple[float, float] | None, title: str
) -> Figure:
    """The figure of :func:`plot_mrd`, not saved (the tests read its axes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if band is not None:
        ax.axhspan(band[0], band[1], color="tab:green", alpha=0.15, label=f"band {band}")
    for arm, values in mrd_per_arm.items():
        ax.plot(range(len(values)), list(values), marker="o", label=arm)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("MRD (symmetric KL, nats)")
    _mrd_scale(ax, [v for vs in mrd_per_arm.values() for v in vs] + list(band or ()))
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def _heatmap(
    ax: Axes,
    grid: Sequence[Sequence[float]],
    *,
    title: str,
    cmap: str,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = True,
) -> AxesImage:
    L, E = len(grid), len(grid[0])
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step_x, step_y = max(1, E // 16), max(1, L // 24)
    ax.set_xticks(range(0, E, step_x))
    ax.set_yticks(range(0, L, step_y))
    ax.tick_params(labelsize=7)
    if annotate and L * E <= 96:
        for i in range(L):
            for j in range(E):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=6)
    return im


def _size(L: int, E: int, cols: int, rows: int) -> tuple[float, float]:
    width = min(16.0, max(3.2, 0.28 * E + 1.6)) * cols
    height = min(12.0, max(2.2, 0.22 * L + 1.2)) * rows
    return min(width, 24.0), min(height, 30.0)


def plot_expert_usage(
    mass: Grid3,
    load: Grid3,
    modalities: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "Expert usage per modality",
) -> Path:
    """Heatmaps (layers x experts) per modality: routing probability mass and top-k load.

    Args:
        mass: ``(L, M, E)`` mean router probability per expert (each row sums to 1).
        load: ``(L, M, E)`` share of the modality's top-k slots per expert (rows sum to 1).
        modalities: the M names.
        path: output image.

    Shapes:
        mass, load: (L, M, E), tensors or nested lists.
    """
    plt = _pyplot()
    mass, load = _grid3(mass), _grid3(load)
    L, M, E = len(mass), len(modalities), len(mass[0][0])
    fig, axes = plt.subplots(M, 2, figsize=_size(L, E, 2, M), squeeze=False)
    for m, name in enumerate(modalities):
        for c, (arr, what) in enumerate(((mass, "probability mass"), (load, "top-k share"))):
            grid = [[arr[i][m][e] for e in range(E)] for i in range(L)]  # (L, E)
            im = _heatmap(axes[m][c], grid, title=f"{name}: {what}", cmap="viridis", vmin=0.0)
            fig.colorbar(im, ax=axes[m][c], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _grid3(values: Any) -> list[list[list[float]]]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [[[float(v) for v in row] for row in layer] for layer in values]


def plot_expert_composition(
    share: Grid3,
    modalities: Sequence[str],
    path: str | os.PathLike,
    *,
    threshold: float = 0.9,
    title: str = "Modality composition of each expert",
) -> Path:
    """The share of each expert's top-k slots that the first modality (text) holds, per layer;
    experts that one modality holds almost alone (share >= ``threshold``) are marked with that
    modality's initial, and experts that received no token are grey and hatched.

    Args:
        share: ``(L, M, E)``: per layer and expert, the share of its slots taken by each modality
            (sums to 1 over M for an expert that was chosen at all; 0 or NaN over M for one that
            received no token).
        modalities: the M names; the first is drawn (1 = all its tokens, 0 = none).
        path: output image.
        threshold: the share from which one modality counts as holding the expert alone.

    Shapes:
        share: (L, M, E).
    """
    return _save(_composition_figure(share, modalities, threshold=threshold, title=title), path)


# For experts that received no token: drawn as "share 0" they would look exactly like the experts
# that the other modality holds alone. A darker grey than the map's light-grey middle (an even
# mix), and hatched besides.
_NO_TOKENS = "#767676"


def _composition_figure(
    share: Grid3, modalities: Sequence[str], *, threshold: float, title: str
) -> Figure:
    """The figure of :func:`plot_expert_composition`, not saved (the tests read its artists)."""
    import matplotlib.patheffects as pe
    import numpy as np
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    plt = _pyplot()
    share = _grid3(share)
    L, M, E = len(share), len(modalities), len(share[0][0])
    total = [[sum(share[i][m][e] for m in range(M)) for e in range(E)] for i in range(L)]
    # NaN > 0 is False, so an expert whose share is NaN (0 / 0) is empty as well.
    empty = [[not total[i][e] > 0 for e in range(E)] for i in range(L)]
    first = np.ma.masked_array([[share[i][0][e] for e in range(E)] for i in range(L)], mask=empty)
    cmap = plt.get_cmap("coolwarm_r").with_extremes(bad=_NO_TOKENS)
    fig, ax = plt.subplots(figsize=_size(L, E, 1, 1), layout="constrained")
    im = ax.imshow(first, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    holes = [Rectangle((e - 0.5, i - 0.5), 1, 1) for i in range(L) for e in range(E) if empty[i][e]]
    if holes:
        ax.add_collection(PatchCollection(holes, facecolor="none", edgecolor="white",
                                          hatch="///", linewidth=0.0))  # fmt: skip
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_yticks(range(0, L, max(1, L // 24)))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"{modalities[0]} share of slots")
    # White letters outlined in black read on the dark red and the dark blue ends of the map
    # alike, where black letters all but vanish into the red.
    outline = [pe.withStroke(linewidth=2.2, foreground="black")]
    size = 9 if E <= 24 else 7
    held = set()
    for i in range(L):
        for e in range(E):
            if empty[i][e]:
                continue
            m = max(range(M), key=lambda k: share[i][k][e])
            if share[i][m][e] >= threshold:
                held.add(m)
                ax.text(e, i, modalities[m][0].upper(), ha="center", va="center", fontsize=size,
                        fontweight="bold", color="white", path_effects=outline)  # fmt: skip
    handles: list[Artist] = [
        Line2D([], [], linestyle="none", marker=rf"$\mathbf{{{modalities[m][0].upper()}}}$",
               markersize=8, color="black", label=f"{modalities[m]} >= {threshold:.0%}")
        for m in sorted(held)]  # fmt: skip
    handles.append(Patch(facecolor=_NO_TOKENS, edgecolor="white", hatch="///", label="no tokens"))
    # Below the x label, outside the grid: inside it would hide cells.
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7,
               frameon=False)  # fmt: skip
    ax.set_title(f"{title}\n(letter: one modality holds >= {threshold:.0%} of the slots;"
                 " grey: no tokens)", fontsize=9)  # fmt: skip
    return fig


def plot_entropy(
    entropy_per_run: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str = "Routing entropy per MoE layer",
) -> Path:
    """Mean per-token routing entropy / log(E) per layer: one line per run and modality.

    Args:
        entropy_per_run: run name -> modality name -> values per layer (1 = uniform routing).
        path: output image.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = ["-", "--", ":", "-."]
    for r, (run, per_mod) in enumerate(entropy_per_run.items()):
        for m, (mod, values) in enumerate(per_mod.items()):
            ax.plot(range(len(values)), [float(v) for v in values], marker="o",
                    linestyle=styles[m % 4], color=f"C{r % 10}", label=f"{run}: {mod}")  # fmt: skip
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("entropy / log(E)")
    ax.set_ylim(0.0, 1.05)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_comparison(
    metrics_per_run: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str = "Runs compared",
) -> Path:
    """One panel per metric, one bar per run (NaN bars are left out).

    Args:
        metrics_per_run: run name -> metric name -> value; every run has the same metrics.
        path: output image.
    """
    plt = _pyplot()
    runs = list(metrics_per_run)
    names = list(next(iter(metrics_per_run.values())))
    fig, axes = plt.subplots(
        1, len(names), figsize=(min(24.0, 2.6 * len(names) + 0.2 * len(runs)), 3.4), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        values = [float(metrics_per_run[r][name]) for r in runs]
        ax.bar(range(len(runs)), values, color=[f"C{i % 10}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs, rotation=45, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_mrd_history(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    band: tuple[float, float] | None = (1.5, 2.0),
    title: str = "MRD per MoE layer over training steps",
) -> Path:
    """Per-layer MRD over training steps, the band shaded.

    Args:
        history: records ``{"step": int, "mrd": [per layer]}`` (as a testbed run's
            ``results.json`` holds); records with an empty ``mrd`` are skipped.
        path: output image.
        band: the tolerance band to shade, or None.
    """
    rows = [h for h in history if h.get("mrd")]
    if not rows:
        raise UsageError("plot_mrd_history: no record holds per-layer MRD values")
    return _save(_mrd_history_figure(rows, band=band, title=title), path)


def _mrd_history_figure(
    rows: Sequence[Mapping[str, Any]], *, band: tuple[float, float] | None, title: str
) -> Figure:
    """The figure of :func:`plot_mrd_history` from records that hold MRD, not saved."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if band is not None:
        ax.axhspan(band[0], band[1], color="tab:green", alpha=0.15, label=f"band {tuple(band)}")
    steps = [int(h["step"]) for h in rows]
    drawn = list(band or ())
    for layer in range(len(rows[0]["mrd"])):
        values = [_value(h["mrd"], layer) for h in rows]
        ax.plot(steps, values, marker=".", label=f"layer {layer}")
        drawn += values
    ax.set_xlabel("training step")
    ax.set_ylabel("MRD (symmetric KL, nats)")
    _mrd_scale(ax, drawn)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def _value(values: Sequence[float | None], i: int) -> float:
    """``values[i]`` as a float; NaN where it is missing or null (an MRD where a modality was
    absent is written as JSON null)."""
    v = values[i] if i < len(values) else None
    return float("nan") if v is None else float(v)


def plot_retention_vs_accuracy(
    points: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str = "Language retention vs multimodal accuracy",
    xlabel: str = "mean language retention (after / stage-1 LM)",
    ylabel: str = "mean multimodal accuracy",
    origin: bool = False,
) -> Path:
    """One point per arm: retention (x) against multimodal accuracy (y), named in a legend.

    Args:
        points: arm name -> ``{"retention": r, "accuracy": a}``, optionally with ``"retention_ci"``
            and ``"accuracy_ci"`` half-widths drawn as error bars.
        path: output image.
        xlabel, ylabel: the axes' labels (differences to a reference arm, for instance).
        origin: draw the lines x = 0 and y = 0 (points that are differences to a reference).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    if origin:
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.axvline(0.0, color="0.6", linewidth=0.8)
    markers = "osD^vP*Xhp<>"
    for k, (arm, p) in enumerate(points.items()):
        ax.errorbar(
            p["retention"],
            p["accuracy"],
            xerr=p.get("retention_ci"),
            yerr=p.get("accuracy_ci"),
            fmt=markers[k % len(markers)],
            color=f"C{k % 10}",
            capsize=3,
            label=arm,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return _save(fig, path)
