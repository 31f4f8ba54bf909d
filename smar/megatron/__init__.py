"""SMAR in Megatron-Core: a ``TopKRouter`` with the modality bias and the band loss.

:class:`SMARRouter` subclasses Megatron-Core's ``TopKRouter`` and goes into a model through the
module spec (``MoESubmodules(router=smar_router(...))``, or :func:`use_smar_router` on a whole
spec). It adds the trainable per-modality bias ``b[m(t)]`` to the logits before Megatron's own
routing (top-k, z-loss, load balancing and token dropping run unchanged on the biased logits) and
attaches SMAR's band loss to the routing probabilities with Megatron's own machinery: the
coefficient weighs it as ``moe_aux_loss_coeff`` weighs load balancing, ``MoEAuxLossAutoScaler``
applies the pipeline schedule's loss scale, and the band loss and the MRD go to Megatron's
aux-loss tracker (names in :data:`TRACK_NAMES`). Load balancing stays Megatron's.

Modality ids reach the routers as Megatron-Bridge passes them to ERNIE-4.5-VL's MoE layers: a
module-level setter around the model's forward (:func:`modality_ids`, in :mod:`smar.megatron.ids`),
since Megatron's layers give a router only hidden states and a padding mask.

Modules: ``ids`` (the ids of the current forward) and ``config`` (:class:`SMARRouterConfig`)
need only torch; ``router`` (:class:`SMARRouter`) and ``spec`` (:func:`smar_router`,
:func:`use_smar_router`) import ``megatron-core`` (``pip install 'smar[megatron]'``) when first
used. ``import smar`` imports none of them.
"""

from typing import TYPE_CHECKING, Any

from smar.megatron.config import BAND_LOSS, MRD, TRACK_NAMES, SMARRouterConfig
from smar.megatron.ids import clear_modality_ids, modality_ids, set_modality_ids

if TYPE_CHECKING:
    from smar.megatron.router import SMARRouter
    from smar.megatron.spec import smar_router, use_smar_router

__all__ = [
    "BAND_LOSS",
    "MRD",
    "SMARRouter",
    "SMARRouterConfig",
    "TRACK_NAMES",
    "clear_modality_ids",
    "modality_ids",
    "set_modality_ids",
    "smar_router",
    "use_smar_router",
]

_NEED_MEGATRON = {"SMARRouter": "router", "smar_router": "spec", "use_smar_router": "spec"}


def __getattr__(name: str) -> Any:
    if name in _NEED_MEGATRON:  # megatron-core is imported only when asked for
        import importlib

        module = importlib.import_module(f"smar.megatron.{_NEED_MEGATRON[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'smar.megatron' has no attribute {name!r}")
