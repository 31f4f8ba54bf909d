"""The arms of the testbed (``docs/method.md#baselines``): one routing objective each, same
model and data.

Each arm is a small frozen dataclass saying which routing terms are weighted in, whether the
router carries the modality-aware bias or hard modality routing, and whether modality ids are
token level or sample level (``docs/method.md#modality-ids``). A ``_sample`` suffix on an arm's
name selects sample level: ``smar_sample``, ``hard_sample``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from smar.errors import UsageError

__all__ = ["Arm", "ARM_NAMES", "make_arm"]

ARM_NAMES = ("none", "lb", "bias_lb", "smar_lb", "smar", "hard", "align", "limoe", "z")


@dataclass(frozen=True)
class Arm:
    """One routing objective.

    Attributes:
        name: the arm's name, e.g. ``"smar"`` or ``"hard_sample"``.
        lb_weight: weight of the Switch load-balancing loss.
        smar_weight: weight of the tolerance-band loss on the MRD.
        band: the band ``(low, high)``.
        modality_bias: the router adds a trainable per-modality bias.
        hard_routing: experts are partitioned by modality (text: first half, image: second).
        z_weight: weight of the ST-MoE router z-loss.
        limoe_weight: weight of LIMoE's per-modality entropy losses.
        modality: ``"token"`` (image tokens are image) or ``"sample"`` (every token of a
            multimodal sample is image, pure-text samples are text).
    """

    name: str
    lb_weight: float = 0.0
    smar_weight: float = 0.0
    band: tuple[float, float] = (1.5, 2.0)
    modality_bias: bool = False
    hard_routing: bool = False
    z_weight: float = 0.0
    limoe_weight: float = 0.0
    modality: str = "token"

    def __post_init__(self) -> None:
        if self.modality not in ("token", "sample"):
            raise UsageError(f"modality must be 'token' or 'sample'; got {self.modality!r}")
        if self.hard_routing and self.modality_bias:
            raise UsageError("hard routing and the modality bias are exclusive")


def make_arm(
    name: str,
    *,
    smar_weight: float = 1.0,
    lb_weight: float = 0.01,
    band: tuple[float, float] = (1.5, 2.0),
    z_weight: float = 1e-3,
    limoe_weight: float = 0.1,
) -> Arm:
    """The arm called ``name`` (one of :data:`ARM_NAMES`, optionally with ``_sample``).

    Raises:
        ValueError: unknown arm, listing the known ones.
    """
    base, modality = name, "token"
    if name.endswith("_sample"):
        base, modality = name[: -len("_sample")], "sample"
    lb = {"lb_weight": lb_weight}
    table: dict[str, dict[str, Any]] = {
        "none": {},
        "lb": lb,
        "bias_lb": {**lb, "modality_bias": True},
        "smar_lb": {**lb, "smar_weight": smar_weight, "band": band},
        "smar": {**lb, "smar_weight": smar_weight, "band": band, "modality_bias": True},
        "hard": {**lb, "hard_routing": True},
        "align": {**lb, "smar_weight": smar_weight, "band": (0.0, 0.0)},
        "limoe": {**lb, "limoe_weight": limoe_weight},
        "z": {**lb, "z_weight": z_weight},
    }
    if base not in table:
        raise UsageError(
            f"unknown arm {name!r}; known: {', '.join(ARM_NAMES)} (add _sample for sample-level "
            "modality ids)"
        )
    return dataclasses.replace(Arm(name=name, modality=modality), **table[base])
