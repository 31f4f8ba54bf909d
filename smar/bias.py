"""The modality-aware router bias (SPEC section 3): a wrapper around a model's router that adds a
trainable per-modality bias ``b[m(t)]`` to each token's logits before top-k.

Shapes legend: T tokens, E experts, M modalities.
"""

from __future__ import annotations

import torch
from torch import nn

from smar.adapters import Adapter

__all__ = ["ModalityBiasRouter"]


class ModalityBiasRouter(nn.Module):
    """A router wrapper adding a trainable per-modality bias ``b[m(t)]`` to each token's logits.

    The original router runs unchanged (so the model's own ``output_router_logits`` still sees
    it); its logits get the bias and the adapter re-routes from them exactly as the router does
    (top-k, gates). With ``bias == 0`` the outputs are bit-identical to the original's. Tokens of
    modality ``-1`` get no bias.

    Args:
        router: the original router module (kept as the submodule ``router``).
        adapter: how to read its logits and re-route.
        num_modalities: ``M``.
        num_experts: ``E``.

    Shapes:
        bias ``(M, E)``; the wrapped router's logits ``(T, E)``.
    """

    def __init__(
        self, router: nn.Module, adapter: Adapter, num_modalities: int, num_experts: int, state
    ):
        super().__init__()
        if adapter.reroute is None:
            raise ValueError(
                f"adapter {adapter.name!r} cannot add a modality bias to "
                f"{type(router).__name__} ({adapter.note}); use modality_bias=False"
            )
        self.router = router
        self.adapter = adapter
        self._state = state
        ref = next(router.parameters(), None)
        self.modality_bias = nn.Parameter(
            torch.zeros(num_modalities, num_experts, device=None if ref is None else ref.device)
        )

    def forward(self, *args, **kwargs):
        out = self.router(*args, **kwargs)
        z = self.adapter.logits(out)  # (T, E)
        ids = self._state.flat(z.shape[0], f"the modality bias of {type(self.router).__name__}")
        ids = ids.to(z.device)
        if ids.numel() and int(ids.max()) >= self.modality_bias.shape[0]:
            raise ValueError(
                f"modality id {int(ids.max())} >= num_modalities={self.modality_bias.shape[0]}; "
                "raise SMARConfig.num_modalities"
            )
        valid = (ids >= 0).unsqueeze(-1)  # (T, 1)
        bias = self.modality_bias[ids.clamp(min=0)] * valid  # (T, E)
        return self.adapter.reroute(self.router, out, z + bias.to(z.dtype))

    def extra_repr(self) -> str:
        M, E = self.modality_bias.shape
        return f"adapter={self.adapter.name!r}, modalities={M}, experts={E}"
