"""The baseline regularizers (docs/method.md#baselines): load balancing (Switch, and transformers'
pooled variant), the ST-MoE router z-loss and LIMoE's per-modality entropy losses.

Pure functions of router logits (or a prepared :class:`smar.distributions.Routing`), as in
:mod:`smar.losses`; shapes as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from smar.collective import all_reduce_sums
from smar.distributions import (
    Routing,
    as_logits,
    check_modalities,
    check_top_k,
    entropy,
    mask_flat,
    modality_ids_flat,
    modality_onehot,
    prepare_routing,
)
from smar.errors import UsageError

__all__ = ["load_balancing_loss", "z_loss", "limoe_loss"]

_LB_VARIANTS = ("switch", "hf")


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    *,
    top_k: int,
    mask: Tensor | None = None,
    variant: str = "switch",
    router: str = "softmax",
    group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """Load-balancing loss (Switch Transformer).

    ``variant="switch"``: per layer, ``f_i`` is the share of the ``T*K`` top-k slots given to
    expert ``i`` and ``P_i`` the mean router probability; ``L_LB = E * sum_i f_i * P_i`` (1 when
    balanced), averaged over layers. Only ``P`` carries gradient.

    ``variant="hf"``: transformers' ``load_balancing_loss_func`` exactly: statistics pooled over
    all layers and ``f`` summing to ``K`` (``K`` when balanced).

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        top_k: experts per token, ``1 <= top_k <= E``.
        mask: (T,) or (B, S), true for tokens that count (e.g. the attention mask).
        variant: ``"switch"`` or ``"hf"``.
        router: ``"softmax"`` or ``"sigmoid"`` (``P`` then uses normalised sigmoid scores).
        group: a ``torch.distributed`` process group: ``f`` and ``P`` over the global batch
            (gradient through the local part, as in :func:`smar.losses.mrd`).

    Returns:
        A scalar.
    """
    check_lb_variant(variant)
    r = prepare_routing(router_logits, router=router)
    parts = all_reduce_sums(lb_sums(r, top_k=top_k, mask=mask), group)
    return lb_from_sums(parts, top_k=top_k, variant=variant)


def check_lb_variant(variant: str) -> None:
    if variant not in _LB_VARIANTS:
        raise UsageError(f"variant must be one of {_LB_VARIANTS}; got {variant!r}")


def lb_sums(
    r: Routing,
    *,
    top_k: int,
    mask: Tensor | None,
    chosen: Tensor | None = None,
    prob_sum: Tensor | None = None,
) -> dict[str, Tensor]:
    """The sums load balancing is a function of: ``lb_counts`` (L, E), top-k slots per expert
    (no gradient); ``lb_probs`` (L, E), router probabilities summed over tokens; ``lb_tokens``
    (), the tokens that count. ``chosen`` ``(L, T, K)``: the experts the routers chose (read
    from their outputs), counted instead of a top-k of the probabilities. ``prob_sum``: the
    masked probability sums when the caller computed them (with other sums, in one product)."""
    L, T, E = r.shape
    check_top_k(top_k, E)
    w = mask_flat(mask, T)  # (T,) or None
    w = None if w is None else w.to(device=r.device, dtype=r.dtype)
    # Top-k of the probabilities (as transformers does, so that ties break alike); unsorted is
    # faster and the order does not matter for counting.
    if chosen is None:
        chosen = r.top_k(top_k)  # (L, T, K)
    elif tuple(chosen.shape) != (L, T, top_k):
        raise UsageError(
            f"chosen must have shape (L, T, K) = {(L, T, top_k)}; got {tuple(chosen.shape)}"
        )
    else:
        chosen = chosen.to(device=r.device, dtype=torch.long)
    slot_w = (
        torch.ones(1, 1, 1, dtype=r.dtype, device=r.device).expand(L, T, top_k)
        if w is None
        else w[None, :, None].expand(L, T, top_k)
    )  # (L, T, K)
    counts = torch.zeros(L, E, dtype=r.dtype, device=r.device)
    counts.scatter_add_(1, chosen.reshape(L, T * top_k), slot_w.reshape(L, T * top_k))  # (L, E)
    if prob_sum is None:
        ones = torch.ones(1, T, dtype=r.dtype, device=r.device)
        prob_sum = r.weighted_sums(ones if w is None else w[None])[:, 0]  # (L, E)
    n_tok = torch.tensor(float(T), dtype=r.dtype, device=r.device) if w is None else w.sum()
    return {"lb_counts": counts, "lb_probs": prob_sum, "lb_tokens": n_tok}


def lb_from_sums(
    parts: dict[str, Tensor], *, top_k: int, variant: str, check: bool = True
) -> Tensor:
    """Load balancing from the sums of :func:`lb_sums` (local, global or pooled over
    micro-batches). ``check=False`` skips the test for an empty mask, which waits for the
    device (the loss is then 0)."""
    counts, prob_sum, n_tok = parts["lb_counts"], parts["lb_probs"], parts["lb_tokens"]
    L, E = counts.shape
    if check and n_tok <= 0:
        raise UsageError("mask selects no token: the load-balancing loss is undefined")
    n_tok = n_tok.clamp_min(1e-12)
    if variant == "hf":
        f = counts.sum(dim=0) / (L * n_tok)  # (E,) sums to K
        P = prob_sum.sum(dim=0) / (L * n_tok)  # (E,)
        return E * (f * P).sum()
    f = counts / (top_k * n_tok)  # (L, E) sums to 1 per layer
    P = prob_sum / n_tok  # (L, E)
    return (E * (f * P).sum(dim=-1)).mean()


def z_loss(
    router_logits: Tensor | Sequence[Tensor] | Routing, *, mask: Tensor | None = None
) -> Tensor:
    """ST-MoE router z-loss: mean over tokens and layers of ``logsumexp(z_t)^2``.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        mask: (T,) or (B, S), true for tokens that count.

    Returns:
        A scalar.
    """
    z = router_logits.logits if isinstance(router_logits, Routing) else as_logits(router_logits)
    lse2 = torch.logsumexp(z, dim=-1).square()  # (L, T)
    w = mask_flat(mask, z.shape[1])
    if w is None:
        return lse2.mean()
    w = w.to(lse2.dtype)
    check = not isinstance(router_logits, Routing) or router_logits.check
    if check and w.sum() <= 0:
        raise UsageError("mask selects no token: the z-loss is undefined")
    return (lse2 * w[None, :]).sum() / (w.sum().clamp_min(1.0) * z.shape[0])


def limoe_loss(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    tau: float,
    local_weight: float = 1.0,
    global_weight: float = 1.0,
    modalities: Sequence[int] = (0, 1),
    router: str = "softmax",
) -> Tensor:
    """LIMoE's per-modality entropy losses (Mustafa et al., 2022).

    For each modality ``m`` present and each layer: local ``mean_{t in T_m} H(p_t)`` (minimised:
    confident routing) and global ``max(0, tau - H(P_m))`` (the modality spreads over experts).
    The weighted sum is summed over modalities and averaged over layers. Add load balancing
    separately.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        modality_ids: (T,) or (B, S) integer ids; -1 tokens are ignored.
        tau: global entropy threshold in nats, ``0 <= tau <= log(E)``.
        local_weight, global_weight: weights of the two terms.
        modalities: which modality ids get the losses.
        router: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        A scalar; a graph-connected 0 when no listed modality is present.
    """
    mods = check_modalities(modalities)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    E = r.shape[-1]
    if not (isinstance(tau, (int, float)) and 0 <= tau <= math.log(E) + 1e-6):
        raise UsageError(f"tau must be a number in [0, log(E)={math.log(E):.3f}]; got {tau!r}")
    probs = r.probs  # (L, T, E)
    onehot = modality_onehot(ids, mods, probs.dtype)  # (M, T)
    counts = onehot.sum(dim=1)  # (M,)
    denom = counts.clamp_min(1.0)  # (M,)
    local = torch.matmul(onehot, entropy(probs).unsqueeze(-1)).squeeze(-1) / denom  # (L, M)
    P = torch.matmul(onehot, probs) / denom[None, :, None]  # (L, M, E)
    glob = (tau - entropy(P)).clamp_min(0)  # (L, M)
    present = (counts > 0).to(probs.dtype)  # (M,)
    per = (local_weight * local + global_weight * glob) * present  # (L, M)
    return per.sum(dim=1).mean()
