"""The modality-aware router bias (docs/method.md#modality-bias): a wrapper around a model's
router that adds a trainable per-modality bias ``b[m(t)]`` to each token's logits before the
router's own top-k.

No top-k is written here per family. The wrapper runs the original router unchanged, and while it
runs, a ``TorchFunctionMode`` adds the bias to the output of the router's linear layer (the one
call of ``F.linear`` whose weight is the router's ``(E, D)`` logit weight): the family's own
softmax, sigmoid, correction bias, group-limited or top-k code then runs on the biased logits.
Routers whose logits do not come out of ``F.linear`` can pass an :class:`smar.adapters.Adapter`
with a ``reroute`` function instead.

Shapes legend: T tokens, D model width, E experts, M modalities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from smar.adapters import Adapter
from smar.errors import UsageError

if TYPE_CHECKING:
    from smar.modality import ModalityState

__all__ = ["ModalityBiasRouter", "RouterLinear", "logit_weight", "builtin_linear"]


def logit_weight(router: nn.Module) -> Tensor:
    """The ``(E, D)`` weight of the linear layer computing a router's logits.

    The router's own 2-D ``weight`` (most transformers 5.x routers), else the weight of its only
    ``nn.Linear`` child (JetMoE, DBRX, Switch), else its only 2-D parameter.

    Raises:
        ValueError: if there is none, or several candidates.
    """
    w = getattr(router, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return w
    linears = [m.weight for m in router.modules() if isinstance(m, nn.Linear)]
    candidates = linears or [p for p in router.parameters() if p.dim() == 2]
    if len(candidates) != 1:
        raise UsageError(
            f"cannot tell which linear layer of {type(router).__name__} computes its logits "
            f"({len(candidates)} candidates): pass adapter=smar.adapters.Adapter(..., reroute=...) "
            "or use SMARConfig(modality_bias=False)"
        )
    return candidates[0]


_BUILTIN_LINEAR = torch._C._nn.linear  # what F.linear is until someone replaces it


@contextlib.contextmanager
def builtin_linear() -> Iterator[None]:
    """Torch's own ``F.linear`` for the duration. DeepSpeed ZeRO-3 replaces ``F.linear`` for good
    with its own autograd Function, inside which the mode sees no linear and autograd records
    nothing (the bias would get no gradient); the router's weight is gathered by the time its
    forward runs, so torch's linear computes the same logits."""
    current = F.linear
    if current is _BUILTIN_LINEAR:
        yield
        return
    F.linear = _BUILTIN_LINEAR
    try:
        yield
    finally:
        F.linear = current


