"""Routing losses: SMAR's tolerance-band loss, the MRD divergence and the baseline regularizers.

Every function here is pure: it takes router logits (and modality ids or a mask) and returns a
tensor. Models, hooks and trainers only collect tensors and pass them in. The definitions are
those of docs/method.md (#notation to #baselines).

Shapes legend:
    L  MoE layers          T  tokens (batch x sequence, flattened row-major)
    E  experts             K  experts chosen per token (top-k)
    M  modalities          B, S  batch, sequence

Canonical inputs:
    router_logits  a sequence of L tensors (T, E) or one tensor (L, T, E); raw, pre-softmax.
                   ``-inf`` marks an expert a token may not use (hard routing); NaN and ``+inf``
                   are errors.
    modality_ids   integer tensor (T,) or (B, S): 0 text, 1 image, 2 video, 3 audio, -1 ignore.
    mask           bool or 0/1 tensor (T,) or (B, S): true for tokens that count.

All computation is vectorised across experts and tokens. Logits given per layer are processed
layer by layer on cache-sized tensors and never stacked unless a loss needs them stacked (see
:class:`smar.distributions.Routing`); a stacked ``(L, T, E)`` tensor is processed whole.

The canonical representation and its validation live in :mod:`smar.distributions`, the baseline
regularizers in :mod:`smar.baselines`; both are re-exported here, so that every routing formula
can be imported from ``smar.losses``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from smar import baselines
from smar.baselines import check_lb_variant, lb_from_sums, lb_sums
from smar.checks import check_logits, check_weight
from smar.collective import CarriedSums, StepSums, all_reduce_sums
from smar.distributions import (
    EPS,
    Routing,
    check_mask,
    check_modalities,
    check_top_k,
    mask_flat,
    modality_distributions,
    modality_ids_flat,
    modality_onehot,
    modality_sums,
    prepare_routing,
    routing_probs,
)
from smar.errors import UsageError
from smar.pairs import Band, Pair, pair_band_loss, pair_divergences, resolve_pairs
from smar.pairs import _band_rows as _check_band  # noqa: F401  (re-exported: smar.config)
from smar.pairs import pair_bands as _band_table

_Loss = TypeVar("_Loss", bound=Callable[..., Tensor])

__all__ = [
    "EPS",
    "Routing",
    "prepare_routing",
    "routing_probs",
    "modality_distributions",
    "mrd",
    "mrd_matrix",
    "smar_loss",
    "load_balancing_loss",
    "z_loss",
    "limoe_loss",
    "routing_objective",
]

_HINGES = ("linear", "squared")


def _checks_inputs(fn: _Loss) -> _Loss:
    """``fn`` from :mod:`smar.baselines` with the checks of this module's losses first."""

    @functools.wraps(fn)
    def checked(
        router_logits: Any, *args: Any, mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        check_logits(router_logits)
        check_mask(mask)
        if mask is not None:
            kwargs["mask"] = mask
        return fn(router_logits, *args, **kwargs)

    return cast(_Loss, checked)


load_balancing_loss = _checks_inputs(baselines.load_balancing_loss)
z_loss = _checks_inputs(baselines.z_loss)
limoe_loss = _checks_inputs(baselines.limoe_loss)


def _pairs_of(
    text: int, image: int | Sequence[int], pairs: str | Sequence[Sequence[int]] | None
) -> tuple[tuple[Pair, ...], tuple[int, ...]]:
    """The pairs held in a band and the modalities they involve, in order (text first)."""
    images = (image,) if isinstance(image, int) else tuple(image)
    mods = check_modalities((text, *images), "text and image")
    if pairs is None:
        return tuple((text, m) for m in images), mods
    chosen = resolve_pairs(pairs, text=text, modalities=mods)
    return chosen, tuple(dict.fromkeys(m for p in chosen for m in p))  # (M,): order of first use


def _pair_mrd(
    r: Routing,
    ids: Tensor,
    pairs: Sequence[Pair],
    mods: tuple[int, ...],
    group: torch.distributed.ProcessGroup | None,
) -> tuple[Tensor, Tensor]:
    """D ``(P, L)`` and presence ``(P,)`` of each pair, from one product and one all-reduce."""
    sums, counts = modality_sums(r, ids, mods, group)  # (L, M, E), (M,)
    return pair_divergences(sums, counts, mods, pairs)


def mrd(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    text: int = 0,
    image: int | Sequence[int] = 1,
    router: str = "softmax",
    group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """MRD: symmetric KL between the text and image routing distributions, per layer.

    ``D^l = KL(P_text^l || P_image^l) + KL(P_image^l || P_text^l)`` (no 1/2 factor), with each
    distribution clamped below at ``EPS`` before the log.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        modality_ids: (T,) or (B, S) integer ids; -1 tokens are ignored.
        text: the anchor modality id.
        image: the other modality id, or several (text stays the anchor of each).
        router: ``"softmax"`` or ``"sigmoid"``.
        group: a ``torch.distributed`` process group: distributions over the global batch.

    Returns:
        ``(L,)`` for one ``image`` id, ``(L, N)`` for N ids. NaN where a modality has no valid
        token (the divergence is undefined there). Every pair of modalities: :func:`mrd_matrix`.
    """
    check_logits(router_logits)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    pairs, mods = _pairs_of(text, image, None)
    D, present = _pair_mrd(r, ids, pairs, mods, group)  # (N, L), (N,)
    D = torch.where(present[:, None], D, torch.full_like(D, float("nan"))).T  # (L, N)
    return D[:, 0] if isinstance(image, int) else D


def mrd_matrix(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    modalities: Sequence[int] = (0, 1, 2, 3),
    router: str = "softmax",
    group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """The MRD of every pair of modalities, per layer: ``D[l, i, j]``, symmetric.

    ``D[l, i, j]`` is the symmetric KL divergence of the routing distributions of
    ``modalities[i]`` and ``modalities[j]`` at layer ``l`` (``D[:, 0, m]`` equals
    ``mrd(..., image=modalities[m])`` with text ``modalities[0]``); the diagonal is 0.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        modality_ids: (T,) or (B, S) integer ids; -1 tokens are ignored.
        modalities: the ids of the rows and columns, in order (default text, image, video,
            audio).
        router, group: as in :func:`mrd`.

    Shapes:
        Returns ``(L, M, M)``; NaN in the rows and columns of a modality with no valid token.
    """
    check_logits(router_logits)
    mods = check_modalities(modalities)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    pairs = [(i, j) for a, i in enumerate(mods) for j in mods[a + 1 :]]
    sums, counts = modality_sums(r, ids, mods, group)  # (L, M, E), (M,)
    L, M = sums.shape[0], len(mods)
    out = torch.zeros(L, M, M, dtype=sums.dtype, device=sums.device)  # (L, M, M)
    if pairs:
        D, _ = pair_divergences(sums, counts, mods, pairs)  # (P, L)
        rows, cols = zip(*[(mods.index(i), mods.index(j)) for i, j in pairs], strict=True)
        out[:, list(rows), list(cols)] = D.T
        out[:, list(cols), list(rows)] = D.T
    absent = counts <= 0  # (M,)
    nan = absent[:, None] | absent[None, :]  # (M, M)
    return torch.where(nan[None], torch.full_like(out, float("nan")), out)


def smar_loss(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    band: Band = (1.5, 2.0),
    hinge: str = "linear",
    text: int = 0,
    image: int | Sequence[int] = 1,
    pairs: str | Sequence[Sequence[int]] | None = None,
    pair_bands: Mapping[Pair, Band] | None = None,
    router: str = "softmax",
    group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """SMAR's tolerance-band loss on the per-layer MRD.

    ``h^l = max(0, low - D^l) + max(0, D^l - high)`` (squared terms with ``hinge="squared"``),
    averaged over the layers (and pairs of modalities) where both modalities are present.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        modality_ids: (T,) or (B, S) integer ids; -1 tokens are ignored.
        band: ``(low, high)`` with ``0 <= low <= high``, or a list of L pairs (one per layer).
            ``(d, d)`` is the single-target variant, ``(0, 0)`` pushes the modalities together.
        hinge: ``"linear"`` (default) or ``"squared"``.
        text, image, router, group: as in :func:`mrd`.
        pairs: which pairs of modalities are held in a band
            (docs/method.md#more-than-two-modalities): None, text against each ``image`` id;
            ``"text"``, the same; ``"all"``, every pair of ``(text, *image)``; or a list of
            ``(i, j)``.
        pair_bands: ``{(i, j): band}``, a band (a pair, or L pairs) for some pairs; the others
            use ``band``. E.g. ``{(1, 2): (0.0, 0.5)}`` keeps image and video alike.

    Returns:
        A scalar. It is 0, still connected to the graph, when no layer has both modalities.
    """
    if hinge not in _HINGES:
        raise UsageError(f"hinge must be one of {_HINGES}; got {hinge!r}")
    check_logits(router_logits)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    chosen, mods = _pairs_of(text, image, pairs)
    b = _band_table(chosen, band, pair_bands, r.shape[0]).to(r.device, r.dtype)  # (P, L, 2)
    D, present = _pair_mrd(r, ids, chosen, mods, group)  # (P, L), (P,)
    return pair_band_loss(D, present, b, hinge)


def routing_objective(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor | None = None,
    *,
    top_k: int,
    mask: Tensor | None = None,
    smar_weight: float = 0.0,
    band: Band = (1.5, 2.0),
    hinge: str = "linear",
    lb_weight: float = 0.01,
    lb_variant: str = "switch",
    z_weight: float = 0.0,
    limoe_weight: float = 0.0,
    limoe_tau: float | None = None,
    text: int = 0,
    image: int | Sequence[int] = 1,
    pairs: str | Sequence[Sequence[int]] | None = None,
    pair_bands: Mapping[Pair, Band] | None = None,
    router: str = "softmax",
    group: torch.distributed.ProcessGroup | None = None,
    step_sums: StepSums | None = None,
    carry: CarriedSums | None = None,
    chosen: Tensor | Sequence[Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The routing part of SMAR's objective, and its unweighted terms, from one forward.

    ``total = lb_weight * L_LB + smar_weight * L_SMAR + z_weight * L_z + limoe_weight * L_LIMoE``.
    Terms with weight 0 are not computed. The logits are validated and soft-maxed once; the sums
    that the band loss, the MRD and load balancing are functions of go through one all-reduce
    when a ``group`` is given.

    Args:
        router_logits: L tensors (T, E), one (L, T, E) tensor, or a :class:`Routing`.
        modality_ids: (T,) or (B, S) integer ids; needed by the SMAR and LIMoE terms.
        top_k: experts per token (load balancing).
        mask: tokens that count for load balancing and z-loss; by default ``modality_ids >= 0``
            when modality ids are given, else every token.
        limoe_tau: LIMoE's global entropy threshold; default ``log(E) / 2``.
        group: a ``torch.distributed`` process group: the band loss, MRD and load balancing over
            the global batch (z-loss and LIMoE stay per token, local).
        step_sums: a :class:`smar.collective.StepSums`: the band loss, MRD and load balancing
            over the micro-batches of the optimizer step so far.
        image, pairs, pair_bands: the pairs of modalities held in a band and their bands, as in
            :func:`smar_loss`.
        carry: a :class:`smar.collective.CarriedSums`: a modality absent from these sums is
            represented by its routing the last time it was present (detached).
        chosen: the experts the routers chose, ``(T, K)`` per layer or ``(L, T, K)`` (e.g.
            :meth:`smar.RouterCapture.chosen`): load balancing counts them instead of a top-k.
        smar_weight, lb_weight, z_weight, limoe_weight: the weights of the terms in ``total``;
            0 leaves a term out.
        band, hinge, text, router: as in :func:`smar_loss`.
        lb_variant: ``variant`` of :func:`load_balancing_loss` (``"switch"`` or ``"hf"``).

    Returns:
        ``(total, terms)``: ``terms`` maps ``"band"``, ``"lb"``, ``"z"``, ``"limoe"`` (those
        computed) to unweighted scalars, and ``"mrd"`` to the detached per-layer MRD when
        modality ids are given (NaN where a modality is absent): ``(L,)`` for one ``image`` id
        and no ``pairs``, else ``(L, P)``, one column per pair in the order of
        :func:`smar.pairs.resolve_pairs`.
    """
    for name, value in (("smar_weight", smar_weight), ("lb_weight", lb_weight),
                        ("z_weight", z_weight), ("limoe_weight", limoe_weight)):  # fmt: skip
        check_weight(name, value)
    check_logits(router_logits)
    check_mask(mask)
    r = prepare_routing(router_logits, router=router)
    from_ids = mask is None and modality_ids is not None
    if from_ids and modality_ids is not None:
        mask = modality_ids >= 0
    if (smar_weight or limoe_weight) and modality_ids is None:
        raise UsageError("modality_ids are required when smar_weight or limoe_weight is set")
    if lb_weight:
        check_lb_variant(lb_variant)
    if smar_weight:
        if hinge not in _HINGES:
            raise UsageError(f"hinge must be one of {_HINGES}; got {hinge!r}")
    if modality_ids is not None:
        held, mods = _pairs_of(text, image, pairs)
        if smar_weight:
            b = _band_table(held, band, pair_bands, r.shape[0]).to(r.device, r.dtype)  # (P, L, 2)
    check_top_k(top_k, r.shape[-1])
    # The sums of this forward, made global and pooled over the step: one all-reduce in all.
    # The per-modality and the balancing probability sums come out of one product of a token
    # weight matrix with the probabilities (one matmul forward, one backward, no extra copies).
    T = r.shape[1]
    rows = []  # (R, T) token weights
    if modality_ids is not None:
        ids = modality_ids_flat(modality_ids, T)
        onehot = modality_onehot(ids, mods, r.dtype)  # (M, T)
        rows.append(onehot)
    if lb_weight:
        w = mask_flat(mask, T)
        rows.append((torch.ones(T, dtype=r.dtype, device=r.device) if w is None
                     else w.to(device=r.device, dtype=r.dtype))[None])  # fmt: skip
    parts: dict[str, Tensor] = {}
    if rows:
        W = torch.cat(rows)  # (R, T)
        sums = r.weighted_sums(W, grad=bool(smar_weight or lb_weight))  # (L, R, E)
    if lb_weight:
        if chosen is not None and not isinstance(chosen, Tensor):
            chosen = torch.stack(list(chosen))  # (L, T, K)
        parts.update(lb_sums(r, top_k=top_k, mask=mask, chosen=chosen, prob_sum=sums[:, -1]))
    if modality_ids is not None:
        parts.update(mod_sums=sums[:, : len(mods)], mod_counts=onehot.sum(dim=1))
    parts = all_reduce_sums(parts, group)
    if step_sums is not None:
        # each sum with gradient, the count that normalises it and the axis that count indexes
        parts = step_sums.combine(
            parts, {"lb_probs": ("lb_tokens", None), "mod_sums": ("mod_counts", 1)}
        )
    terms: dict[str, Tensor] = {}
    total = torch.zeros((), dtype=r.dtype, device=r.device)
    if lb_weight and from_ids and r.check and bool(parts["lb_tokens"] <= 0):
        raise UsageError(
            "modality_ids have no valid token (every id is -1, padding or ignored): no routing "
            "to balance; fix: give at least one token an id >= 0 (0 text, 1 image)"
        )
    if lb_weight:
        terms["lb"] = lb_from_sums(parts, top_k=top_k, variant=lb_variant, check=r.check)
        total = total + lb_weight * terms["lb"]
    if modality_ids is not None:
        mod_sums, mod_counts = parts["mod_sums"], parts["mod_counts"]
        if carry is not None:
            mod_sums, mod_counts = carry.fill(mod_sums, mod_counts)
        D, present = pair_divergences(mod_sums, mod_counts, mods, held)
        if smar_weight:  # D (P, L), present (P,)
            terms["band"] = pair_band_loss(D, present, b, hinge)
            total = total + smar_weight * terms["band"]
        D = torch.where(present[:, None], D.detach(), torch.full_like(D, float("nan"))).T
        terms["mrd"] = D[:, 0] if pairs is None and isinstance(image, int) else D  # (L,) | (L, P)
    if z_weight:
        terms["z"] = z_loss(r, mask=mask)
        total = total + z_weight * terms["z"]
    if limoe_weight and modality_ids is not None:  # ids are required with limoe_weight
        tau = math.log(r.shape[-1]) / 2 if limoe_tau is None else limoe_tau
        terms["limoe"] = limoe_loss(r, modality_ids, tau=tau, modalities=mods, router=router)
        total = total + limoe_weight * terms["limoe"]
    return total, terms
