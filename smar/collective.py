"""Routing statistics over more than the local micro-batch: the global batch of a data-parallel
run, and the micro-batches of one optimizer step under gradient accumulation.

SMAR's distributions and the load-balancing statistics are ratios of sums over tokens
(docs/method.md#global-batch). Here the sums of one forward are made global with **one**
all-reduce (every statistic packed into one buffer), keeping the gradient through the local part
only, scaled by the world size: data-parallel engines average gradients over ranks, so the averaged
router gradient equals that of one process on the concatenated batch. :class:`StepSums` adds the
sums of the earlier micro-batches of the optimizer step (detached), as Megatron-Core's
``global_aux_loss`` does with its expert counts.

Nothing here synchronises the host with the device: collectives are enqueued like any other
kernel.

Shapes legend: L MoE layers, E experts, M modalities.

This module imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smar.errors import UsageError

__all__ = ["default_group", "all_reduce_sums", "StepSums", "CarriedSums"]

STATS = ("global", "local")


def default_group(
    stats: str = "global", group: torch.distributed.ProcessGroup | None = None
) -> torch.distributed.ProcessGroup | None:
    """The process group routing statistics are reduced over, or None for local statistics.

    Args:
        stats: ``"global"`` (reduce over ``group`` when ``torch.distributed`` is initialised with
            more than one process) or ``"local"`` (never reduce).
        group: a process group; None means the default (world) group, which is the data-parallel
            group of DDP, FSDP and DeepSpeed ZeRO without model parallelism.

    Returns:
        The group, or None when there is nothing to reduce over.
    """
    if stats not in STATS:
        raise UsageError(f"stats must be one of {STATS}; got {stats!r}")
    if stats == "local":
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(group) <= 1:
        return None
    return dist.group.WORLD if group is None else group


def all_reduce_sums(
    parts: dict[str, Tensor], group: torch.distributed.ProcessGroup | None
) -> dict[str, Tensor]:
    """Sums every tensor of ``parts`` over ``group`` in one all-reduce.

    Each result's value is the global sum; its gradient flows through the local tensor only,
    multiplied by the world size (see the module docstring). Tensors without gradient stay
    without. ``group=None`` returns ``parts`` unchanged.
    """
    if group is None or not parts:
        return parts
    import torch.distributed as dist

    names = list(parts)
    flat = torch.cat([parts[n].detach().reshape(-1).to(torch.float64) for n in names])
    dist.all_reduce(flat, group=group)
    world = dist.get_world_size(group)
    out, offset = {}, 0
    for n in names:
        x = parts[n]
        total = flat[offset : offset + x.numel()].view(x.shape).to(x.dtype)
        offset += x.numel()
        out[n] = total + world * (x - x.detach()) if x.requires_grad else total
    return out


class StepSums:
    """The sums of the earlier micro-batches of one optimizer step, added to the current ones.

    ``combine(parts, counts)`` returns, for each statistic, the sum over micro-batches ``1..k``
    of the step (the earlier ones detached). The gradient of micro-batch ``k`` goes through its
    own sums, scaled by ``N_{1..k} / N_k`` (tokens so far over tokens of this micro-batch, per
    modality or per token count named in ``counts``): each micro-batch then gets the gradient it
    would get from its own statistics (as without accumulation), but evaluated at the pooled,
    less noisy statistics of the step so far. The loss of the last micro-batch is the whole
    step's. Call :meth:`reset` when the optimizer steps.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def reset(self) -> None:
        self._sums = {}

    def combine(
        self, parts: dict[str, Tensor], scale_by: dict[str, tuple[str, int | None]]
    ) -> dict[str, Tensor]:
        """Pools ``parts`` with the step's earlier sums.

        Args:
            parts: statistics of this micro-batch (global ones, if reduced).
            scale_by: for each statistic with gradient, ``(count, axis)``: the name of the count
                in ``parts`` that normalises it, and the axis of the statistic that the count's
                one dimension indexes (None for a scalar count).
        """
        if self._sums and set(self._sums) != set(parts):
            raise UsageError(
                f"the routing statistics changed within an optimizer step ({sorted(self._sums)} "
                f"then {sorted(parts)}): call reset() after optimizer.step()"
            )
        pooled = {
            n: (self._sums[n] + x.detach()) if self._sums else x.detach() for n, x in parts.items()
        }
        out = {}
        for n, x in parts.items():
            if not x.requires_grad:
                out[n] = pooled[n]
                continue
            count, axis = scale_by[n]
            now, so_far = parts[count].detach(), pooled[count]
            scale = torch.where(now > 0, so_far / now.clamp_min(1e-12), torch.ones_like(now))
            if axis is not None:  # (M,) -> broadcastable against the statistic, e.g. (1, M, 1)
                scale = scale.reshape([-1 if d == axis else 1 for d in range(x.dim())])
            out[n] = pooled[n] + scale * (x - x.detach())
        self._sums = pooled
        return out


class CarriedSums:
    """A reference for a modality absent from the batch: its routing the last time it was seen.

    With sample-level ids (``SMARConfig(modality="sample")``) and a small pure-text share, most
    batches hold no text sample, so text-image has no MRD and the band loss nothing to act on
    there. ``fill(sums, counts)`` keeps, per modality, the (detached) probability sums and token
    counts of the last forward in which it was present, and puts them in for a modality the
    current forward lacks: the pair is then held in its band against that reference, with the
    gradient through the present modality alone. The decision is made on the device from the
    counts given (the global ones under ``stats="global"``, so that every rank decides alike),
    without waiting for it.

    Shapes:
        sums: ``(L, M, E)``.  counts: ``(M,)``.
    """

    def __init__(self) -> None:
        self._sums: Tensor | None = None  # (L, M, E), detached
        self._counts: Tensor | None = None  # (M,)

    def reset(self) -> None:
        self._sums = self._counts = None

    def fill(self, sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        if self._sums is None or self._counts is None or self._sums.shape != sums.shape:
            self._sums, self._counts = torch.zeros_like(sums.detach()), torch.zeros_like(counts)
        present = counts > 0  # (M,)
        out_sums = torch.where(present[None, :, None], sums, self._sums.to(sums.dtype))
        out_counts = torch.where(present, counts, self._counts.to(counts.dtype))
        self._sums = torch.where(present[None, :, None], sums.detach(), self._sums)
        self._counts = torch.where(present, counts.detach(), self._counts)
        return out_sums, out_counts
