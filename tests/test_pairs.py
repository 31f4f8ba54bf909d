"""More than two modalities: the pairs held in a band, the MRD matrix and the pair band loss,
against a by-hand computation, and their exact reduction to the two-modality loss."""

import itertools

import pytest
import torch

import smar
from smar.losses import mrd_matrix, routing_objective, smar_loss
from smar.pairs import pair_name, resolve_pairs

L, T, E = 3, 120, 6


def _routing(seed=0, mods=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, T, E, generator=g, requires_grad=True)
    ids = torch.randint(-1, mods, (T,), generator=g)
    return logits, ids


def _by_hand_D(logits, ids, i, j):
    """The Jeffreys divergence of modalities i and j per layer, token by token in float64."""
    p = torch.softmax(logits.detach().double(), dim=-1)  # (L, T, E)
    out = []
    for layer in range(L):
        Pi = sum(p[layer, t] for t in range(T) if ids[t] == i) / int((ids == i).sum())
        Pj = sum(p[layer, t] for t in range(T) if ids[t] == j) / int((ids == j).sum())
        Pi, Pj = Pi.clamp_min(1e-9), Pj.clamp_min(1e-9)
        out.append(float(((Pi - Pj) * (Pi.log() - Pj.log())).sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_resolve_pairs_text_all_and_lists():
    assert resolve_pairs(None, modalities=(0, 1)) == ((0, 1),)
    assert resolve_pairs("text", modalities=(0, 1, 2, 3)) == ((0, 1), (0, 2), (0, 3))
    assert resolve_pairs("all", modalities=(0, 1, 2)) == ((0, 1), (0, 2), (1, 2))
    # text-anchored pairs are written text first, whatever order they were given in
    assert resolve_pairs([(2, 1), (3, 0)], modalities=(0, 1, 2, 3)) == ((0, 3), (1, 2))
    assert pair_name((0, 2)) == "text-video" and pair_name((1, 5)) == "image-m5"


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([(1, 1)], "two distinct ids"),
        ([(0, 1), (1, 0)], "names a pair twice"),
        ("every", "pairs must be 'text', 'all'"),
        ([], "pairs must be 'text', 'all'"),
        ([(0, -2)], "two distinct ids"),
    ],
)
def test_resolve_pairs_refuses_bad_pairs_in_one_line(pairs, message):
    with pytest.raises(smar.UsageError, match=message) as e:
        resolve_pairs(pairs, modalities=(0, 1, 2))
    assert "\n" not in str(e.value)


def test_mrd_matrix_is_symmetric_with_zero_diagonal_and_matches_mrd():
    logits, ids = _routing()
    D = mrd_matrix(logits, ids)  # (L, 4, 4)
    assert D.shape == (L, 4, 4)
    assert torch.equal(D, D.transpose(1, 2))
    assert torch.equal(torch.diagonal(D, dim1=1, dim2=2), torch.zeros(L, 4))
    for m in (1, 2, 3):
        torch.testing.assert_close(D[:, 0, m], smar.mrd(logits, ids, image=m), rtol=1e-6, atol=0)
    for i, j in itertools.combinations(range(4), 2):
        torch.testing.assert_close(D[:, i, j].double(), _by_hand_D(logits, ids, i, j), rtol=1e-5,
                                   atol=1e-7)  # fmt: skip


def test_mrd_matrix_is_nan_in_the_rows_and_columns_of_an_absent_modality():
    logits, ids = _routing()
    ids[ids == 3] = 2  # no audio
    D = mrd_matrix(logits, ids)
    assert torch.isnan(D[:, 3, :]).all() and torch.isnan(D[:, :, 3]).all()
    assert torch.isfinite(D[:, :3, :3]).all()


def test_pair_band_loss_equals_a_by_hand_mean_of_hinges_with_pair_bands():
    logits, ids = _routing(seed=1)
    bands = {(0, 1): (1.5, 2.0), (0, 2): (1.5, 2.0), (0, 3): (1.5, 2.0), (1, 2): (0.0, 0.5),
             (1, 3): (1.5, 2.0), (2, 3): (1.5, 2.0)}  # fmt: skip
    got = smar_loss(logits, ids, image=(1, 2, 3), pairs="all", band=(1.5, 2.0),
                    pair_bands={(2, 1): (0.0, 0.5)})  # fmt: skip
    hinges = []
    for (i, j), (lo, hi) in bands.items():
        D = _by_hand_D(logits, ids, i, j)
        hinges += [max(0.0, lo - d) + max(0.0, d - hi) for d in D.tolist()]
    assert got.item() == pytest.approx(sum(hinges) / len(hinges), rel=1e-5)


