"""The canonical routing representation and the distributions computed from it.

Raw router logits are validated (:mod:`smar.checks`) and stacked once (:func:`as_logits`,
:class:`Routing`, :func:`prepare_routing`), turned into probabilities (:func:`routing_probs`)
and averaged per modality (:func:`modality_distributions`), over the local batch or, with
``group=``, the global one. Every loss (:mod:`smar.losses`, :mod:`smar.baselines`) and the analysis
(:mod:`smar.metrics`) start here, so errors read the same everywhere.

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
layer by layer (a loop of L small, cache-sized operations is faster on a CPU than one stacked
operation, and stacking copies every logit); a stacked (L, T, E) tensor is processed whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smar.checks import (  # noqa: F401  (re-exported: the losses and metrics import them here)
    as_logits,
    check_mask,
    check_modalities,
    check_router,
    check_top_k,
    mask_flat,
    modality_ids_flat,
)
from smar.checks import checked as _checked
from smar.collective import all_reduce_sums
from smar.errors import UsageError

__all__ = [
    "EPS",
    "Routing",
    "as_logits",
    "prepare_routing",
    "routing_probs",
    "modality_distributions",
]

EPS = 1e-9  # lower clamp of a routing distribution before its log (docs/method.md#mrd)

# Below this many logits per layer, one top-k over the stacked layers beats L calls on a CPU
# (measured: 32 layers of 4096 x 8, 7.9 ms stacked against 12.1 ms per layer; 24 layers of
# 8192 x 64, 125 ms stacked against 98 ms per layer).
_TOPK_PER_LAYER_MIN = 1 << 17
_HINGES = ("linear", "squared")

# ----------------------------------------------------------------------------------------------
# router probabilities and modality routing distributions


class Routing:
    """Validated router logits and their probabilities, computed once and shared by the losses.

    Every loss accepts a ``Routing`` in place of raw logits: build it once per forward with
    :func:`prepare_routing` when several losses look at the same logits, so that validation
    and the softmax (and its backward) run once instead of once per loss.

    Logits given as L per-layer tensors stay per layer: the sums the losses need
    (:meth:`weighted_sums`) and the top-k (:meth:`top_k`) run layer by layer on tensors that fit
    in the processor's cache, and nothing is stacked unless a loss asks for :attr:`logits` or
    :attr:`probs` (z-loss, LIMoE). On 24 layers of 8192 tokens and 64 experts that is 3x faster
    than one stacked softmax and its backward (``benchmarks/bench_losses.py``).

    Args:
        logits: L tensors (T, E) or one (L, T, E) tensor of raw router logits.
        router: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"``: how the router turns its
            logits into scores (:func:`routing_probs`).
        check: False skips the checks that wait for the device (NaN or infinite logits, an
            empty mask): a training loop that checked its first forward can skip them later.

    Shapes:
        logits: (L, T, E) float.   probs: (L, T, E), rows summing to 1.
    """

    __slots__ = ("_layers", "_logits", "router", "check", "_probs", "_layer_probs")

    def __init__(self, logits: Tensor | Sequence[Tensor], router: str, check: bool = True):
        self._logits: Tensor | None  # (L, T, E), or None while the logits come per layer
        self._layers: list[Tensor] | None  # L tensors (T, E), or None
        if isinstance(logits, Tensor):
            self._logits, self._layers = logits, None
        else:
            self._logits, self._layers = None, list(logits)
        self.router = router
        self.check = check  # False: the losses skip checks that wait for the device
        self._probs: Tensor | None = None
        self._layer_probs: list[Tensor] | None = None

    @property
    def logits(self) -> Tensor:
        """``(L, T, E)``, stacked on first use when the logits came per layer."""
        if self._logits is None:
            assert self._layers is not None  # one of the two is always set
            self._logits = torch.stack(self._layers)
        return self._logits

    @property
    def probs(self) -> Tensor:
        """``(L, T, E)``: the layers' probabilities (stacked from :meth:`layer_probs` when those
        were computed already, so that the softmax runs once)."""
        if self._probs is None:
            if self._layer_probs is not None:
                self._probs = torch.stack(self._layer_probs)
            else:
                self._probs = probabilities(self.logits, self.router)
        return self._probs

    def layer_probs(self) -> list[Tensor]:
        """The probabilities of each layer, ``L`` tensors ``(T, E)``."""
        if self._layer_probs is None:
            if self._layers is not None and self._probs is None:
                self._layer_probs = [probabilities(z, self.router) for z in self._layers]
            else:
                self._layer_probs = list(self.probs.unbind(0))
        return self._layer_probs

    @property
    def _per_layer(self) -> bool:
        return self._layers is not None and self._probs is None

    def weighted_sums(self, weights: Tensor, *, grad: bool = True) -> Tensor:
        """``(L, R, E)``: ``weights (R, T) @ probs`` for every layer (gradient only with
        ``grad``). Per-layer logits are summed layer by layer, never stacked."""
        if self._per_layer:
            layers = self.layer_probs()
            return torch.stack([weights @ (p if grad else p.detach()) for p in layers])
        probs = self.probs if grad else self.probs.detach()
        return torch.matmul(weights, probs)  # (R, T) @ (L, T, E) -> (L, R, E)

    def top_k(self, k: int) -> Tensor:
        """``(L, T, k)``: the experts of largest probability (unsorted) of every token."""
        if not self._per_layer:
            return self.probs.detach().topk(k, dim=-1, sorted=False).indices
        probs = [p.detach() for p in self.layer_probs()]
        if probs[0].numel() < _TOPK_PER_LAYER_MIN:  # small layers: one call on all of them
            return torch.stack(probs).topk(k, dim=-1, sorted=False).indices
        return torch.stack([p.topk(k, dim=-1, sorted=False).indices for p in probs])

    @property
    def shape(self) -> torch.Size:
        if self._logits is not None:
            return self._logits.shape
        assert self._layers is not None  # one of the two is always set
        return torch.Size((len(self._layers), *self._layers[0].shape))

    @property
    def dtype(self) -> torch.dtype:
        return self._first_logits().dtype

    @property
    def device(self) -> torch.device:
        return self._first_logits().device

    def _first_logits(self) -> Tensor:
        """The stacked logits, or those of the first layer (same dtype and device)."""
        if self._logits is not None:
            return self._logits
        assert self._layers is not None  # one of the two is always set
        return self._layers[0]


def prepare_routing(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    *,
    router: str = "softmax",
    check: bool = True,
) -> Routing:
    """Validates router logits once for several losses (see :class:`Routing`).

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        router: ``"softmax"`` or ``"sigmoid"`` (see :func:`routing_probs`).
        check: check the values too (see :func:`as_logits`); False keeps the losses free of
            host-device synchronisation.
    """
    check_router(router)
    if isinstance(router_logits, Routing):
        if router_logits.router != router:
            raise UsageError(
                f"router={router!r} but the Routing was prepared with {router_logits.router!r}"
            )
        return router_logits
    return Routing(_checked(router_logits, "router_logits", check), router, check)


def routing_probs(router_logits: Tensor | Sequence[Tensor], *, router: str = "softmax") -> Tensor:
    """Router probabilities over all experts, before top-k and renormalisation.

    Args:
        router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
        router: ``"softmax"``, or ``"sigmoid"`` for routers that score experts independently:
            ``sigmoid(z) / sum(sigmoid(z))``; ``"sqrtsoftplus"`` (DeepSeek-V4):
            ``sqrt(softplus(z)) / sum(sqrt(softplus(z)))``.

    Returns:
        Probabilities ``(L, T, E)``, float32 or wider, rows summing to 1.
    """
    return prepare_routing(router_logits, router=router).probs


def probabilities(z: Tensor, router: str) -> Tensor:
    if router == "softmax":
        return torch.softmax(z, dim=-1)  # (L, T, E)
    if router == "sqrtsoftplus":  # DeepSeek-V4: sqrt(softplus(z)), normalised in log space
        tiny = torch.finfo(z.dtype).tiny
        log_score = 0.5 * torch.nn.functional.softplus(z).clamp_min(tiny).log()  # (L, T, E)
        return torch.softmax(log_score, dim=-1)  # (L, T, E)
    # sigmoid(z) / sum(sigmoid(z)) normalised in log space: sigmoid underflows to 0 for logits
    # below about -104 (float32), and a token whose every logit does would give 0 / 0.
    return torch.softmax(torch.nn.functional.logsigmoid(z), dim=-1)  # (L, T, E)


def modality_onehot(ids: Tensor, modalities: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``(M, T)``: 1 where token ``t`` has modality ``modalities[m]`` (-1 tokens match none)."""
    return (ids[None, :] == ids.new_tensor(tuple(modalities))[:, None]).to(dtype)


