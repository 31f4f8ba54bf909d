"""Numerics of the losses with sigmoid routers: finite for any finite logits (the normalisation
runs in log space), in every dtype, down to -1e4; and the same values as the direct formula where
that formula is stable."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import smar

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def routing(draw):
    L = draw(st.integers(1, 3))
    T = draw(st.integers(2, 24))
    E = draw(st.integers(2, 16))
    K = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2**31 - 1))
    low = draw(st.sampled_from([-1e4, -1e3, -200.0, -105.0, -30.0, -1.0]))
    high = draw(st.sampled_from([low + 1.0, -50.0, 0.0, 30.0, 1e3]).filter(lambda h: h > low))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    g = torch.Generator().manual_seed(seed)
    z = low + (high - low) * torch.rand(L, T, E, generator=g)  # (L, T, E)
    ids = torch.randint(-1, 2, (T,), generator=g)
    ids[0], ids[1] = 0, 1  # both modalities present
    return z.to(DTYPES[dtype]), ids, K


@settings(max_examples=200, deadline=None)
@given(case=routing())
def test_sigmoid_losses_are_finite_for_any_finite_logits(case):
    z, ids, K = case
    z = z.clone().requires_grad_(True)
    total, terms = smar.routing_objective(
        z, ids, top_k=K, smar_weight=1.0, lb_weight=0.01, z_weight=1e-3, router="sigmoid"
    )
    assert torch.isfinite(total)
    for name, value in terms.items():
        assert torch.isfinite(value).all(), name
    total.backward()
    assert torch.isfinite(z.grad).all()
    P, counts = smar.modality_distributions(z, ids, router="sigmoid")
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))


def test_sigmoid_normalisation_equals_the_direct_formula_where_it_is_stable():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 50, 8, generator=g, dtype=torch.float64) * 4
    s = torch.sigmoid(z)
    torch.testing.assert_close(smar.routing_probs(z, router="sigmoid"), s / s.sum(-1, keepdim=True))


def test_every_logit_below_float32_sigmoid_underflow():
    """sigmoid(-104) underflows to 0 in float32: the direct formula gives 0/0 there."""
    z = torch.full((1, 4, 6), -150.0)
    z[0, :, 2] = -149.0  # the largest logit still wins
    probs = smar.routing_probs(z, router="sigmoid")
    assert torch.isfinite(probs).all()
    expected = torch.softmax(torch.nn.functional.logsigmoid(z.double()), -1).float()
    torch.testing.assert_close(probs, expected)
    assert probs[0, 0, 2] > probs[0, 0, 0]
    assert math.isclose(float(probs[0, 0].sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_the_documented_error(bad):
    z = torch.zeros(1, 4, 3)
    z[0, 1, 1] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        smar.routing_objective(z, torch.tensor([0, 1, 0, 1]), top_k=1, smar_weight=1.0,
                               router="sigmoid")  # fmt: skip


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E", [(64, 8), (2048, 80)])  # below and above the per-layer top-k size
def test_per_layer_logits_give_what_stacked_logits_give(router, T, E):
    # logits handed over per layer are processed layer by layer; one stacked tensor whole: the
    # losses, the MRD and the gradients agree
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(T, E, generator=g) * 2 for _ in range(3)]
    ids = torch.randint(-1, 2, (T,), generator=g)
    mask = torch.rand(T, generator=g) > 0.2
    results = []
    for stacked in (False, True):
        z = [x.clone().requires_grad_(True) for x in layers]
        inp = torch.stack(z) if stacked else z
        total, terms = smar.routing_objective(
            inp, ids, top_k=2, mask=mask, smar_weight=1.0, lb_weight=0.1, router=router
        )
        total.backward()
        results.append((total.detach(), terms["mrd"], terms["lb"].detach(), [x.grad for x in z]))
    (t1, m1, lb1, g1), (t2, m2, lb2, g2) = results
    assert torch.allclose(t1, t2, atol=1e-6) and torch.allclose(lb1, lb2, atol=1e-6)
    assert torch.allclose(m1, m2, atol=1e-6, equal_nan=True)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_sqrtsoftplus_probabilities_equal_the_normalised_scores_of_deepseek_v4():
    z = torch.randn(3, 50, 8, dtype=torch.float64) * 5
    z[0, 0] = -200.0  # softplus underflows: still a distribution, no NaN
    score = torch.nn.functional.softplus(z).sqrt()
    want = score / score.sum(-1, keepdim=True)
    got = smar.routing_probs(z, router="sqrtsoftplus")
    torch.testing.assert_close(got[:, 1:], want[:, 1:])
    assert torch.isfinite(got).all() and torch.allclose(
        got.sum(-1), torch.ones(3, 50, dtype=z.dtype)
    )