def test_absent_pairs_leave_the_loss_and_none_present_gives_a_connected_zero():
    logits, ids = _routing(seed=2)
    with_audio = smar_loss(logits, ids, image=(1, 2, 3))
    ids_no_audio = ids.clone()
    ids_no_audio[ids == 3] = -1
    no_audio = smar_loss(logits, ids_no_audio, image=(1, 2, 3))
    only_12 = smar_loss(logits, ids_no_audio, image=(1, 2))
    torch.testing.assert_close(no_audio, only_12, rtol=1e-6, atol=0)
    assert not torch.equal(with_audio, no_audio)
    only_text = torch.where(ids > 0, torch.zeros_like(ids), ids)  # text and ignored only
    zero = smar_loss(logits, only_text, image=(1, 2, 3))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_with_text_and_image_only_the_n_modality_objective_is_bit_identical():
    """ids in {0, 1}: text against image, video and audio gives the two-modality loss, MRD and
    gradients exactly (the absent pairs add exact zeros)."""
    logits, ids = _routing(seed=3, mods=2)
    out = {}
    for image in (1, (1, 2, 3)):
        z = logits.detach().clone().requires_grad_(True)
        total, terms = routing_objective(list(z.unbind(0)), ids, top_k=2, smar_weight=1.0,
                                         image=image, lb_weight=0.01)  # fmt: skip
        total.backward()
        out[image] = (total.detach(), terms["band"], terms["mrd"], z.grad)
    two, many = out[1], out[(1, 2, 3)]
    assert many[2].shape == (L, 3) and torch.isnan(many[2][:, 1:]).all()
    assert torch.equal(two[0], many[0]) and torch.equal(two[1], many[1])
    assert torch.equal(two[2], many[2][:, 0]) and torch.equal(two[3], many[3])


def test_pair_bands_must_name_held_pairs():
    logits, ids = _routing()
    with pytest.raises(smar.UsageError, match=r"pair_bands names \[\(1, 2\)\].*fix: add it"):
        smar_loss(logits, ids, image=(1, 2), pair_bands={(1, 2): (0, 0.5)})
    with pytest.raises(smar.UsageError, match="low <= high"):
        smar_loss(logits, ids, image=(1, 2), pairs="all", pair_bands={(1, 2): (1.0, 0.5)})


def test_carried_sums_hold_an_absent_modality_at_its_last_routing():
    """Sample-level ids at a small text share: batch 2 has no text. With carry, text-image is
    held against batch 1's text routing (detached), the gradient through the image tokens only;
    without it the pair is absent and the loss 0."""
    from smar.collective import CarriedSums

    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(L, T, E, generator=g)
    ids1 = torch.randint(0, 2, (T,), generator=g)  # text and image
    z2 = torch.randn(L, T, E, generator=g, requires_grad=True)
    ids2 = torch.ones(T, dtype=torch.long)  # image only
    kw = dict(top_k=2, smar_weight=1.0, band=(5.0, 6.0), lb_weight=0.0)
    carry = CarriedSums()
    routing_objective(z1, ids1, carry=carry, **kw)
    total, terms = routing_objective(z2, ids2, carry=carry, **kw)
    plain, _ = routing_objective(z2, ids2, **kw)
    assert plain.item() == 0.0 and total.item() > 0
    # by hand: batch 1's mean text routing against batch 2's mean image routing
    P_text = torch.softmax(z1, -1)[:, ids1 == 0].mean(1)  # (L, E)
    P_img = torch.softmax(z2, -1).mean(1)  # (L, E)
    D = ((P_text - P_img) * (P_text.clamp_min(1e-9).log() - P_img.clamp_min(1e-9).log())).sum(-1)
    want = (5.0 - D).clamp_min(0).mean()
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(terms["mrd"], D.detach())
    total.backward()
    (g_hand,) = torch.autograd.grad(want, z2)
    torch.testing.assert_close(z2.grad, g_hand)
