"""Routing losses: SMAR's tolerance-band loss, the MRD divergence and the baseline regularizers.

Every function here is pure: it takes router logits (and modality ids or a mask) and returns a
tensor. Models, hooks and trainers only collect tensors and pass them in. The definitions are
those of SPEC.md sections 1-4.

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

All computation is vectorised across layers, experts and tokens: there is no Python loop over
any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "Routing",
    "prepare_routing",
    "routing_probs",
    "modality_distributions",
    "mrd",
    "smar_loss",
    "load_balancing_loss",
    "z_loss",
    "limoe_loss",
    "routing_objective",
]

EPS = 1e-9  # lower clamp of a routing distribution before its log (SPEC section 2)

_ROUTERS = ("softmax", "sigmoid")
_HINGES = ("linear", "squared")
_LB_VARIANTS = ("switch", "hf")


# ----------------------------------------------------------------------------------------------
# input validation: every public function goes through these, so errors read the same everywhere


def as_logits(router_logits: Tensor | Sequence[Tensor], name: str = "router_logits") -> Tensor:
    """Validates router logits and returns them as one float tensor ``(L, T, E)``.

    Low-precision logits (fp16, bf16) are upcast to float32: routing statistics are sums over
    many tokens and lose too much in half precision.
    """
    if isinstance(router_logits, Tensor):
        if router_logits.dim() != 3:
            raise ValueError(
                f"{name} must be a sequence of (T, E) tensors or one (L, T, E) tensor; got a "
                f"tensor of shape {tuple(router_logits.shape)}. For a single layer pass [logits]."
            )
        z = router_logits
    elif isinstance(router_logits, (list, tuple)):
        if len(router_logits) == 0:
            raise ValueError(f"{name} is empty: no MoE layer was captured")
        for i, layer in enumerate(router_logits):
            if not isinstance(layer, Tensor) or layer.dim() != 2:
                shape = tuple(layer.shape) if isinstance(layer, Tensor) else type(layer).__name__
                raise ValueError(f"{name}[{i}] must be a (T, E) tensor; got {shape}")
            if layer.shape != router_logits[0].shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(layer.shape)} but {name}[0] has "
                    f"{tuple(router_logits[0].shape)}: every layer must route the same tokens"
                )
        z = torch.stack(list(router_logits))  # (L, T, E)
    else:
        raise ValueError(
            f"{name} must be a sequence of (T, E) tensors or one (L, T, E) tensor; "
            f"got {type(router_logits).__name__}"
        )
    if not z.is_floating_point():
        raise ValueError(f"{name} must be floating point (raw router logits); got {z.dtype}")
    if z.shape[1] == 0 or z.shape[2] == 0:
        raise ValueError(f"{name} has no tokens or no experts: shape (L, T, E) = {tuple(z.shape)}")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    # One cheap pass: NaN propagates into both, +inf shows in the max, -inf (a masked expert under
    # hard routing) in the min; only then is the rarer per-token check needed.
    lo, hi = torch.aminmax(z.detach())
    if torch.isnan(hi) or torch.isposinf(hi):
        raise ValueError(f"{name} contains NaN or +inf: check the model's forward for overflow")
    if torch.isneginf(lo) and torch.isneginf(z.detach().amax(dim=-1)).any():
        raise ValueError(f"{name} has a token whose experts are all -inf: it cannot be routed")
    return z


def _flat_ids(ids: Tensor, num_tokens: int, name: str, *, allow_bool: bool) -> Tensor:
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a tensor; got {type(ids).__name__}")
    if ids.dtype == torch.bool:
        if not allow_bool:
            raise ValueError(
                f"{name} must be an integer tensor (0 text, 1 image, -1 ignore); got bool"
            )
    elif ids.is_floating_point() or ids.is_complex():
        if not allow_bool:
            raise ValueError(
                f"{name} must be an integer tensor (0 text, 1 image, -1 ignore); got {ids.dtype}"
            )
        if not torch.isin(ids, ids.new_tensor([0.0, 1.0])).all():
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (T,) or (B, S); got {tuple(ids.shape)}")
    flat = ids.reshape(-1)  # (T,) row-major, matching the logits' rows
    if flat.numel() != num_tokens:
        raise ValueError(
            f"{name} has {flat.numel()} tokens (shape {tuple(ids.shape)}) but the router logits "
            f"have T={num_tokens} rows"
        )
    return flat


def modality_ids_flat(modality_ids: Tensor, num_tokens: int) -> Tensor:
    """Validates modality ids and returns them flattened to ``(T,)`` int64."""
    return _flat_ids(modality_ids, num_tokens, "modality_ids", allow_bool=False).long()


def mask_flat(mask: Tensor | None, num_tokens: int) -> Tensor | None:
    """Validates a token mask and returns it as float ``(T,)`` of 0/1, or None."""
    if mask is None:
        return None
    return _flat_ids(mask, num_tokens, "mask", allow_bool=True).float()


def _check_router(router: str) -> None:
    if router not in _ROUTERS:
        raise ValueError(f"router must be one of {_ROUTERS}; got {router!r}")


def _check_modalities(modalities: Sequence[int], name: str = "modalities") -> tuple[int, ...]:
    mods = tuple(int(m) for m in modalities)
    if not mods or any(m < 0 for m in mods) or len(set(mods)) != len(mods):
        raise ValueError(f"{name} must be distinct non-negative ids; got {tuple(modalities)}")
    return mods


# ----------------------------------------------------------------------------------------------
# router probabilities and modality routing distributions


class Routing:
    """Validated router logits and their probabilities, computed once and shared by the losses.

    Every loss accepts a ``Routing`` in place of raw logits: build it once per forward with
    :func:`prepare_routing` when several losses look at the same logits, so that validation,
    stacking and the softmax (and its backward) run once instead of once per loss.

    Shapes:
        logits: (L, T, E) float.   probs: (L, T, E), rows summing to 1.
    """

    __slots__ = ("logits", "router", "_probs")

    def __init__(self, logits: Tensor, router: str):
        self.logits = logits
        self.router = router
        self._probs: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        if self._probs is None:
            self._probs = _probs(self.logits, self.router)
        return self._probs

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape


def prepare_routing(
    router_logits: Tensor | Sequence[Tensor] | Routing, *, router: str = "softmax"
) -> Routing:
    """Validates router logits once for several losses (see :class:`Routing`).

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        router: ``"softmax"`` or ``"sigmoid"`` (see :func:`routing_probs`).
    """
    _check_router(router)
    if isinstance(router_logits, Routing):
        if router_logits.router != router:
            raise ValueError(
                f"router={router!r} but the Routing was prepared with {router_logits.router!r}"
            )
        return router_logits
    return Routing(as_logits(router_logits), router)


def routing_probs(router_logits: Tensor | Sequence[Tensor], *, router: str = "softmax") -> Tensor:
    """Router probabilities over all experts, before top-k and renormalisation.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        router: ``"softmax"``, or ``"sigmoid"`` for routers that score experts independently:
            ``sigmoid(z) / sum(sigmoid(z))``.

    Returns:
        Probabilities ``(L, T, E)``, float32 or wider, rows summing to 1.
    """
    return prepare_routing(router_logits, router=router).probs


def _probs(z: Tensor, router: str) -> Tensor:
    if router == "softmax":
        return torch.softmax(z, dim=-1)  # (L, T, E)
    s = torch.sigmoid(z)  # (L, T, E)
    return s / s.sum(dim=-1, keepdim=True)


def _all_reduce_keep_local_grad(x: Tensor, group) -> Tensor:
    """Sum of ``x`` over the process group; the gradient flows through the local part only.

    The local part's gradient is scaled by the world size: data-parallel engines average
    gradients over ranks, so the averaged router gradient equals the gradient of one process on
    the concatenated batch.
    """
    import torch.distributed as dist

    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    world = dist.get_world_size(group)
    return total + world * (x - x.detach())


def _modality_sums(
    probs: Tensor, ids: Tensor, modalities: tuple[int, ...], group=None
) -> tuple[Tensor, Tensor]:
    """Per-modality probability sums ``(L, M, E)`` and token counts ``(M,)``."""
    onehot = (ids[None, :] == ids.new_tensor(modalities)[:, None]).to(probs.dtype)  # (M, T)
    sums = torch.matmul(onehot, probs)  # (M, T) @ (L, T, E) -> (L, M, E)
    counts = onehot.sum(dim=1)  # (M,)
    if group is not None:
        sums = _all_reduce_keep_local_grad(sums, group)
        counts = _all_reduce_keep_local_grad(counts, group).detach()
    return sums, counts


def modality_distributions(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    modalities: Sequence[int] = (0, 1),
    router: str = "softmax",
    group=None,
) -> tuple[Tensor, Tensor]:
    """The modality routing distributions ``P_m^l``: mean router probability per modality.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        modality_ids: (T,) or (B, S) integer ids; -1 tokens are ignored.
        modalities: which modality ids to return, in this order.
        router: ``"softmax"`` or ``"sigmoid"`` (see :func:`routing_probs`).
        group: a ``torch.distributed`` process group: average over the global batch.

    Returns:
        ``(P, counts)``: ``P`` of shape ``(L, M, E)`` and token counts ``(M,)``. A modality with
        no valid token has count 0 and a row of NaN (the mean of nothing): check ``counts``.
    """
    mods = _check_modalities(modalities)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    sums, counts = _modality_sums(r.probs, ids, mods, group)
    P = sums / counts[None, :, None]  # (L, M, E); 0/0 = NaN for an absent modality
    return P, counts


def _jeffreys(p: Tensor, q: Tensor) -> Tensor:
    """Symmetric KL ``KL(p||q) + KL(q||p)`` over the last dim, each clamped below at EPS."""
    return ((p - q) * (p.clamp_min(EPS).log() - q.clamp_min(EPS).log())).sum(dim=-1)


def _mrd_and_presence(
    probs: Tensor, ids: Tensor, text: int, images: tuple[int, ...], group
) -> tuple[Tensor, Tensor]:
    """D ``(L, N)`` for each non-text modality, and whether both modalities are present ``(N,)``."""
    mods = _check_modalities((text, *images), "text and image")
    sums, counts = _modality_sums(probs, ids, mods, group)
    P = sums / counts.clamp_min(1.0)[None, :, None]  # (L, 1+N, E); finite even when absent
    D = _jeffreys(P[:, :1, :], P[:, 1:, :])  # (L, N)
    present = (counts[0] > 0) & (counts[1:] > 0)  # (N,)
    return D, present


def mrd(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    text: int = 0,
    image: int | Sequence[int] = 1,
    router: str = "softmax",
    group=None,
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
        token (the divergence is undefined there).
    """
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    images = (image,) if isinstance(image, int) else tuple(image)
    D, present = _mrd_and_presence(r.probs, ids, text, images, group)
    D = torch.where(present[None, :], D, torch.full_like(D, float("nan")))
    return D[:, 0] if isinstance(image, int) else D