class RouterLinear(TorchFunctionMode):
    """While active, finds the first ``F.linear`` call whose weight has the router's logit shape
    ``(E, D)``: its output (the logits) goes through ``transform`` (the bias, or nothing) and is
    kept in :attr:`logits`. Routers that do not return their logits (DeepSpeed-MoE's
    ``TopKGate``) are read this way.

    Args:
        weight_shape: ``(E, D)``.
        transform: applied to the logits before the router's own code sees them, or None.
        keep: the router gets a copy, so that what it does in place (DeepSpeed's top-2 gating
            adds Gumbel noise to its logits in place) leaves :attr:`logits` as computed.
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        transform: Callable[[Tensor], Tensor] | None = None,
        keep: bool = False,
    ):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.transform = transform
        self.keep = keep
        self.logits: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.logits is not None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.logits is None and func is _BUILTIN_LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, Tensor) and tuple(weight.shape) == self.weight_shape:
                out = out if self.transform is None else self.transform(out)
                self.logits = out
                return out.clone() if self.keep else out
        return out


def check_modality_id(top: int, num_modalities: int) -> None:
    """Raises if a modality id has no row in the bias."""
    if top >= num_modalities:
        raise UsageError(
            f"modality id {top} >= num_modalities={num_modalities} (0 text, 1 image, 2 video, 3 "
            f"audio): its tokens would leave every statistic; fix: SMARConfig(num_modalities="
            f"{top + 1}), or count them as image with SMARConfig(groups='nontext')"
        )


class ModalityBiasRouter(nn.Module):
    """A router wrapper adding a trainable per-modality bias ``b[m(t)]`` to each token's logits.

    The original router runs unchanged, as the submodule ``router`` (so hooks on it, like
    transformers' ``output_router_logits``, still fire); its logits get the bias before its own
    routing code uses them. With ``bias == 0`` the outputs are bit-identical to the original's.
    Tokens of modality ``-1`` get no bias. Attributes the wrapper does not have (``weight``,
    ``top_k``, ...) are read from the original router, so model code and PEFT that look them up
    on the router still work.

    Args:
        router: the original router module (kept as the submodule ``router``).
        adapter: how to read its logits (and, optionally, re-route).
        num_modalities: ``M``.
        num_experts: ``E``.
        state: the shared modality state (:class:`smar.modality.ModalityState`).

    Shapes:
        bias ``(M, E)``; the wrapped router's logits ``(T, E)``.
    """

    def __init__(
        self,
        router: nn.Module,
        adapter: Adapter,
        num_modalities: int,
        num_experts: int,
        state: ModalityState,
    ):
        super().__init__()
        if not adapter.bias:
            raise UsageError(
                f"cannot add a modality bias to {type(router).__name__} ({adapter.note}); use "
                "SMARConfig(modality_bias=False)"
            )
        self.router = router
        self.adapter = adapter
        self._state = state
        self.last_logits: Tensor | None = None
        if adapter.reroute is None:
            w = logit_weight(router)
            if w.shape[0] != num_experts:
                raise UsageError(
                    f"the linear layer of {type(router).__name__} has {w.shape[0]} outputs but the "
                    f"router has {num_experts} experts: cannot add a modality bias to it; use "
                    "SMARConfig(modality_bias=False)"
                )
            self.weight_shape = tuple(w.shape)
        ref = next(router.parameters(), None)
        self.modality_bias = nn.Parameter(
            torch.zeros(num_modalities, num_experts, device=None if ref is None else ref.device)
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("router", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["router"], name)

    def add_bias(self, z: Tensor) -> Tensor:
        """``z + b[m(t)]`` for logits ``z (..., E)`` of the current forward's tokens."""
        E = z.shape[-1]
        flat = z.reshape(-1, E)  # (T, E)
        ids = self._state.flat(flat.shape[0], f"the modality bias of {type(self.router).__name__}")
        ids = ids.to(flat.device)
        M = self.modality_bias.shape[0]
        if ids.numel() and not torch.compiler.is_compiling():
            if self._state.check_ids:
                check_modality_id(int(ids.max()), M)  # waits for the device
            else:  # checked later, at Regularizer.check()
                top = ids.max()
                prev = self._state.max_id
                self._state.max_id = top if prev is None else torch.maximum(prev, top)
        valid = ((ids >= 0) & (ids < M)).unsqueeze(-1)  # (T, 1)
        bias = self.modality_bias[ids.clamp(min=0, max=M - 1)] * valid  # (T, E)
        return (flat + bias.to(flat.dtype)).reshape(z.shape)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.adapter.reroute is not None:
            out = self.router(*args, **kwargs)
            z = self.adapter.logits(out)  # (T, E)
            return self.adapter.reroute(self.router, out, self.add_bias(z))
        mode = RouterLinear(self.weight_shape, self.add_bias, keep=self.adapter.from_linear)
        with builtin_linear(), mode:
            out = self.router(*args, **kwargs)
        if self.adapter.from_linear:  # the biased logits, for routers that do not return them
            self.last_logits = mode.logits
        if not mode.done:
            raise UsageError(
                f"{type(self.router).__name__} did not compute its logits with F.linear on its "
                f"{self.weight_shape} weight: cannot add a modality bias to it; pass "
                "adapter=smar.adapters.Adapter(..., reroute=...) or use "
                "SMARConfig(modality_bias=False)"
            )
        return out

    def extra_repr(self) -> str:
        M, E = self.modality_bias.shape
        return f"adapter={self.adapter.name!r}, modalities={M}, experts={E}"
