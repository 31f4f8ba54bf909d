"""RoutingStats against slow references and its streaming/merge invariants."""

from __future__ import annotations

import math

import pytest
import torch

import smar
from smar import RoutingStats


def batch(seed, L=2, T=40, E=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(L, T, E, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(-1, 2, (T,), generator=g)
    ids[:2] = torch.tensor([0, 1])
    return z, ids


def test_streaming_equals_one_big_batch_and_losses():
    parts = [batch(s) for s in range(3)]
    stats = RoutingStats()
    for z, ids in parts:
        stats.update(z, ids, top_k=2)
    z = torch.cat([p[0] for p in parts], dim=1)
    ids = torch.cat([p[1] for p in parts])
    P, counts = smar.modality_distributions(z, ids)
    torch.testing.assert_close(stats.distributions(), P)
    torch.testing.assert_close(stats.mrd(), smar.mrd(z, ids))
    assert stats.tokens.tolist() == counts.tolist()
    s = stats.summary()
    for layer in range(2):
        assert s[f"routing/layer{layer:02d}/mrd"] == pytest.approx(float(smar.mrd(z, ids)[layer]))


def test_load_share_imbalance_entropy_match_loops():
    z, ids = batch(7, L=1, T=30, E=3)
    s = RoutingStats().update(z, ids, top_k=1).summary()
    p = torch.softmax(z[0], -1)
    top1 = p.argmax(-1)
    for m, name in ((0, "text"), (1, "image")):
        toks = [t for t in range(30) if ids[t] == m]
        for e in range(3):
            want = sum(1 for t in toks if top1[t] == e) / len(toks)
            assert s[f"routing/layer00/load/{name}/expert{e:02d}"] == pytest.approx(want)
            slots = [t for t in range(30) if ids[t] >= 0 and top1[t] == e]
            share = sum(1 for t in slots if ids[t] == m) / max(1, len(slots))
            assert s[f"routing/layer00/share/{name}/expert{e:02d}"] == pytest.approx(share)
        ent = sum(-sum(float(q) * math.log(float(q)) for q in p[t]) for t in toks) / len(toks)
        assert s[f"routing/layer00/entropy/{name}"] == pytest.approx(ent / math.log(3))
    valid = [t for t in range(30) if ids[t] >= 0]
    loads = [sum(1 for t in valid if top1[t] == e) / len(valid) for e in range(3)]
    assert s["routing/layer00/imbalance"] == pytest.approx(max(loads) * 3)


def test_merge_equals_sequential_update():
    a, b = RoutingStats(), RoutingStats()
    a.update(*batch(1), top_k=2)
    b.update(*batch(2), top_k=2)
    both = RoutingStats().update(*batch(1), top_k=2).update(*batch(2), top_k=2)
    merged = RoutingStats().merge(a).merge(b)
    assert merged.summary() == pytest.approx(both.summary(), nan_ok=True)


def test_memory_does_not_grow_with_tokens():
    stats = RoutingStats()
    for s in range(5):
        stats.update(*batch(s, T=200), top_k=2)
    assert stats.prob_sum.shape == (2, 2, 4) and stats.tokens.shape == (2,)


def test_unseen_modality_gives_nan_mrd_not_zero():
    z, _ = batch(0)
    s = RoutingStats().update(z, torch.zeros(40, dtype=torch.long), top_k=2).summary()
    assert math.isnan(s["routing/layer00/mrd"])


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        RoutingStats().summary()
    stats = RoutingStats().update(*batch(0), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        stats.update(*batch(1), top_k=3)
    with pytest.raises(ValueError, match="E="):
        stats.update(*batch(1, E=5), top_k=2)