def modality_sums(
    r: Routing,
    ids: Tensor,
    modalities: tuple[int, ...],
    group: torch.distributed.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-modality probability sums ``(L, M, E)`` and token counts ``(M,)``, over the local batch
    or, with ``group``, the global one (gradient through the local part, see
    :func:`smar.collective.all_reduce_sums`)."""
    onehot = modality_onehot(ids, modalities, r.dtype)  # (M, T)
    sums = r.weighted_sums(onehot)  # (L, M, E)
    counts = onehot.sum(dim=1)  # (M,)
    if group is not None:
        reduced = all_reduce_sums({"sums": sums, "counts": counts}, group)
        sums, counts = reduced["sums"], reduced["counts"]
    return sums, counts


def modality_distributions(
    router_logits: Tensor | Sequence[Tensor] | Routing,
    modality_ids: Tensor,
    *,
    modalities: Sequence[int] = (0, 1),
    router: str = "softmax",
    group: torch.distributed.ProcessGroup | None = None,
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
    mods = check_modalities(modalities)
    r = prepare_routing(router_logits, router=router)
    ids = modality_ids_flat(modality_ids, r.shape[1])
    sums, counts = modality_sums(r, ids, mods, group)
    P = sums / counts[None, :, None]  # (L, M, E); 0/0 = NaN for an absent modality
    return P, counts


def jeffreys(p: Tensor, q: Tensor) -> Tensor:
    """Symmetric KL ``KL(p||q) + KL(q||p)`` over the last dim, each clamped below at EPS."""
    return ((p - q) * (p.clamp_min(EPS).log() - q.clamp_min(EPS).log())).sum(dim=-1)


def entropy(p: Tensor) -> Tensor:
    """Entropy over the last dim, in nats; ``0 log 0 = 0``."""
    return -(p * p.clamp_min(EPS).log()).sum(dim=-1)