def _check_band(band, num_layers: int) -> Tensor:
    """Validates ``band`` and returns it as a float tensor ``(L, 2)`` of (low, high)."""
    try:
        b = torch.as_tensor(band, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"band must be a (low, high) pair or a list of L pairs; got {band!r}"
        ) from e
    if b.shape == (2,):
        b = b.expand(num_layers, 2)
    elif b.shape != (num_layers, 2):
        raise ValueError(
            f"band must be a (low, high) pair or a list of L={num_layers} pairs; got shape "
            f"{tuple(b.shape)}"
        )
    if not torch.isfinite(b).all():
        raise ValueError(f"band must be finite; got {band!r}")
    if (b < 0).any():
        raise ValueError(f"band must be non-negative (D is a divergence, D >= 0); got {band!r}")
    if (b[:, 0] > b[:, 1]).any():
        raise ValueError(f"band must have low <= high; got {band!r}")
    return b


def smar_loss(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    band=(1.5, 2.0),
    hinge: str = "linear",
    text: int = 0,
    image: int | Sequence[int] = 1,
    router: str = "softmax",
    group=None,
) -> Tensor:
    """SMAR's tolerance-band loss on the per-layer MRD.

    ``h^l = max(0, low - D^l) + max(0, D^l - high)`` (squared terms with ``hinge="squared"``),
    averaged over the layers (and non-text modalities) where both modalities are present.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        modality_ids: (T,) or (B, S) integer ids; -1 tokens are ignored.
        band: ``(low, high)`` with ``0 <= low <= high``, or a list of L pairs (one per layer).
            ``(d, d)`` is the single-target variant, ``(0, 0)`` pushes the modalities together.
        hinge: ``"linear"`` (default) or ``"squared"``.
        text, image, router, group: as in :func:`mrd`.

    Returns:
        A scalar. It is 0, still connected to the graph, when no layer has both modalities.
    """
    if hinge not in _HINGES:
        raise ValueError(f"hinge must be one of {_HINGES}; got {hinge!r}")
    r = prepare_routing(router_logits, router=router)
    z = r.logits
    ids = modality_ids_flat(modality_ids, z.shape[1])
    b = _check_band(band, z.shape[0]).to(device=z.device, dtype=z.dtype)  # (L, 2)
    images = (image,) if isinstance(image, int) else tuple(image)
    D, present = _mrd_and_presence(r.probs, ids, text, images, group)  # (L, N), (N,)
    below = (b[:, :1] - D).clamp_min(0)  # (L, N)
    above = (D - b[:, 1:]).clamp_min(0)  # (L, N)
    h = below + above if hinge == "linear" else below.square() + above.square()  # (L, N)
    weight = present.to(h.dtype).expand_as(h)  # (L, N)
    n = weight.sum()
    # Layers without both modalities are skipped; with none at all the loss is a graph-connected 0.
    return (h * weight).sum() / n.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# baselines: load balancing, z-loss, LIMoE


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, E={num_experts}]; got {top_k!r}")


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    *,
    top_k: int,
    mask: Tensor | None = None,
    variant: str = "switch",
    router: str = "softmax",
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

    Returns:
        A scalar.
    """
    if variant not in _LB_VARIANTS:
        raise ValueError(f"variant must be one of {_LB_VARIANTS}; got {variant!r}")
    r = prepare_routing(router_logits, router=router)
    z = r.logits
    L, T, E = z.shape
    _check_top_k(top_k, E)
    w = mask_flat(mask, T)  # (T,) or None
    probs = r.probs  # (L, T, E)
    w = None if w is None else w.to(probs.dtype)
    # Top-k of the probabilities (as transformers does, so that ties break alike); unsorted is
    # faster and the order does not matter for counting.
    chosen = torch.topk(probs.detach(), top_k, dim=-1, sorted=False).indices  # (L, T, K)
    slot_w = (
        torch.ones(1, 1, 1, dtype=probs.dtype, device=z.device).expand(L, T, top_k)
        if w is None
        else w[None, :, None].expand(L, T, top_k)
    )  # (L, T, K)
    counts = torch.zeros(L, E, dtype=probs.dtype, device=z.device)
    counts.scatter_add_(1, chosen.reshape(L, T * top_k), slot_w.reshape(L, T * top_k))  # (L, E)
    prob_sum = probs.sum(dim=1) if w is None else torch.einsum("lte,t->le", probs, w)  # (L, E)
    n_tok = torch.tensor(float(T), device=z.device) if w is None else w.sum()
    if n_tok <= 0:
        raise ValueError("mask selects no token: the load-balancing loss is undefined")
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
    if w.sum() <= 0:
        raise ValueError("mask selects no token: the z-loss is undefined")
    return (lse2 * w[None, :]).sum() / (w.sum() * z.shape[0])


def _entropy(p: Tensor) -> Tensor:
    """Entropy over the last dim, in nats; ``0 log 0 = 0``."""
    return -(p * p.clamp_min(EPS).log()).sum(dim=-1)


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
    mods = _check_modalities(modalities)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    E = r.shape[-1]
    if not (isinstance(tau, (int, float)) and 0 <= tau <= math.log(E) + 1e-6):
        raise ValueError(f"tau must be a number in [0, log(E)={math.log(E):.3f}]; got {tau!r}")
    probs = r.probs  # (L, T, E)
    onehot = (ids[None, :] == ids.new_tensor(mods)[:, None]).to(probs.dtype)  # (M, T)
    counts = onehot.sum(dim=1)  # (M,)
    denom = counts.clamp_min(1.0)  # (M,)
    local = torch.matmul(onehot, _entropy(probs).unsqueeze(-1)).squeeze(-1) / denom  # (L, M)
    P = torch.matmul(onehot, probs) / denom[None, :, None]  # (L, M, E)
    glob = (tau - _entropy(P)).clamp_min(0)  # (L, M)
    present = (counts > 0).to(probs.dtype)  # (M,)
    per = (local_weight * local + global_weight * glob) * present  # (L, M)
    return per.sum(dim=1).mean()


def routing_objective(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor | None = None,
    *,
    top_k: int,
    mask: Tensor | None = None,
    smar_weight: float = 0.0,
    band=(1.5, 2.0),
    hinge: str = "linear",
    lb_weight: float = 0.01,
    lb_variant: str = "switch",
    z_weight: float = 0.0,
    limoe_weight: float = 0.0,
    limoe_tau: float | None = None,
    text: int = 0,
    image: int = 1,
    router: str = "softmax",
    group=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The routing part of SMAR's objective, and its unweighted terms, from one forward.

    ``total = lb_weight * L_LB + smar_weight * L_SMAR + z_weight * L_z + limoe_weight * L_LIMoE``.
    Terms with weight 0 are not computed. The logits are validated and soft-maxed once.

    Args:
        router_logits: L tensors (T, E), one (L, T, E) tensor, or a :class:`Routing`.
        modality_ids: (T,) or (B, S) integer ids; needed by the SMAR and LIMoE terms.
        top_k: experts per token (load balancing).
        mask: tokens that count for load balancing and z-loss; by default ``modality_ids >= 0``
            when modality ids are given, else every token.
        limoe_tau: LIMoE's global entropy threshold; default ``log(E) / 2``.
        Others: as in :func:`smar_loss`, :func:`load_balancing_loss`.

    Returns:
        ``(total, terms)``: ``terms`` maps ``"band"``, ``"lb"``, ``"z"``, ``"limoe"`` (those
        computed) to unweighted scalars, and ``"mrd"`` to the detached per-layer MRD ``(L,)``
        when modality ids are given (NaN where a modality is absent).
    """
    r = prepare_routing(router_logits, router=router)
    if mask is None and modality_ids is not None:
        mask = modality_ids >= 0
    if (smar_weight or limoe_weight) and modality_ids is None:
        raise ValueError("modality_ids are required when smar_weight or limoe_weight is set")
    terms: dict[str, Tensor] = {}
    total = r.logits.new_zeros(())
    if lb_weight:
        terms["lb"] = load_balancing_loss(
            r, top_k=top_k, mask=mask, variant=lb_variant, router=router
        )
        total = total + lb_weight * terms["lb"]
    else:
        _check_top_k(top_k, r.shape[-1])
    if smar_weight:
        terms["band"] = smar_loss(
            r,
            modality_ids,
            band=band,
            hinge=hinge,
            text=text,
            image=image,
            group=group,
            router=router,
        )
        total = total + smar_weight * terms["band"]
    if z_weight:
        terms["z"] = z_loss(r, mask=mask)
        total = total + z_weight * terms["z"]
    if limoe_weight:
        tau = math.log(r.shape[-1]) / 2 if limoe_tau is None else limoe_tau
        terms["limoe"] = limoe_loss(
            r, modality_ids, tau=tau, modalities=(text, image), router=router
        )
        total = total + limoe_weight * terms["limoe"]
    if modality_ids is not None:
        with torch.no_grad():
            terms["mrd"] = mrd(r, modality_ids, text=text, image=image, group=group, router=router)
    return total, terms
