"""What smar analyze shows of more than two modalities: the MRD matrix of the statistics, the
pairs in routing.json, the matrix heatmaps and the report's section."""

import math

import pytest
import torch

import smar
from smar.analyze import Source, analyze, routing_record, write_analysis
from smar.metrics import RoutingStats

pytest.importorskip("matplotlib")
L, T, E = 2, 200, 4


def routed(seed=0, audio=True):
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        z = torch.randn(L, T, E, generator=g) * 2
        ids = torch.randint(-1, 4 if audio else 3, (T,), generator=g)
        yield list(z.unbind(0)), ids


def test_stats_mrd_matrix_equals_the_loss_functions_matrix():
    batches = list(routed())
    stats = RoutingStats((0, 1, 2, 3))
    for z, ids in batches:
        stats.update(z, ids, top_k=2)
    z = torch.cat([torch.stack(b[0]) for b in batches], dim=1)  # (L, 3T, E)
    ids = torch.cat([b[1] for b in batches])
    want = smar.mrd_matrix(z.double(), ids)
    torch.testing.assert_close(stats.mrd_matrix(), want, rtol=1e-5, atol=1e-8)  # float32 probs
    no_audio = RoutingStats((0, 1, 2, 3)).update(*next(routed(audio=False)), top_k=2)
    D = no_audio.mrd_matrix()
    assert torch.isnan(D[:, 3]).all() and torch.isfinite(D[:, :3, :3]).all()


def test_routing_record_report_and_matrix_marks(tmp_path):
    bands = {(0, 1): (1.5, 2.0), (0, 2): (0.0, 0.01), (1, 2): (0.0, 10.0)}
    src = Source("omni", lambda: routed(audio=False), top_k=2, modalities=(0, 1, 2, 3),
                 pairs=bands)  # fmt: skip
    a = analyze(src, progress=False)
    record = routing_record(a)
    assert [p["pair"] for p in record["pairs"]] == ["text-image", "text-video", "image-video"]
    assert record["modality_ids"] == [0, 1, 2, 3] and len(record["mrd_matrix"]) == L
    assert record["mrd_matrix"][0][0][3] is None  # no audio: null in strict JSON
    D = a.stats.mrd_matrix()
    for p in record["pairs"]:
        i, j = p["ids"]
        assert p["mrd"] == pytest.approx(D[:, i, j].tolist())
    outside = sum(not b[0] <= D[layer, i, j] <= b[1] for (i, j), b in bands.items()
                  for layer in range(L))  # fmt: skip
    assert outside >= 1  # the narrow text-video band: the marks below can be checked
    from smar.pair_plots import _matrix_figure

    fig = _matrix_figure(D, ["text", "image", "video", "audio"], bands=bands, title="t")
    marks = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().endswith("!")]
    assert len(marks) == 2 * outside  # each pair twice: D is symmetric
    paths = write_analysis([a], tmp_path)
    html = paths["html"].read_text()
    assert paths["matrix_omni"].exists() and paths["pairs_omni"].exists()
    assert "Pairs of modalities" in html and "layers outside" in html


def test_two_modalities_keep_the_report_as_it_was(tmp_path):
    src = Source("two", lambda: ((z, ids.clamp(max=1)) for z, ids in routed()), top_k=2)
    record = routing_record(analyze(src, progress=False))
    assert "pairs" not in record and not math.isnan(record["mrd"][0])
    paths = write_analysis([analyze(src, progress=False)], tmp_path)
    assert "Pairs of modalities" not in paths["html"].read_text()
