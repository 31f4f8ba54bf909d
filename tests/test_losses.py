"""smar.losses against obviously-correct slow references (explicit loops), upstream, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import smar
from smar.losses import EPS

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# slow references: loops over layers, modalities, tokens and experts


def ref_probs(z, router="softmax"):
    L, T, E = z.shape
    out = torch.zeros(L, T, E, dtype=F64)
    for layer in range(L):
        for t in range(T):
            if router == "softmax":
                ex = [math.exp(float(z[layer, t, e])) for e in range(E)]
            else:
                ex = [1.0 / (1.0 + math.exp(-float(z[layer, t, e]))) for e in range(E)]
            s = sum(ex)
            for e in range(E):
                out[layer, t, e] = ex[e] / s
    return out


def ref_dists(z, ids, modalities, router="softmax"):
    p = ref_probs(z, router)
    L, T, E = z.shape
    ids = ids.reshape(-1).tolist()
    P = torch.full((L, len(modalities), E), float("nan"), dtype=F64)
    counts = []
    for mi, m in enumerate(modalities):
        toks = [t for t in range(T) if ids[t] == m]
        counts.append(len(toks))
        for layer in range(L):
            if toks:
                for e in range(E):
                    P[layer, mi, e] = sum(float(p[layer, t, e]) for t in toks) / len(toks)
    return P, counts


def ref_kl(p, q):
    total = 0.0
    for a, b in zip(p.tolist(), q.tolist(), strict=True):
        total += a * (math.log(max(a, EPS)) - math.log(max(b, EPS)))
    return total


def ref_mrd(z, ids, router="softmax"):
    P, counts = ref_dists(z, ids, (0, 1), router)
    out = []
    for layer in range(z.shape[0]):
        if counts[0] == 0 or counts[1] == 0:
            out.append(float("nan"))
        else:
            out.append(ref_kl(P[layer, 0], P[layer, 1]) + ref_kl(P[layer, 1], P[layer, 0]))
    return torch.tensor(out, dtype=F64)


def ref_smar(z, ids, band, hinge="linear"):
    D = ref_mrd(z, ids)
    bands = [band] * z.shape[0] if isinstance(band[0], (int, float)) else band
    hs = []
    for layer in range(z.shape[0]):
        d = float(D[layer])
        if math.isnan(d):
            continue
        lo, hi = bands[layer]
        a, b = max(0.0, lo - d), max(0.0, d - hi)
        hs.append(a + b if hinge == "linear" else a * a + b * b)
    return sum(hs) / len(hs) if hs else 0.0


def ref_lb(z, top_k, mask=None):
    p = ref_probs(z)
    L, T, E = z.shape
    m = [1.0] * T if mask is None else [float(v) for v in mask.reshape(-1)]
    n = sum(m)
    total = 0.0
    for layer in range(L):
        f = [0.0] * E
        P = [0.0] * E
        for t in range(T):
            order = sorted(range(E), key=lambda e, t=t: -float(p[layer, t, e]))[:top_k]
            for e in order:
                f[e] += m[t] / (top_k * n)
            for e in range(E):
                P[e] += m[t] * float(p[layer, t, e]) / n
        total += E * sum(f[e] * P[e] for e in range(E))
    return total / L


def ref_z(z, mask=None):
    L, T, E = z.shape
    m = [1.0] * T if mask is None else [float(v) for v in mask.reshape(-1)]
    acc = 0.0
    for layer in range(L):
        for t in range(T):
            lse = math.log(sum(math.exp(float(z[layer, t, e])) for e in range(E)))
            acc += m[t] * lse * lse
    return acc / (sum(m) * L)


def ref_limoe(z, ids, tau, lw, gw):
    p = ref_probs(z)
    L, T, E = z.shape
    ids = ids.reshape(-1).tolist()
    total = 0.0
    for layer in range(L):
        for m in (0, 1):
            toks = [t for t in range(T) if ids[t] == m]
            if not toks:
                continue
            ents = []
            for t in toks:
                ents.append(
                    -sum(float(p[layer, t, e]) * math.log(float(p[layer, t, e])) for e in range(E))
                )
            mean = [sum(float(p[layer, t, e]) for t in toks) / len(toks) for e in range(E)]
            h = -sum(q * math.log(q) for q in mean)
            total += lw * sum(ents) / len(ents) + gw * max(0.0, tau - h)
    return total / L


# ---------------------------------------------------------------------------------------------
# inputs


def make(L=3, B=2, S=7, E=5, seed=0, scale=2.0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(L, B * S, E, generator=g, dtype=F64) * scale
    ids = torch.randint(0, 2, (B, S), generator=g)
    ids[0, 0], ids[0, 1] = 0, 1  # both modalities present
    if ignore:
        ids[1, -2:] = -1
    return z, ids


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_routing_probs_matches_reference(router):
    z, _ = make()
    torch.testing.assert_close(smar.routing_probs(z, router=router), ref_probs(z, router))
    # a list of (T, E) tensors is the same input as one (L, T, E) tensor
    torch.testing.assert_close(smar.routing_probs(list(z), router=router), ref_probs(z, router))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape", ["BS", "T"])
def test_modality_distributions_matches_reference(router, shape):
    z, ids = make()
    ids_in = ids if shape == "BS" else ids.reshape(-1)
    P, counts = smar.modality_distributions(z, ids_in, modalities=(1, 0), router=router)
    Pr, cr = ref_dists(z, ids, (1, 0), router)
    torch.testing.assert_close(P, Pr)
    assert counts.tolist() == cr


def test_modality_distributions_absent_modality_is_nan_with_zero_count():
    z, ids = make()
    P, counts = smar.modality_distributions(z, ids, modalities=(0, 1, 2))
    assert counts[2] == 0 and torch.isnan(P[:, 2]).all() and torch.isfinite(P[:, :2]).all()


@pytest.mark.parametrize("seed", range(4))
def test_mrd_matches_reference(seed):
    z, ids = make(seed=seed)
    torch.testing.assert_close(smar.mrd(z, ids), ref_mrd(z, ids))
    torch.testing.assert_close(smar.mrd(z, ids, router="sigmoid"), ref_mrd(z, ids, "sigmoid"))


def test_mrd_several_image_modalities_keep_text_as_anchor():
    z, ids = make()
    ids = ids.clone()
    ids[1, :3] = 2
    D = smar.mrd(z, ids, image=(1, 2))
    assert D.shape == (z.shape[0], 2)
    torch.testing.assert_close(D[:, 0], smar.mrd(z, ids, image=1))
    torch.testing.assert_close(D[:, 1], smar.mrd(z, ids, image=2))


@pytest.mark.parametrize("hinge", ["linear", "squared"])
@pytest.mark.parametrize("band", [(1.5, 2.0), (0.0, 0.0), (0.2, 0.2), (3.0, 4.0)])
@pytest.mark.parametrize("seed", range(3))
def test_smar_loss_matches_reference(hinge, band, seed):
    z, ids = make(seed=seed)
    got = smar.smar_loss(z, ids, band=band, hinge=hinge)
    assert got.item() == pytest.approx(ref_smar(z, ids, band, hinge), rel=1e-9, abs=1e-12)


def test_smar_loss_per_layer_band():
    z, ids = make(L=3)
    band = [(0.0, 0.1), (1.5, 2.0), (5.0, 6.0)]
    got = smar.smar_loss(z, ids, band=band)
    assert got.item() == pytest.approx(ref_smar(z, ids, band))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k", [1, 2, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_reference(seed, top_k, masked):
    z, ids = make(seed=seed)
    mask = (ids >= 0) if masked else None
    got = smar.load_balancing_loss(z, top_k=top_k, mask=mask)
    assert got.item() == pytest.approx(ref_lb(z, top_k, mask), rel=1e-9)


def test_load_balancing_is_one_when_balanced():
    # every token uniform over experts; top-k slots spread evenly by construction
    E, K = 4, 2
    z = torch.zeros(1, 8, E)
    z[0, torch.arange(8), torch.arange(8) % E] = 1e-6  # break ties evenly
    assert smar.load_balancing_loss(z, top_k=K).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_matches_reference(masked):
    z, ids = make()
    mask = (ids >= 0) if masked else None
    assert smar.z_loss(z, mask=mask).item() == pytest.approx(ref_z(z, mask), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_limoe_matches_reference(seed):
    z, ids = make(seed=seed)
    got = smar.limoe_loss(z, ids, tau=1.2, local_weight=0.3, global_weight=2.0)
    assert got.item() == pytest.approx(ref_limoe(z, ids, 1.2, 0.3, 2.0), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# transformers' load_balancing_loss_func


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_hf_variant_equals_transformers(masked, top_k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(top_k)
    L, B, S, E = 4, 3, 11, 8
    layers = tuple(torch.randn(B * S, E, dtype=torch.float32) for _ in range(L))
    mask = None
    if masked:
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, -4:] = 0
        mask[2, :2] = 0
    want = mixtral.load_balancing_loss_func(layers, E, top_k, mask)
    got = smar.load_balancing_loss(layers, top_k=top_k, mask=mask, variant="hf")
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# properties

logit_arrays = st.integers(0, 10_000)


@settings(max_examples=40, deadline=None)
@given(seed=logit_arrays, scale=st.floats(0.01, 5.0))
def test_mrd_nonnegative_and_symmetric(seed, scale):
    z, ids = make(seed=seed, scale=scale)
    D = smar.mrd(z, ids)
    assert (D >= 0).all()
    swapped = torch.where(ids >= 0, 1 - ids, ids)
    torch.testing.assert_close(smar.mrd(z, swapped), D)


def test_mrd_zero_when_modalities_route_identically():
    g = torch.Generator().manual_seed(1)
    layer = torch.randn(6, 5, generator=g)
    z = torch.cat([layer, layer])[None]  # tokens 0..5 text, 6..11 image, same logits
    ids = torch.tensor([0] * 6 + [1] * 6)
    assert smar.mrd(z, ids).abs().max() < 1e-12
    assert smar.smar_loss(z, ids, band=(0.0, 0.0)).item() == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=logit_arrays)
def test_ignored_tokens_change_nothing(seed):
    z, ids = make(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    z2 = z.clone()
    ignored = ids.reshape(-1) == -1
    z2[:, ignored] = (
        torch.randn(z.shape[0], int(ignored.sum()), z.shape[2], generator=g, dtype=F64) * 10
    )
    for fn in (smar.mrd, lambda a, b: smar.smar_loss(a, b, band=(0.5, 0.7))):
        torch.testing.assert_close(fn(z, ids), fn(z2, ids))
    mask = ids >= 0
    torch.testing.assert_close(
        smar.load_balancing_loss(z, top_k=2, mask=mask),
        smar.load_balancing_loss(z2, top_k=2, mask=mask),
    )
    torch.testing.assert_close(smar.z_loss(z, mask=mask), smar.z_loss(z2, mask=mask))
    torch.testing.assert_close(smar.limoe_loss(z, ids, tau=1.0), smar.limoe_loss(z2, ids, tau=1.0))


@settings(max_examples=25, deadline=None)
@given(seed=logit_arrays)
def test_permuting_tokens_changes_nothing(seed):
    z, ids = make(seed=seed)
    perm = torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(seed))
    zp, idp = z[:, perm], ids.reshape(-1)[perm]
    mask, maskp = ids.reshape(-1) >= 0, idp >= 0
    pairs = [
        (smar.mrd(z, ids), smar.mrd(zp, idp)),
        (smar.smar_loss(z, ids), smar.smar_loss(zp, idp)),
        (
            smar.load_balancing_loss(z, top_k=2, mask=mask),
            smar.load_balancing_loss(zp, top_k=2, mask=maskp),
        ),
        (smar.z_loss(z, mask=mask), smar.z_loss(zp, mask=maskp)),
        (smar.limoe_loss(z, ids, tau=1.0), smar.limoe_loss(zp, idp, tau=1.0)),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("hinge", ["linear", "squared"])
@pytest.mark.parametrize("side", ["below", "above"])
def test_band_gradient_moves_mrd_toward_band(hinge, side):
    z, ids = make(seed=3, scale=1.0)
    d0 = smar.mrd(z, ids)
    band = (
        (float(d0.max()) + 0.5, float(d0.max()) + 1.0)
        if side == "below"
        else (0.0, float(d0.min()) / 2)
    )
    z = z.clone().requires_grad_(True)
    smar.smar_loss(z, ids, band=band, hinge=hinge).backward()
    with torch.no_grad():
        d1 = smar.mrd(z - 1e-3 * z.grad / z.grad.norm(), ids)
    if side == "below":
        assert (d1 > d0).all()
    else:
        assert (d1 < d0).all()


def test_smar_loss_zero_inside_band_with_zero_gradient():
    z, ids = make(seed=2)
    d = smar.mrd(z, ids)
    z = z.clone().requires_grad_(True)
    loss = smar.smar_loss(z, ids, band=(float(d.min()) - 0.1, float(d.max()) + 0.1))
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().max() == 0.0


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, ids: smar.smar_loss(z, ids, band=(5.0, 6.0)),
        lambda z, ids: smar.load_balancing_loss(z, top_k=2),
        lambda z, ids: smar.load_balancing_loss(z, top_k=2, variant="hf"),
        lambda z, ids: smar.z_loss(z),
        lambda z, ids: smar.limoe_loss(z, ids, tau=1.5),
        lambda z, ids: smar.mrd(z, ids).sum(),
    ],
)
def test_gradients_reach_every_layer(fn):
    z, ids = make()
    layers = [layer.clone().requires_grad_(True) for layer in z]
    fn(layers, ids).backward()
    for layer in layers:
        assert (
            layer.grad is not None
            and layer.grad.abs().sum() > 0
            and torch.isfinite(layer.grad).all()
        )


def test_no_image_tokens_smar_loss_zero_connected_and_mrd_nan():
    z, _ = make()
    ids = torch.zeros(z.shape[1], dtype=torch.long)
    z = z.clone().requires_grad_(True)
    loss = smar.smar_loss(z, ids)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert z.grad is not None and (z.grad == 0).all()
    assert torch.isnan(smar.mrd(z, ids)).all()


def test_hard_routing_neg_inf_logits_are_allowed():
    z, ids = make(E=4)
    z = z.clone()
    flat = ids.reshape(-1)
    z[:, flat == 0, 2:] = float("-inf")  # text on experts 0-1, image on 2-3
    z[:, flat == 1, :2] = float("-inf")
    D = smar.mrd(z, ids)
    assert torch.isfinite(D).all() and (D > 30).all()  # disjoint supports: D is ~ log(1/EPS)
    for v in (
        smar.load_balancing_loss(z, top_k=2),
        smar.z_loss(z),
        smar.limoe_loss(z, ids, tau=0.5),
    ):
        assert torch.isfinite(v)


def test_half_precision_logits_are_upcast():
    z, ids = make()
    got = smar.smar_loss(z.to(torch.bfloat16), ids)
    assert got.dtype == torch.float32 and torch.isfinite(got)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda z, ids: smar.mrd(z, ids[:, :-1]), "modality_ids"),
        (lambda z, ids: smar.mrd(z[0], ids), "router_logits"),
        (lambda z, ids: smar.mrd([z[0], z[1, :-1]], ids), r"router_logits\[1\]"),
        (lambda z, ids: smar.mrd(z.long(), ids), "floating point"),
        (lambda z, ids: smar.mrd(z, ids.float()), "modality_ids"),
        (lambda z, ids: smar.mrd(z, ids.bool()), "modality_ids"),
        (lambda z, ids: smar.smar_loss(z, ids, band=(2.0, 1.0)), "low <= high"),
        (lambda z, ids: smar.smar_loss(z, ids, band=(-1.0, 1.0)), "non-negative"),
        (lambda z, ids: smar.smar_loss(z, ids, band=[(0, 1)] * 2), "band"),
        (lambda z, ids: smar.smar_loss(z, ids, band=(0, float("nan"))), "band"),
        (lambda z, ids: smar.smar_loss(z, ids, hinge="cubic"), "hinge"),
        (lambda z, ids: smar.load_balancing_loss(z, top_k=6), "top_k"),
        (lambda z, ids: smar.load_balancing_loss(z, top_k=0), "top_k"),
        (lambda z, ids: smar.load_balancing_loss(z, top_k=2, mask=ids[:1]), "mask"),
        (lambda z, ids: smar.load_balancing_loss(z, top_k=2, mask=ids < -5), "no token"),
        (lambda z, ids: smar.load_balancing_loss(z, top_k=2, variant="x"), "variant"),
        (lambda z, ids: smar.routing_probs(z, router="relu"), "router"),
        (lambda z, ids: smar.limoe_loss(z, ids, tau=100.0), "tau"),
        (lambda z, ids: smar.mrd([], ids), "empty"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    z, ids = make()
    with pytest.raises(ValueError, match=match):
        call(z, ids)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "fn",
    [
        lambda z, ids: smar.mrd(z, ids),
        lambda z, ids: smar.smar_loss(z, ids),
        lambda z, ids: smar.load_balancing_loss(z, top_k=2),
        lambda z, ids: smar.z_loss(z),
        lambda z, ids: smar.limoe_loss(z, ids, tau=1.0),
        lambda z, ids: smar.routing_probs(z),
    ],
)
def test_nan_or_inf_logits_raise(bad, fn):
    z, ids = make()
    z[1, 3, 2] = bad
    with pytest.raises(ValueError, match="router_logits"):
        fn(z, ids)


def test_token_with_all_experts_masked_raises():
    z, ids = make()
    z[0, 0, :] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        smar.mrd(z, ids)


def test_routing_objective_is_the_weighted_sum_of_the_functions():
    z, ids = make(seed=5)
    mask = ids >= 0
    total, terms = smar.routing_objective(
        z,
        ids,
        top_k=2,
        smar_weight=0.5,
        band=(2.0, 3.0),
        lb_weight=0.01,
        z_weight=1e-3,
        limoe_weight=0.1,
        limoe_tau=1.0,
    )
    want = {
        "band": smar.smar_loss(z, ids, band=(2.0, 3.0)),
        "lb": smar.load_balancing_loss(z, top_k=2, mask=mask),
        "z": smar.z_loss(z, mask=mask),
        "limoe": smar.limoe_loss(z, ids, tau=1.0),
    }
    for k, v in want.items():
        torch.testing.assert_close(terms[k], v)
    torch.testing.assert_close(terms["mrd"], smar.mrd(z, ids))
    weighted = 0.5 * want["band"] + 0.01 * want["lb"] + 1e-3 * want["z"] + 0.1 * want["limoe"]
    torch.testing.assert_close(total, weighted)
    only_lb, t = smar.routing_objective(z, top_k=2)
    assert set(t) == {"lb"} and torch.allclose(only_lb, 0.01 * smar.load_balancing_loss(z, top_k=2))
    with pytest.raises(ValueError, match="modality_ids"):
        smar.routing_objective(z, top_k=2, smar_weight=1.0)


def test_routing_objective_sigmoid_router_matches_the_functions():
    torch.manual_seed(0)
    logits = torch.randn(2, 40, 6)
    ids = torch.randint(-1, 2, (40,))
    total, terms = smar.routing_objective(
        logits, ids, top_k=2, smar_weight=1.0, lb_weight=0.1, limoe_weight=0.2, router="sigmoid"
    )
    band = smar.smar_loss(logits, ids, router="sigmoid")
    lb = smar.load_balancing_loss(logits, top_k=2, mask=ids >= 0, router="sigmoid")
    tau = math.log(6) / 2
    limoe = smar.limoe_loss(logits, ids, tau=tau, router="sigmoid")
    torch.testing.assert_close(total, band + 0.1 * lb + 0.2 * limoe)
    torch.testing.assert_close(terms["mrd"], smar.mrd(logits, ids, router="sigmoid"))
