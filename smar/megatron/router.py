"""The router: Megatron-Core's ``TopKRouter`` with SMAR's modality bias and band loss.

Routing: the bias ``b[m(t)]`` is added to the logits, then Megatron's own ``routing`` runs on
them (top-k, z-loss, load balancing, token dropping unchanged); the band loss is attached to the
probabilities with Megatron's ``attach_and_log_load_balancing_loss`` (``MoEAuxLossAutoScaler``,
the coefficient convention, the per-token-loss scaling of the installed version).

Statistics: the per-modality probability sums and counts are summed over the router's
tensor+data+context-parallel group (one all-reduce per MoE layer and micro-batch), so that a
TP/SP/CP/DP split gives the loss of one process on the whole micro-batch. The gradient goes
through the local part, scaled by the data-parallel size: Megatron sums a sequence-parallel
parameter's gradient over TP, averages over data+context parallel, and scales aux losses by the
context-parallel size in the schedule, so that the reduced gradient is one process's. Expert
parallelism does not change what a router sees.

Shapes legend: B batch, S sequence (this rank's), T = S * B tokens of the router, E experts,
M modalities.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smar.distributions import prepare_routing
from smar.errors import UsageError
from smar.losses import routing_objective
from smar.megatron import ids as current_ids
from smar.megatron.config import BAND_LOSS, MRD, SMARRouterConfig

try:
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"smar.megatron.SMARRouter needs megatron-core ({e}); fix: pip install 'smar[megatron]'"
    ) from e

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["SMARRouter"]


class SMARRouter(TopKRouter):
    """Megatron-Core's ``TopKRouter`` with SMAR's modality bias and band loss.

    Build it through the module spec: ``MoESubmodules(router=smar_router(SMARRouterConfig()))``
    or :func:`use_smar_router`. Each forward reads the modality ids set by :func:`modality_ids`
    and fails, naming the fix, when there are none or they do not match the router's tokens.
    With a zero bias and ``smar_weight=0`` its outputs are Megatron's own, bit for bit.

    Args:
        config: Megatron's ``TransformerConfig``.
        pg_collection: Megatron's process groups (as ``TopKRouter``).
        smar: SMAR's options.
        **kwargs: passed to ``TopKRouter`` (e.g. ``is_mtp_layer`` in megatron-core >= 0.17).

    Shapes:
        ``modality_bias`` ``(M, E)``; logits ``(S, B, E)`` viewed as ``(T, E)``, T = S * B.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        smar: SMARRouterConfig | None = None,
        **kwargs: Any,
    ):
        if pg_collection is None:
            pg_collection = moe_utils.get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.smar = SMARRouterConfig() if smar is None else smar
        if not isinstance(self.smar, SMARRouterConfig):
            raise TypeError(f"smar must be a SMARRouterConfig; got {type(self.smar).__name__}")
        self.smar.layer_band(1, config.num_layers)  # a band that does not fit fails here
        self.modality_bias: torch.nn.Parameter | None = None
        if self.smar.modality_bias:
            M, E = self.smar.num_modalities, config.num_moe_experts
            self.modality_bias = torch.nn.Parameter(torch.zeros(M, E, device=self.weight.device))
            # its gradient comes from this rank's tokens: summed over TP under sequence
            # parallelism by finalize_model_grads, like the router weight
            setattr(self.modality_bias, "sequence_parallel", config.sequence_parallel)  # noqa: B010
        self._ids_checked = False
        self._replay: deque[Tensor] = deque()  # ids of checkpointed forwards, for recomputation

    # -- modality ids ---------------------------------------------------------------------------

    def _ids_of_this_forward(self) -> Tensor:
        """The ids set around this forward; for a forward that activation recomputation re-runs
        in the backward pass (outside :func:`modality_ids`), those of the checkpointed forward.

        Megatron's recomputation (``tensor_parallel.checkpoint``, full or ``moe`` selective) runs
        the forward without gradients, then again in the backward pass, micro-batches in the
        order of their forwards: the first run keeps its ids, the second takes them back.
        """
        ids = current_ids.current()
        where = f"SMARRouter (layer {self.layer_number})"
        if self.training and not torch.is_grad_enabled() and ids is not None:
            self._replay.append(ids)  # a checkpointed forward (evaluation runs in eval mode)
        elif ids is None and _in_backward():
            if not self._replay:
                raise UsageError(
                    f"{where} re-ran in the backward pass (activation recomputation) but its "
                    "first forward had no modality ids; fix: run the model's forward inside "
                    "`with smar.megatron.modality_ids(ids):`"
                )
            ids = self._replay.popleft()
        if ids is None:
            raise UsageError(
                f"{where} got no modality ids for this forward; fix: run the model inside "
                "`with smar.megatron.modality_ids(ids):` with ids (B, S) shaped like its "
                "input_ids (torch.zeros_like(input_ids) for text only)"
            )
        return ids

    def _modality_ids(
        self, S: int, B: int, device: torch.device, padding_mask: Tensor | None
    ) -> Tensor:
        """The ids of this router's ``T = S * B`` tokens, ``(T,)`` in the logits' row order."""
        ids = self._ids_of_this_forward()
        where = f"SMARRouter (layer {self.layer_number})"
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise UsageError(f"{where}: modality ids must be integers; got {ids.dtype}")
        tp = self.tp_group.size() if self.tp_group is not None else 1
        sp = self.config.sequence_parallel and tp > 1
        Bi, Si = ids.shape
        if Bi != B or Si != (S * tp if sp else S):
            split = f" split over tensor-parallel size {tp} (sequence parallel)" if sp else ""
            raise UsageError(
                f"{where} routes S={S} x B={B} tokens but the modality ids have shape "
                f"{(Bi, Si)}{split}; fix: pass ids shaped like the input_ids of this forward "
                "(B, S), sliced for context parallelism like the batch (get_batch_on_this_cp_rank)"
            )
        ids = ids.to(device=device, dtype=torch.long).t()  # (S_all, B), the logits' layout
        if sp:  # this rank's sequence-parallel chunk, as the embedding's scatter takes it
            ids = ids.chunk(tp, dim=0)[self.tp_group.rank()]  # (S, B)
        ids = ids.reshape(-1)  # (T,) row-major over (S, B)
        if padding_mask is not None:  # Megatron's padding_mask is True at padding
            ids = ids.masked_fill(padding_mask.reshape(-1).to(ids.device), -1)
        if not self._ids_checked:  # once: the check waits for the device
            top = int(ids.max()) if ids.numel() else -1
            if top >= self.smar.num_modalities or (ids.numel() and int(ids.min()) < -1):
                raise UsageError(
                    f"{where}: modality ids must lie in -1..{self.smar.num_modalities - 1}; got "
                    f"{int(ids.min())}..{top}; fix: raise SMARRouterConfig.num_modalities or map "
                    "the ids (0 text, 1 image, -1 ignore)"
                )
            self._ids_checked = True
        return ids

    def _add_bias(self, logits: Tensor, ids: Tensor) -> Tensor:
        """``z + b[m(t)]``; tokens with id -1 get none."""
        bias = self.modality_bias
        assert bias is not None  # called with the bias only
        if bias.device != logits.device:  # as TopKRouter.gating moves its weight
            bias.data = bias.data.to(logits.device)
        M, E = bias.shape
        valid = (ids >= 0).unsqueeze(-1)  # (T, 1)
        add = bias[ids.clamp(0, M - 1)] * valid  # (T, E)
        return logits + add.to(logits.dtype).view(logits.shape)

    # -- statistics -------------------------------------------------------------------------------

    def _stats_group(self) -> tuple[torch.distributed.ProcessGroup | None, float]:
        """The group the sums are reduced over, and the gradient scale of the local part."""
        group = self.tp_dp_cp_group if self.smar.stats == "global" else None
        if group is None or group.size() <= 1:
            return None, 1.0
        # all_reduce_sums scales the local gradient by the group's size; Megatron sums the
        # router's gradients over TP (sequence parallel) and, with the schedule's CP factor,
        # averages over DP: the local part wants the data-parallel size
        dp = group.size() // self.tp_cp_group.size()
        return group, dp / group.size()

    def _smar_terms(self, logits: Tensor, ids: Tensor) -> dict[str, Tensor]:
        """The band loss and the MRD of this layer from logits ``(T, E)``."""
        group, scale = self._stats_group()
        z = logits.float()
        if scale != 1.0:  # same values, gradient scaled
            z = z.detach() + scale * (z - z.detach())
        r = prepare_routing(z[None], router=self.score_function, check=False)  # (1, T, E)
        band = self.smar.layer_band(self.layer_number, self.config.num_layers)
        with contextlib.nullcontext() if self.smar.smar_weight else torch.no_grad():
            _, terms = routing_objective(
                r, ids, top_k=self.topk, smar_weight=1.0 if self.smar.smar_weight else 0.0,
                band=band, hinge=self.smar.hinge, lb_weight=0.0, text=self.smar.text,
                image=self.smar.image, router=self.score_function, group=group,
            )  # fmt: skip
        return terms

    def routing(
        self, logits: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Megatron's routing on the biased logits, with the band loss attached to ``probs``.

        Args:
            logits: ``(S, B, E)`` from the gating.
            padding_mask: ``(S, B)``, True at padding (Megatron's convention), or None.
        """
        S, B = logits.shape[:2]
        ids = self._modality_ids(S, B, logits.device, padding_mask)  # (T,)
        if self.modality_bias is not None:
            logits = self._add_bias(logits, ids)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training and torch.is_grad_enabled():
            terms = self._smar_terms(logits.reshape(-1, logits.shape[-1]), ids)
            self._record(MRD, torch.nan_to_num(terms["mrd"][0], nan=0.0))
            if self.smar.smar_weight:
                probs = self._attach(probs, terms["band"], padding_mask)
        return probs, routing_map

    # -- Megatron's aux-loss machinery ------------------------------------------------------------

    def _attach(self, probs: Tensor, band: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Attaches ``smar_weight * band`` to ``probs`` and logs ``band``, as Megatron's own
        load-balancing losses are. The band is the same on every rank of the statistics group:
        it is logged without a reduce group (a data-parallel average of equal values)."""
        w = float(self.smar.smar_weight)
        valid = None if padding_mask is None else (~padding_mask.reshape(-1)).sum()
        return self.attach_and_log_load_balancing_loss(
            probs, w, w * band.to(probs.dtype), BAND_LOSS, None, valid_token_count=valid
        )

    def _record(self, name: str, value: Tensor) -> None:
        """Logs a per-layer value in Megatron's aux-loss tracker (its 0.17+ metrics tracker,
        else ``save_to_aux_losses_tracker``)."""
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer = self.layer_number
        if layer is not None and getattr(self, "is_mtp_layer", False):
            layer = layer + self.config.num_layers
        tracker = _metrics_tracker()
        if tracker is not None:
            tracker.record(name, value.detach(), layer, num_layers)
        else:
            moe_utils.save_to_aux_losses_tracker(name, value.detach(), layer, num_layers)

    def extra_repr(self) -> str:
        s = self.smar
        return (f"smar_weight={s.smar_weight}, band={s.band}, modalities={s.num_modalities}, "
                f"bias={s.modality_bias}, stats={s.stats!r}")  # fmt: skip


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (where recomputation runs forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _metrics_tracker() -> Any:
    """megatron-core >= 0.17's ``MoEMetricsTracker``, or None on older versions."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()
