"""Module specs: :class:`smar.megatron.SMARRouter` in the MoE layers of a Megatron-Core spec.

``MoESubmodules(router=...)`` is Megatron's extension point for routers: :func:`smar_router`
gives the builder to put there, :func:`use_smar_router` puts it into every MoE layer of a layer
or block spec (``ModuleSpec``, or megatron-core 0.19's ``functools.partial(MoELayer, ...)``).
"""

from __future__ import annotations

import functools
from dataclasses import fields, is_dataclass
from typing import Any

from smar.errors import UsageError
from smar.megatron.config import SMARRouterConfig
from smar.megatron.router import SMARRouter

try:
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"smar.megatron's specs need megatron-core ({e}); fix: pip install 'smar[megatron]'"
    ) from e

__all__ = ["smar_router", "use_smar_router"]


def smar_router(config: SMARRouterConfig | None = None) -> functools.partial[SMARRouter]:
    """The router builder for ``MoESubmodules(router=...)``: :class:`SMARRouter` with ``config``."""
    config = SMARRouterConfig() if config is None else config
    return functools.partial(SMARRouter, smar=config)


def use_smar_router(spec: Any, config: SMARRouterConfig | None = None) -> int:
    """Puts :class:`SMARRouter` into every MoE layer of a Megatron module spec, in place.

    Args:
        spec: a layer spec (``get_gpt_layer_local_spec(num_experts=8)``), a block spec
            (``TransformerBlockSubmodules`` with ``layer_specs``) or an MoE spec; ``ModuleSpec``
            and, as megatron-core 0.19 builds them, ``functools.partial(MoELayer, ...)``.
        config: SMAR's options.

    Returns:
        How many MoE layer specs were changed (at least 1; none raises).
    """
    builder = smar_router(config)
    seen: set[int] = set()

    def visit(node: object) -> int:
        if id(node) in seen or node is None or isinstance(node, (str, int, float, type)):
            return 0
        seen.add(id(node))
        if isinstance(node, MoESubmodules):
            node.router = builder
            return 1
        if isinstance(node, ModuleSpec):
            return visit(node.submodules)
        if isinstance(node, functools.partial):  # 0.19's specs: partial(MoELayer, submodules=)
            return visit(list(node.args)) + visit(list(node.keywords.values()))
        if isinstance(node, (list, tuple)):
            return sum(visit(x) for x in node)
        if is_dataclass(node):
            return sum(visit(getattr(node, f.name)) for f in fields(node))
        return 0

    n = visit(spec)
    if not n:
        raise UsageError(
            "no MoE layer in this spec (no MoESubmodules found); fix: build the spec with "
            "num_experts set, e.g. get_gpt_layer_local_spec(num_experts=8)"
        )
    return n
