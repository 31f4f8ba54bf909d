"""SMAR: Soft Modality-Aware Routing for mixture-of-experts multimodal language models.

``import smar`` needs only torch. The routing mathematics (``smar.losses``) and analysis
(``smar.metrics``) are re-exported here.
"""

from smar.losses import (
    Routing,
    limoe_loss,
    load_balancing_loss,
    modality_distributions,
    mrd,
    prepare_routing,
    routing_objective,
    routing_probs,
    smar_loss,
    z_loss,
)
from smar.metrics import RoutingStats

__version__ = "0.1.0"

__all__ = [
    "Routing",
    "RoutingStats",
    "limoe_loss",
    "load_balancing_loss",
    "modality_distributions",
    "mrd",
    "prepare_routing",
    "routing_objective",
    "routing_probs",
    "smar_loss",
    "z_loss",
]
