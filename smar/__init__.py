"""SMAR: Soft Modality-Aware Routing for mixture-of-experts multimodal language models.

``import smar`` needs only torch. The routing mathematics (``smar.losses``), analysis
(``smar.metrics``) and the model integration (``smar.routing``: ``attach``, ``record``,
``SMARConfig``) are re-exported here; ``upcycle_hf`` (``smar.hf``) imports transformers on first
use.
"""

from typing import TYPE_CHECKING, Any

from smar.errors import SmarError, UsageError
from smar.losses import (
    Routing,
    limoe_loss,
    load_balancing_loss,
    modality_distributions,
    mrd,
    mrd_matrix,
    prepare_routing,
    routing_objective,
    routing_probs,
    smar_loss,
    z_loss,
)
from smar.metrics import RoutingStats
from smar.routing import SMARConfig, attach, record

if TYPE_CHECKING:
    from smar.hf import upcycle_hf

__version__ = "0.2.0"

__all__ = [
    "Routing",
    "RoutingStats",
    "SMARConfig",
    "SmarError",
    "UsageError",
    "attach",
    "limoe_loss",
    "load_balancing_loss",
    "modality_distributions",
    "mrd",
    "mrd_matrix",
    "prepare_routing",
    "record",
    "routing_objective",
    "routing_probs",
    "smar_loss",
    "upcycle_hf",
    "z_loss",
]


def __getattr__(name: str) -> Any:
    if name == "upcycle_hf":  # smar.hf imports transformers: only when asked for
        from smar.hf import upcycle_hf

        return upcycle_hf
    raise AttributeError(f"module 'smar' has no attribute {name!r}")
