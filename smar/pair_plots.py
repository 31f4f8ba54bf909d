"""Pictures of the pairs of modalities (text, image, video, audio): the MRD matrix of each MoE
layer and each held pair's MRD by layer beside its band. Needs matplotlib (``smar[plot]``).

Shapes legend: L MoE layers, M modalities.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from smar.figures import integer_ticks, mrd_scale, pyplot, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    Bands = Mapping[tuple[int, int], tuple[float, float] | None]

__all__ = ["plot_mrd_matrix", "plot_pair_mrd"]


def _finite(v: float | None) -> TypeGuard[float]:
    return v is not None and math.isfinite(float(v))


def plot_mrd_matrix(
    matrix: Tensor | Sequence[Sequence[Sequence[float | None]]],
    modalities: Sequence[str],
    path: str | os.PathLike,
    *,
    bands: Bands | None = None,
    title: str = "MRD of every pair of modalities, per MoE layer",
) -> Path:
    """One heatmap per MoE layer: ``D[i, j]``, the MRD of modalities ``i`` and ``j``.

    A pair with a modality absent (NaN or None) is grey and hatched; a held pair whose MRD lies
    outside its band has a red frame and a ``!`` after its value; a held pair inside its band a
    green frame.

    Args:
        matrix: ``(L, M, M)`` MRD (tensor or nested lists; NaN or None where undefined).
        modalities: the M names.
        path: output image.
        bands: ``{(i, j): (low, high)}`` by position in ``modalities``: the pairs held in a band.
    """
    return save(_matrix_figure(matrix, modalities, bands=bands, title=title), path)


def _matrix_figure(
    matrix: Tensor | Sequence[Sequence[Sequence[float | None]]],
    modalities: Sequence[str],
    *,
    bands: Bands | None,
    title: str,
) -> Figure:
    """The figure of :func:`plot_mrd_matrix`, not saved (the tests read its texts)."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    grid = matrix.tolist() if hasattr(matrix, "tolist") else matrix
    L, M = len(grid), len(modalities)
    bands = dict(bands or {})
    values = [v for layer in grid for row in layer for v in row if _finite(v)]
    vmax = max(values + [1e-6])
    cols = min(L, 4)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.6, 2.7 * rows), squeeze=False)
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("#d9d9d9")
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= L:
            ax.axis("off")
            continue
        g = [[float(v) if _finite(v) else math.nan for v in row] for row in grid[layer]]
        im = ax.imshow(g, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        for i in range(M):
            for j in range(M):
                v = g[i][j]
                if not math.isfinite(v):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                           edgecolor="#9a9a9a", lw=0))  # fmt: skip
                    continue
                band = bands.get((min(i, j), max(i, j)))
                outside = band is not None and not band[0] <= v <= band[1]
                if band is not None and i != j:
                    edge = "red" if outside else "tab:green"
                    ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, lw=2,
                                           edgecolor=edge))  # fmt: skip
                light = v < 0.55 * vmax
                label = f"{v:.2f}"
                # 1.4996 is not "1.50"
                if outside and band is not None and band[0] <= float(label) <= band[1]:
                    label = f"{v:.4f}"
                ax.text(j, i, label + ("!" if outside else ""), ha="center", va="center",
                        fontsize=7, color="black" if light else "white")  # fmt: skip
        ax.set_xticks(range(M), modalities, fontsize=7, rotation=45)
        ax.set_yticks(range(M), modalities, fontsize=7)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.025, pad=0.02, label="MRD (symmetric KL, nats)")
    fig.suptitle(title, fontsize=10, y=1.0 + 0.06 / rows)
    return fig


def plot_pair_mrd(
    pairs: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    *,
    bands: Mapping[str, tuple[float, float] | None] | None = None,
    title: str = "MRD of each pair by MoE layer",
) -> Path:
    """One panel per pair of modalities: its MRD by layer, its band shaded.

    Args:
        pairs: pair name (``"text-video"``) -> MRD per MoE layer (None or NaN where undefined).
        path: output image.
        bands: pair name -> its band, or None.
    """
    plt = pyplot()
    bands = dict(bands or {})
    n = max(1, len(pairs))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= len(pairs):
            ax.axis("off")
            continue
        name, vals = list(pairs.items())[k]
        ys = [float(v) if _finite(v) else math.nan for v in vals]
        band = bands.get(name)
        if band is not None:
            ax.axhspan(band[0], band[1], color="tab:green", alpha=0.15, label=f"band {tuple(band)}")
        ax.plot(range(len(ys)), ys, marker="o", color="tab:blue")
        mrd_scale(ax, [y for y in ys if math.isfinite(y)] + list(band or ()))
        ax.xaxis.set_major_locator(integer_ticks())
        ax.set_title(name + ("" if any(map(math.isfinite, ys)) else " (absent)"), fontsize=9)
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.set_ylabel("MRD", fontsize=8)
        ax.grid(alpha=0.3)
        if band is not None:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)
