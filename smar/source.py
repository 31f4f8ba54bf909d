"""What ``smar analyze`` runs: a :class:`Source`, a name and a function that yields, batch after
batch, the raw router logits of each MoE layer and the modality ids of the batch. The analysis
(:mod:`smar.analyze`, which re-exports it) and the sources (:mod:`smar.hf.source`,
:mod:`smar.testbed.analyze_run`) import it from here.

Shapes legend: L MoE layers, T tokens, E experts, M modalities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Routed", "Source"]

Routed = tuple[list[Tensor], Tensor]  # L tensors (T, E) of raw logits, modality ids (T,)


@dataclass
class Source:
    """What ``smar analyze`` runs: a model and its data, as batches of routing.

    Attributes:
        name: shown in the report (unique among the sources compared).
        batches: a function returning an iterator of ``(router_logits, modality_ids)`` per batch.
        top_k: experts per token.
        router: ``"softmax"`` or ``"sigmoid"``.
        total: the number of batches, for the progress bar (None: unknown).
        layers: the decoder layer index of each MoE layer (labels only).
        band: the MRD band to shade, or None.
        modalities: the modality ids to track (default text and image; ``(0, 1, 2, 3)`` adds
            video and audio).
        pairs: the pairs of modalities held in a band and each one's band,
            ``{(i, j): (low, high)}``; None: text against each other modality, in ``band``.
        history: training records ``{"step", "mrd": [per layer]}`` (testbed runs), or None.
        info: lines about the model and the data, shown in the report.
    """

    name: str
    batches: Callable[[], Iterator[Routed]]
    top_k: int
    router: str = "softmax"
    total: int | None = None
    layers: list[int] | None = None
    band: tuple[float, float] | None = (1.5, 2.0)
    modalities: tuple[int, ...] = (0, 1)
    pairs: dict[tuple[int, int], tuple[float, float]] | None = None
    history: list[dict] | None = None
    info: dict[str, str] = field(default_factory=dict)
