"""The modality ids of the forward Megatron is running, for every :class:`SMARRouter` to read.

Megatron-Core's transformer layers give a router nothing but hidden states and a padding mask.
Megatron-Bridge passes ERNIE-4.5-VL's token types to its MoE layers through a module-level
setter around the language model's forward, cleared in a ``finally``; this module does the same
(:func:`modality_ids`). The ids are given shaped like the ``input_ids`` of that forward,
``(B, S)``; each router takes the slice of its own tokens (sequence parallelism).

This module imports only torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from smar.errors import UsageError

__all__ = ["modality_ids", "set_modality_ids", "clear_modality_ids", "current"]

_current: Tensor | None = None


def set_modality_ids(ids: Tensor | None) -> None:
    """Sets the modality ids ``(B, S)`` the routers read until :func:`clear_modality_ids`.

    Prefer :func:`modality_ids`, which clears them when the forward ends or fails.
    """
    global _current
    if ids is not None and (not isinstance(ids, Tensor) or ids.dim() != 2):
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise UsageError(
            f"modality ids must be a (B, S) tensor shaped like the model's input_ids; got {shape}"
        )
    _current = ids


def clear_modality_ids() -> None:
    """Forgets the modality ids set by :func:`set_modality_ids`."""
    set_modality_ids(None)


def current() -> Tensor | None:
    """The ids set for the current forward, or None."""
    return _current


@contextlib.contextmanager
def modality_ids(ids: Tensor) -> Iterator[None]:
    """The modality ids of the forward run inside the block::

        with smar.megatron.modality_ids(batch["modality_ids"]):
            output = model(tokens, position_ids, attention_mask, labels=labels)

    Args:
        ids: ``(B, S)`` integer ids shaped like the ``input_ids`` given to the model: 0 text,
            1 image (2 video, 3 audio), -1 ignored (no bias, not counted). Under context
            parallelism slice them with the batch (``get_batch_on_this_cp_rank``); the routers
            take their sequence-parallel slice themselves.
    """
    previous = _current
    set_modality_ids(ids)
    try:
        yield
    finally:
        set_modality_ids(previous)
