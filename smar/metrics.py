"""Routing statistics for analysis: never part of the gradient.

:class:`RoutingStats` accumulates, over any number of batches, per-layer and per-modality sums of
router probability, top-k selection counts, per-token entropies and token counts. Its memory is
``O(L * M * E)`` whatever the number of tokens seen, and two accumulators merge exactly (across
evaluation shards or data-parallel ranks).

Shapes legend: L MoE layers, T tokens, E experts, K top-k, M modalities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from smar.distributions import (
    as_logits,
    check_modalities,
    check_router,
    check_top_k,
    entropy,
    jeffreys,
    modality_ids_flat,
    modality_onehot,
    probabilities,
)
from smar.errors import UsageError
from smar.losses import check_logits

__all__ = ["RoutingStats", "MODALITY_NAMES"]

MODALITY_NAMES = {0: "text", 1: "image", 2: "video", 3: "audio"}


def _name(m: int) -> str:
    return MODALITY_NAMES.get(m, f"modality{m}")


class RoutingStats:
    """Streaming accumulator of routing statistics per layer and modality.

    Args:
        modalities: modality ids to track (tokens with other ids, e.g. -1, are skipped).
        router: ``"softmax"`` or ``"sigmoid"``, as in :func:`smar.routing_probs`.

    Example:
        >>> stats = RoutingStats()
        >>> stats.update(router_logits, modality_ids, top_k=2)   # doctest: +SKIP
        >>> stats.summary()["routing/layer00/mrd"]               # doctest: +SKIP
    """

    def __init__(self, modalities: Sequence[int] = (0, 1), *, router: str = "softmax"):
        check_router(router)
        self.modalities = check_modalities(modalities)
        self.router = router
        self.top_k: int | None = None
        self.prob_sum: Tensor | None = None  # (L, M, E) float64
        self.select_count: Tensor | None = None  # (L, M, E) float64: top-k slots
        self.entropy_sum: Tensor | None = None  # (L, M) float64: sum of per-token H(p_t)
        self.tokens: Tensor | None = None  # (M,) float64

    @property
    def num_layers(self) -> int | None:
        return None if self.prob_sum is None else self.prob_sum.shape[0]

    @property
    def num_experts(self) -> int | None:
        return None if self.prob_sum is None else self.prob_sum.shape[2]

    @torch.no_grad()
    def update(
        self, router_logits: Tensor | Sequence[Tensor], modality_ids: Tensor, *, top_k: int
    ) -> RoutingStats:
        """Adds one batch.

        Shapes:
            router_logits: L tensors (T, E) or one (L, T, E) tensor of raw logits.
            modality_ids: (T,) or (B, S) integer ids; -1 ignored.
        """
        check_logits(router_logits)
        z = as_logits(router_logits).detach()
        L, T, E = z.shape
        check_top_k(top_k, E)
        ids = modality_ids_flat(modality_ids, T)
        tracked = torch.isin(ids, ids.new_tensor(self.modalities))  # (T,)
        if not bool(tracked.any()) and bool((ids >= 0).any()):
            seen = sorted(set(ids[ids >= 0].unique()[:4].tolist()))
            raise UsageError(
                f"modality_ids hold ids {seen} but none of the tracked modalities "
                f"{self.modalities}: the batch would add nothing; fix: RoutingStats(modalities="
                f"{tuple(sorted(set(self.modalities) | set(seen)))}), or count them as one with "
                "smar.modality.group_modalities"
            )
        if self.prob_sum is None:
            M = len(self.modalities)
            self.top_k = top_k
            self.prob_sum = torch.zeros(L, M, E, dtype=torch.float64)
            self.select_count = torch.zeros(L, M, E, dtype=torch.float64)
            self.entropy_sum = torch.zeros(L, M, dtype=torch.float64)
            self.tokens = torch.zeros(M, dtype=torch.float64)
        elif (L, E) != (self.num_layers, self.num_experts) or top_k != self.top_k:
            raise UsageError(
                f"batch has L={L}, E={E}, top_k={top_k} but the accumulator holds "
                f"L={self.num_layers}, E={self.num_experts}, top_k={self.top_k}"
            )
        prob_sum, select_count, entropy_sum, tokens = self._require_data()  # added to in place
        probs = probabilities(z, self.router)  # (L, T, E)
        onehot = modality_onehot(ids, self.modalities, probs.dtype)  # (M, T)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (L, T, K)
        selected = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)  # (L, T, E) 0/1
        prob_sum += torch.matmul(onehot, probs).double().cpu()  # (L, M, E)
        select_count += torch.matmul(onehot, selected).double().cpu()  # (L, M, E)
        ent = torch.matmul(onehot, entropy(probs).unsqueeze(-1)).squeeze(-1)  # (L, M)
        entropy_sum += ent.double().cpu()
        tokens += onehot.sum(dim=1).double().cpu()
        return self

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Adds another accumulator's counts into this one (in place) and returns self."""
        if other.prob_sum is None:
            return self
        theirs = other._require_data()
        if other.modalities != self.modalities or other.router != self.router:
            raise UsageError("cannot merge RoutingStats with different modalities or router")
        if self.prob_sum is None:
            self.top_k = other.top_k
            self.prob_sum, self.select_count, self.entropy_sum, self.tokens = (
                t.clone() for t in theirs
            )
            return self
        if other.prob_sum.shape != self.prob_sum.shape or other.top_k != self.top_k:
            raise UsageError(
                f"cannot merge RoutingStats of shape {tuple(other.prob_sum.shape)}, top_k="
                f"{other.top_k} into {tuple(self.prob_sum.shape)}, top_k={self.top_k}"
            )
        for mine, t in zip(self._require_data(), theirs, strict=True):
            mine += t  # in place
        return self

    def all_reduce(self, group: torch.distributed.ProcessGroup | None = None) -> RoutingStats:
        """Sums the statistics over a ``torch.distributed`` process group, in place."""
        import torch.distributed as dist

        if self.prob_sum is None:
            raise UsageError("RoutingStats.all_reduce: no batch was added on this rank")
        for t in self._require_data():
            dist.all_reduce(t, group=group)
        return self

    def distributions(self) -> Tensor:
        """Modality routing distributions ``P`` ``(L, M, E)``; NaN rows for unseen modalities."""
        prob_sum, _, _, tokens = self._require_data()
        return prob_sum / tokens[None, :, None]

    def mrd(self, text: int = 0, image: int = 1) -> Tensor:
        """Per-layer MRD ``(L,)`` over everything seen; NaN if a modality was never seen."""
        P = self.distributions()
        i, j = self.modalities.index(text), self.modalities.index(image)
        return jeffreys(P[:, i], P[:, j])  # (L,); NaN propagates from an unseen modality

    def mrd_matrix(self) -> Tensor:
        """The MRD of every pair of tracked modalities ``(L, M, M)``, over everything seen:
        symmetric, 0 on the diagonal, NaN in the rows and columns of a modality never seen."""
        P = self.distributions()  # (L, M, E)
        D = jeffreys(P[:, :, None, :], P[:, None, :, :])  # (L, M, M)
        seen = self._require_data()[3] > 0  # (M,) tokens seen
        both = seen[:, None] & seen[None, :]  # (M, M)
        return torch.where(both[None], D, torch.full_like(D, float("nan")))

    def load(self) -> Tensor:
        """Expert load per modality ``(L, M, E)``: share of each modality's top-k slots."""
        _, select_count, _, tokens = self._require_data()
        assert self.top_k is not None  # set with the sums
        return select_count / (tokens[None, :, None] * self.top_k)

    def _require_data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``prob_sum, select_count, entropy_sum, tokens`` (the first batch sets them all)."""
        p, s, h, n = self.prob_sum, self.select_count, self.entropy_sum, self.tokens
        if p is None or s is None or h is None or n is None:
            raise UsageError("RoutingStats is empty: call update() with at least one batch first")
        return p, s, h, n

    def summary(self) -> dict[str, float]:
        """A flat dict of floats with slash names, per layer ``routing/layerNN/...``:

        - ``mrd``: text vs each other modality (``mrd`` for image, ``mrd/video``...), NaN when a
          modality was not seen;
        - ``load/<modality>/expertEE``: share of the modality's top-k slots per expert;
        - ``share/<modality>/expertEE``: modality composition of each expert (share of its slots);
        - ``imbalance``: max over experts of the all-token load divided by the balanced load 1/E
          (1.0 is perfectly balanced, E is one expert taking everything; NaN when no token of a
          tracked modality was seen);
        - ``entropy/<modality>``: mean per-token routing entropy / log(E) (1 = uniform);
        - ``entropy_mean/<modality>``: entropy of the modality's mean distribution / log(E).

        Plus ``routing/tokens/<modality>`` and the layer means ``routing/mrd``,
        ``routing/imbalance``.
        """
        prob_sum, select_count, entropy_sum, tokens = self._require_data()
        L, M, E = prob_sum.shape
        names = [_name(m) for m in self.modalities]
        P = self.distributions()  # (L, M, E)
        load = self.load()  # (L, M, E)
        slots = select_count.sum(dim=1)  # (L, E)
        share = select_count / slots.clamp_min(1.0)[:, None, :]  # (L, M, E)
        all_load = slots / slots.sum(dim=-1, keepdim=True)  # (L, E); NaN when nothing was seen
        imbalance = all_load.max(dim=-1).values * E  # (L,)
        tok_entropy = entropy_sum / tokens[None, :] / math.log(E)  # (L, M)
        mean_entropy = entropy(P) / math.log(E)  # (L, M)
        out: dict[str, float] = {}
        for m, name in enumerate(names):
            out[f"routing/tokens/{name}"] = float(tokens[m])
        mrds = {}
        if 0 in self.modalities:
            for m in self.modalities:
                if m != 0:
                    mrds[m] = self.mrd(0, m)  # (L,)
        for layer in range(L):
            pre = f"routing/layer{layer:02d}"
            for m, d in mrds.items():
                key = f"{pre}/mrd" if m == 1 else f"{pre}/mrd/{_name(m)}"
                out[key] = float(d[layer])
            out[f"{pre}/imbalance"] = float(imbalance[layer])
            for mi, name in enumerate(names):
                out[f"{pre}/entropy/{name}"] = float(tok_entropy[layer, mi])
                out[f"{pre}/entropy_mean/{name}"] = float(mean_entropy[layer, mi])
                for e in range(E):
                    out[f"{pre}/load/{name}/expert{e:02d}"] = float(load[layer, mi, e])
                    out[f"{pre}/share/{name}/expert{e:02d}"] = float(share[layer, mi, e])
        if 1 in mrds:
            out["routing/mrd"] = float(mrds[1].mean())
        out["routing/imbalance"] = float(imbalance.mean())
        return out
