"""The options of :class:`smar.megatron.SMARRouter` and the names it logs under.

This module imports only torch (and smar's losses, for validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smar.collective import STATS
from smar.errors import UsageError
from smar.losses import _check_band, check_weight

__all__ = ["SMARRouterConfig", "BAND_LOSS", "MRD", "TRACK_NAMES"]

BAND_LOSS = "smar_band_loss"  # the unweighted band loss of each layer
MRD = "smar_mrd"  # the MRD of each layer (0 where a modality is absent)
TRACK_NAMES = (BAND_LOSS, MRD)  # add them to the track_names of Megatron's training_log


@dataclass
class SMARRouterConfig:
    """SMAR's options for :class:`SMARRouter` (the defaults of ``docs/method.md#objective``).

    Args:
        smar_weight: coefficient of the band loss, applied as Megatron applies
            ``moe_aux_loss_coeff`` (the loss attached is ``smar_weight * band_loss``); 0 keeps
            the MRD logging and the bias without the loss.
        band: ``(low, high)`` band of the MRD, or one pair per transformer layer
            (``config.num_layers`` pairs, indexed by the router's layer number).
        hinge: ``"linear"`` or ``"squared"``.
        modality_bias: a trainable, zero-initialised bias ``(M, E)`` added to the logits.
        num_modalities: ``M``, rows of the bias (0 text, 1 image, 2 video, 3 audio).
        text: the anchor modality id of the MRD.
        image: the other modality id of the MRD.
        stats: ``"global"``: over the router's tensor+data+context-parallel group (one process's
            loss and gradients); ``"local"``: over each rank's own tokens.
    """

    smar_weight: float = 1.0
    band: tuple[float, float] | Sequence[tuple[float, float]] = (1.5, 2.0)
    hinge: str = "linear"
    modality_bias: bool = True
    num_modalities: int = 2
    text: int = 0
    image: int = 1
    stats: str = "global"

    def __post_init__(self) -> None:
        check_weight("smar_weight", self.smar_weight)
        if self.hinge not in ("linear", "squared"):
            raise UsageError(f"hinge must be 'linear' or 'squared'; got {self.hinge!r}")
        if not isinstance(self.modality_bias, bool):
            raise TypeError(f"modality_bias must be True or False; got {self.modality_bias!r}")
        if not isinstance(self.num_modalities, int) or self.num_modalities < 2:
            raise UsageError(f"num_modalities must be an integer >= 2; got {self.num_modalities}")
        if not (0 <= self.text < self.num_modalities and 0 <= self.image < self.num_modalities):
            raise UsageError(
                f"text={self.text} and image={self.image} must be < num_modalities="
                f"{self.num_modalities}"
            )
        if self.text == self.image:
            raise UsageError(f"text and image must differ; got {self.text} for both")
        if self.stats not in STATS:
            raise UsageError(f"stats must be one of {STATS}; got {self.stats!r}")
        if isinstance(self.band, list) and self.band and isinstance(self.band[0], (int, float)):
            self.band = tuple(self.band)  # a pair read from JSON or YAML

    def layer_band(self, layer_number: int | None, num_layers: int) -> list[tuple[float, float]]:
        """The band of one layer, as the one-layer list :func:`smar.routing_objective` takes."""
        try:  # one pair for every layer
            return _check_band(self.band, 1).tolist()
        except ValueError:
            rows = _check_band(self.band, num_layers).tolist()  # one pair per layer
        if layer_number is None:
            raise UsageError("a band per layer needs the router's layer number (set_layer_number)")
        return [rows[layer_number - 1]]
