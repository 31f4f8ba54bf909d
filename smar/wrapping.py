"""The module smar acts on, and the adapters it is given: the model inside ``nn.DataParallel``
or DDP, refused in one line where smar cannot act on it (not a module, on the meta device,
DataParallel over several devices), and ``adapter=`` checked (:mod:`smar.capture` uses both)."""

from __future__ import annotations

from typing import Any

from torch import nn

from smar.adapters import Adapter
from smar.errors import UsageError, WrongType

__all__ = ["unwrap", "check_adapters"]


def unwrap(model: object, who: str, *, new_parameters: bool = False) -> nn.Module:
    """The model smar acts on: ``model``, or the module inside ``nn.DataParallel`` or
    ``DistributedDataParallel`` (their forward calls it with the inputs, so its hooks see them,
    and its config names the placeholder tokens; hooked on the wrapper, every token read as
    text).

    Raises:
        TypeError: if ``model`` is not a module.
        ValueError: for DataParallel over several devices (replicas in threads would mix their
            captures), or DDP when smar adds parameters DDP would not synchronise.
    """
    if not isinstance(model, nn.Module):
        raise WrongType(
            f"{who}(model={model!r:.40}): model must be a torch.nn.Module, the MoE model itself; "
            f"got a {type(model).__name__}"
        )
    if any(p.is_meta for p in model.parameters()):
        raise UsageError(
            f"{who}: {type(model).__name__} is on the meta device (shapes without values: built "
            "under torch.device('meta') or init_empty_weights), so its routers compute nothing",
            "load or materialise its weights first (from_pretrained, or model.to_empty(device="
            "'cpu') and load_state_dict)",
        )
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        if isinstance(model, nn.DataParallel) and len(model.device_ids or []) > 1:
            raise UsageError(
                f"{who}: nn.DataParallel over devices {model.device_ids} runs one replica per "
                "device in threads, which smar cannot tell apart; fix: use "
                "DistributedDataParallel (one process per device), or attach to model.module"
            )
        if new_parameters and isinstance(model, nn.parallel.DistributedDataParallel):
            raise UsageError(
                f"{who}: the model is already wrapped in DistributedDataParallel, which would not "
                "synchronise the modality bias smar adds; fix: attach before wrapping "
                "(reg = smar.attach(model); model = DDP(model)), or SMARConfig(modality_bias=False)"
            )
        inner: nn.Module = model.module
        model = inner
    return model


def check_adapters(adapter: Any) -> list[Adapter] | None:
    """``adapter=`` as a list of :class:`Adapter` (None: none), or one line naming the fix."""
    if adapter is None:
        return None
    adapters = [adapter] if isinstance(adapter, Adapter) else adapter
    if (
        isinstance(adapter, (str, bytes))
        or not isinstance(adapters, (list, tuple))
        or not all(isinstance(a, Adapter) for a in adapters)
    ):
        raise WrongType(
            f"adapter= takes smar.adapters.Adapter objects; got {adapter!r:.60}",
            "build one: Adapter('name', classes=('YourRouterClass',), index=0), or load one "
            "named 'package.module:NAME' with smar.hf.inspect.load_adapter",
        )
    return list(adapters)
