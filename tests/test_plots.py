"""The plots of ``smar analyze``, checked on the figure objects rather than on pixels: the
composition heatmap tells experts without tokens apart from single-modality ones, and the MRD
axis has several readable tick labels whatever the range of its values."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402

from smar import plots  # noqa: E402


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def _composition_share():
    """(L=2, M=2, E=4): expert 0 text only, 1 image only, 2 mixed, 3 no tokens (zeros in layer 0,
    NaN in layer 1: both ways a caller may write an empty expert)."""
    nan = float("nan")
    return [
        [[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.5, 0.0]],
        [[0.95, 0.02, 0.4, nan], [0.05, 0.98, 0.6, nan]],
    ]


def test_composition_marks_experts_without_tokens_apart():
    fig = plots._composition_figure(
        _composition_share(), ["text", "image"], threshold=0.9, title="t"
    )
    try:
        ax = fig.axes[0]
        im = ax.images[0]
        rgba = im.to_rgba(im.get_array())  # (L, E, 4) as drawn, the "bad" colour where masked
        for layer in range(2):
            empty, text_only, image_only = (tuple(rgba[layer][e]) for e in (3, 0, 1))
            assert empty != text_only and empty != image_only
            assert empty == pytest.approx(to_rgba(plots._NO_TOKENS))
        legend = fig.legends[0]
        labels = [t.get_text() for t in legend.get_texts()]
        assert "no tokens" in labels
        assert any(lab.startswith("text") for lab in labels)
        assert any(lab.startswith("image") for lab in labels)
        # The empty cells are hatched too (told apart without colour vision).
        hatched = [c for c in ax.collections if c.get_hatch()]
        assert hatched and len(hatched[0].get_paths()) == 2
    finally:
        _close(fig)


def test_composition_markers_stand_out_on_both_ends_of_the_map():
    fig = plots._composition_figure(
        _composition_share(), ["text", "image"], threshold=0.9, title="t"
    )
    try:
        ax = fig.axes[0]
        marks = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
        # Text-only in both layers, image-only in both layers, nothing on mixed or empty experts.
        assert sorted(marks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert {marks[(0, 0)].get_text(), marks[(0, 1)].get_text()} == {"T", "I"}
        for t in marks.values():
            # White fill with a dark outline: readable on the dark blue and the dark red alike.
            assert to_rgba(t.get_color()) == (1.0, 1.0, 1.0, 1.0)
            assert t.get_path_effects() and t.get_fontsize() >= 7
    finally:
        _close(fig)


def test_plot_expert_composition_writes_an_image(tmp_path):
    out = plots.plot_expert_composition(_composition_share(), ["text", "image"], tmp_path / "c.png")
    assert out.exists() and out.stat().st_size > 1000


def _labelled_ticks(fig) -> list[str]:
    """The y tick labels inside the view, as drawn."""
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_ylim())
    ticks = zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
    return [lab.get_text() for v, lab in ticks if lo <= v <= hi and lab.get_text()]


@pytest.mark.parametrize(
    "values, band",
    [
        ([0.5, 1.2, 2.9, 0.7], (1.5, 2.0)),  # less than a decade: one label (10^0) on a log axis
        ([0.5, 1.2, 2.9, 0.7], None),
        ([0.002, 0.05, 3.0, 40.0], (1.5, 2.0)),  # four decades
        ([0.0, 0.003, 0.08, 0.2], None),  # a zero and 1.8 decades
        ([1.0, 1.0, 1.0], None),  # flat
        ([float("nan"), 0.7, 0.9], None),
    ],
)
def test_mrd_axis_has_several_plain_labels(values, band):
    fig = plots._mrd_figure({"arm": values}, band=band, title="t")
    try:
        labels = _labelled_ticks(fig)
        assert len(labels) >= 3, labels
        # Plain numbers, no 10^k mathtext.
        assert all("$" not in lab and "^" not in lab for lab in labels), labels
        for lab in labels:
            float(lab.replace("\u2212", "-"))
    finally:
        _close(fig)


def test_mrd_scale_follows_the_data():
    narrow = plots._mrd_figure({"a": [0.5, 2.9]}, band=(1.5, 2.0), title="t")
    wide = plots._mrd_figure({"a": [0.001, 0.0, 5.0]}, band=(1.5, 2.0), title="t")
    try:
        assert narrow.axes[0].get_yscale() == "linear"
        assert wide.axes[0].get_yscale() == "symlog"
    finally:
        _close(narrow)
        _close(wide)


def test_mrd_history_axis_has_several_labels():
    hist = [{"step": s, "mrd": [0.6 + s / 100, 1.0 + s / 50]} for s in range(0, 101, 25)]
    hist.append({"step": 125, "mrd": [None, 2.5]})
    fig = plots._mrd_history_figure(hist, band=(1.5, 2.0), title="t")
    try:
        assert len(_labelled_ticks(fig)) >= 3
    finally:
        _close(fig)


def test_mrd_plots_write_images(tmp_path):
    a = plots.plot_mrd({"a": [0.5, 2.9]}, tmp_path / "m.png")
    b = plots.plot_mrd_history([{"step": 0, "mrd": [0.1, math.nan]}], tmp_path / "h.png")
    assert a.exists() and b.exists()
