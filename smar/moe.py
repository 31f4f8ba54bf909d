"""Mixture-of-experts building blocks: a router with a modality-aware bias, hard modality routing
and a top-k SwiGLU MoE block (MoE-LLaVA style upcycling of a dense FFN into one is
:mod:`smar.upcycle`).

Shape legend:
    T tokens (batch x sequence, flattened)   D model width   F expert hidden width
    E experts   K experts per token (top-k)   M modalities

The router returns raw logits ``(T, E)`` after the modality bias and the hard-routing mask: the
canonical routing data that :mod:`smar.losses` consumes. The MoE block keeps the last ones in
``block.last_router_logits`` so that a model can hand them to the losses without hooks.

Inside :func:`weight_gradient_stop`, chosen tokens (the image tokens, for a control) compute the
same outputs but give nothing to the expert and router weights' gradients; the gradient to the
block's input, and through it to everything upstream (a projector), is unchanged.

Expert weights are stored stacked, in the layout of transformers' MoE experts
(``gate_up_proj (E, 2F, D)``, ``down_proj (E, D, F)``), so that a block can be copied to and from
Hugging Face models without reshaping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smar.errors import UsageError
from smar.experts import grouped_experts

__all__ = [
    "Router",
    "MoEBlock",
    "SwiGLU",
    "default_partition",
    "weight_gradient_stop",
]


def default_partition(num_experts: int, num_modalities: int = 2) -> list[list[int]]:
    """Splits ``range(num_experts)`` into ``num_modalities`` contiguous, near-equal groups.

    With 4 experts and 2 modalities: text gets experts ``[0, 1]``, image ``[2, 3]``.
    """
    if num_experts < num_modalities:
        raise UsageError(
            f"hard routing needs at least one expert per modality: num_experts={num_experts} < "
            f"num_modalities={num_modalities}"
        )
    bounds = [round(i * num_experts / num_modalities) for i in range(num_modalities + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_modalities)]


class Router(nn.Module):
    """A linear gate with an optional per-modality bias and an optional hard modality partition.

    Args:
        dim: model width ``D``.
        num_experts: ``E``.
        num_modalities: ``M``, the number of modality ids the bias and the partition know
            (0 text, 1 image, ...).
        modality_bias: add a trainable, zero-initialised bias ``(M, E)`` to each token's logits
            by its modality (``docs/method.md#modality-bias``). Tokens with modality ``-1`` get
            no bias.
        hard: mask every expert outside the token's modality group to ``-inf`` before top-k.
        partition: for ``hard``, the expert indices of each modality (default: contiguous halves).
            Tokens with modality ``-1`` are not masked.

    Shapes:
        ``x (T, D)``, ``modality_ids (T,)``, ``stop (T,)`` bool or None -> logits ``(T, E)``;
        rows where ``stop`` is True give no gradient to the weight and the bias, and the usual
        gradient to ``x``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        num_modalities: int = 2,
        modality_bias: bool = False,
        hard: bool = False,
        partition: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if num_experts < 1:
            raise UsageError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.num_modalities = num_modalities
        self.hard = hard
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        self.bias = (
            nn.Parameter(torch.zeros(num_modalities, num_experts)) if modality_bias else None
        )
        if hard:
            groups = (
                default_partition(num_experts, num_modalities) if partition is None else partition
            )
            if len(groups) != num_modalities:
                raise UsageError(
                    f"partition has {len(groups)} groups but num_modalities={num_modalities}: "
                    "give one list of expert indices per modality"
                )
            allowed = torch.zeros(num_modalities, num_experts, dtype=torch.bool)  # (M, E)
            for m, group in enumerate(groups):
                if not group or any(not 0 <= e < num_experts for e in group):
                    raise UsageError(
                        f"partition[{m}]={list(group)} must be a non-empty list of expert indices "
                        f"in [0, {num_experts})"
                    )
                allowed[m, list(group)] = True
            self.register_buffer("allowed", allowed, persistent=False)
            self.partition: list[list[int]] | None = [list(g) for g in groups]
        else:
            self.allowed: torch.Tensor | None = None
            self.partition = None

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        stop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # (T, E)
        if stop is not None:
            logits = _stop_weight_gradient(logits, x, self.weight, stop[:, None])
        logits = logits.float()  # routing in float32
        if self.bias is None and not self.hard:
            return logits
        if modality_ids is None:
            raise UsageError(
                "this router has a modality bias or hard routing and needs modality_ids (T,) "
                "(0 text, 1 image, -1 none)"
            )
        mod = modality_ids.reshape(-1)  # (T,)
        if mod.shape[0] != logits.shape[0]:
            raise UsageError(
                f"modality_ids has {mod.shape[0]} entries but the router saw "
                f"{logits.shape[0]} tokens"
            )
        if mod.numel() and int(mod.max()) >= self.num_modalities:
            raise UsageError(
                f"modality_ids contains {int(mod.max())} but the router knows num_modalities="
                f"{self.num_modalities}"
            )
        valid = mod >= 0  # (T,)
        index = mod.clamp(min=0)  # (T,)
        if self.bias is not None:
            bias = self.bias[index] * valid[:, None]  # (T, E)
            if stop is not None:
                bias = torch.where(stop[:, None], bias.detach(), bias)
            logits = logits + bias
        if self.hard and self.allowed is not None:  # allowed is set when hard
            blocked = ~self.allowed[index] & valid[:, None]  # (T, E)
            logits = logits.masked_fill(blocked, float("-inf"))
        return logits

    def extra_repr(self) -> str:
        return (
            f"dim={self.weight.shape[1]}, num_experts={self.num_experts}, "
            f"modality_bias={self.bias is not None}, hard={self.hard}"
        )


def _stop_weight_gradient(
    z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stop: torch.Tensor
) -> torch.Tensor:
    """``z = F.linear(x, weight)`` with the rows where ``stop (T, 1)`` is True cut from the
    gradients of ``weight`` (and of anything a wrapper added to ``z``), their gradient to ``x``
    kept: those rows become ``z.detach() + (p - p.detach())`` with ``p`` the product by the
    detached weight, the same bits as ``z`` (``p - p`` is an exact zero). ``z`` itself is not
    recomputed, so a wrapper that transformed it (the modality bias of :mod:`smar.bias`, which
    acts on the first ``F.linear``) keeps its effect on every row."""
    p = F.linear(x, weight.detach())  # (T, E), gradient to x only
    return torch.where(stop, z.detach() + (p - p.detach()), z)


@contextlib.contextmanager
def weight_gradient_stop(module: nn.Module, stop: torch.Tensor | None) -> Iterator[None]:
    """Within it, the tokens where ``stop`` is True give nothing to the weight gradients of every
    :class:`MoEBlock` in ``module`` (experts' ``gate_up_proj`` and ``down_proj``, the router's
    weight and modality bias) and change nothing else: the outputs are the same bits, and the
    gradient to each block's input (so to the layers and the projector upstream) is the one
    without the stop. A control that removes the image tokens' share of the MoE weights' updates
    while the projector still learns.

    Args:
        module: a model holding :class:`MoEBlock` s (``smar.upcycle_hf``'s, the testbed's).
        stop: bool, whose ``reshape(-1)`` lines up with each block's tokens ``x.reshape(-1, D)``:
            ``(B, S)`` for hidden states ``(B, S, D)``; e.g. ``input_ids == image_token_id``.
            ``None``: no stop.

    Example::

        with weight_gradient_stop(model, input_ids == image_token_id):
            model(input_ids=input_ids, labels=labels).loss.backward()
    """
    blocks = [m for m in module.modules() if isinstance(m, MoEBlock)]
    if stop is not None:
        if not blocks:
            raise UsageError(
                f"{type(module).__name__} holds no smar.moe.MoEBlock: weight_gradient_stop acts on "
                "those only (upcycle the model with smar.upcycle_hf or smar.moe.upcycle)"
            )
        if stop.dtype != torch.bool:
            raise UsageError(f"stop must be a bool tensor (True: stop), got {stop.dtype}")
        stop = stop.reshape(-1)  # (T,)
    before = [b.grad_stop for b in blocks]
    try:
        for b in blocks:
            b.grad_stop = stop
        yield
    finally:
        for b, old in zip(blocks, before, strict=True):
            b.grad_stop = old


class SwiGLU(nn.Module):
    """The dense feed-forward block ``down(silu(gate(x)) * up(x))`` (Llama, Qwen, Mistral)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """``E`` SwiGLU experts behind a :class:`Router`, top-k with gates renormalised over the k.

    Tokens are grouped by expert (one sort), each expert runs once on its contiguous slice, and the
    weighted outputs are scattered back with one ``index_add_``: no loop over tokens and no expert
    computed for a token that did not choose it. The experts' backward is written by hand
    (``GroupedExperts``): the same products as autograd's, without its copies and zero fills.

    Args:
        dim: model width ``D``.
        hidden: expert hidden width ``F``.
        num_experts: ``E``.
        top_k: ``K``.
        router_kwargs: passed to :class:`Router` (``modality_bias``, ``hard``, ``partition``,
            ``num_modalities``).

    Shapes:
        ``x (..., D)``, ``modality_ids (...)`` or ``(T,)`` -> ``(..., D)``; the router logits
        ``(T, E)`` of the call are kept in ``last_router_logits``.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, **router_kwargs: Any):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise UsageError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = Router(dim, num_experts, **router_kwargs)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))  # (E, 2F, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, F)
        nn.init.normal_(self.gate_up_proj, std=dim**-0.5)
        nn.init.normal_(self.down_proj, std=hidden**-0.5)
        self.last_router_logits: torch.Tensor | None = None
        self.grad_stop: torch.Tensor | None = None  # (T,) bool, set by weight_gradient_stop

    def route(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        stop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``(T, E)``, chosen experts ``(T, K)`` and renormalised gates ``(T, K)``."""
        if stop is None:
            logits = self.router(x, modality_ids)  # (T, E)
        else:
            logits = self.router(x, modality_ids, stop=stop)
        top_logits, experts = logits.topk(self.top_k, dim=-1)  # (T, K)
        # Softmax over all E then renormalising over the chosen k equals a softmax over the k.
        gates = top_logits.softmax(dim=-1)  # (T, K)
        return logits, experts, gates

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        stop = self.grad_stop
        if stop is not None:
            if stop.shape[0] != x.shape[0]:
                raise UsageError(
                    f"weight_gradient_stop: stop has {stop.shape[0]} entries but this MoEBlock saw "
                    f"{x.shape[0]} tokens (hidden states {tuple(shape)}); give stop the shape of "
                    "the hidden states without their last dimension, e.g. (B, S) for (B, S, D)"
                )
            stop = stop.to(x.device)
        logits, experts, gates = self.route(x, modality_ids, stop)
        self.last_router_logits = logits
        out = self._dispatch(x, experts, gates.to(x.dtype), stop)
        return out.reshape(shape)

    def _dispatch(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        gates: torch.Tensor,
        stop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        flat_experts = experts.reshape(-1)  # (T*K,)
        order = flat_experts.argsort(stable=True)  # (T*K,) assignments grouped by expert
        token = order // self.top_k  # (T*K,) token of each grouped assignment
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        w1: torch.Tensor = self.gate_up_proj  # (E, 2F, D)
        w2: torch.Tensor = self.down_proj  # (E, D, F)
        gates = gates.reshape(-1)[order]  # (T*K,)
        # (T*K,) 1 where an assignment's token gives to the expert weights' gradients, else 0
        keep = None if stop is None else (~stop).index_select(0, token).to(x.dtype)
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            # Autocast does not reach into an autograd Function: cast as it casts a linear layer
            # (inputs and weights to its dtype; the casts carry the gradients back to the float32
            # weights) and run the experts with autocast off, so every product has one dtype.
            dtype = torch.get_autocast_dtype(kind)
            x, w1, w2, gates = (t.to(dtype) for t in (x, w1, w2, gates))
            keep = None if keep is None else keep.to(dtype)
            with torch.autocast(kind, enabled=False):
                return grouped_experts(x, w1, w2, gates, token, counts, keep)
        return grouped_experts(x, w1, w2, gates, token, counts, keep)

    def extra_repr(self) -> str:
        return (
            f"dim={self.gate_up_proj.shape[2]}, hidden={self.down_proj.shape[2]}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}"
        )
