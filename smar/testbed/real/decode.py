"""Batched forwards and greedy decoding for ``smar real``'s evaluation, the rows' common prefix
computed once.

Nearly every evaluation prompt begins with the chat template's system prompt (30 of a knowledge
question's ~37 tokens): :class:`Prefix` runs the tokens every row of a call shares once, and each
batch continues from a copy of its key-value cache. Rows are laid out as ``prefix | padding |
row``: the padding is masked, and each token keeps the position it has in its unpadded sequence,
so a row's logits are those of the row alone (up to the rounding of another batch size).

:func:`greedy` decodes with the same rule as ``transformers``' greedy ``generate`` (argmax, a
row stops at an end-of-sequence token), drops finished rows from the batch, and stops a row
early where ``stop`` says its text is complete (e.g. a closed code block).

Shapes legend: B rows, P shared prefix tokens, W padded row width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from smar.testbed.real.evaluate import Cast

__all__ = ["shared_length", "placeholders", "routes_by_sample", "select_cache", "padded", "Prefix",
           "extend", "head", "forward", "prefill", "greedy"]


def shared_length(rows: Sequence[Sequence[int]], *, keep: int = 1,
                  until: Collection[int] = ()) -> int:  # fmt: skip
    """The number of leading tokens every row shares, leaving at least ``keep`` of each row's
    own and ending before the first token of ``until`` (image placeholders: their features come
    with the row); 0 for fewer than two rows (nothing is shared)."""
    if len(rows) < 2:
        return 0
    first, n = rows[0], min(map(len, rows)) - keep
    at = 0
    while at < n and first[at] not in until and all(r[at] == first[at] for r in rows):
        at += 1
    return max(at, 0)


def placeholders(model: PreTrainedModel) -> set[int]:
    """The ids of the tokens a multimodal model replaces with features (its image token)."""
    cfg = model.config
    ids = (getattr(cfg, n, None) for n in ("image_token_id", "image_token_index",
                                           "video_token_id", "audio_token_id"))  # fmt: skip
    return {i for i in ids if isinstance(i, int)}


def routes_by_sample(model: PreTrainedModel) -> bool:
    """Whether a SMAR regularizer attached to ``model`` routes by sample-level ids (a modality
    bias, or hard routing, with ``modality="sample"``): every token of a row that holds an image
    then routes as an image token, its system prompt too, and its decode steps keep the row's id
    only while the batch keeps its rows. Image rows are then neither given a shared prefix (run
    as text) nor dropped from the batch when they finish."""
    ref = getattr(model, "_smar_regularizer", None)
    reg = ref() if ref is not None else None
    return reg is not None and reg.config.modality == "sample" and bool(reg.config.modality_bias)


def cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for a key-value cache: ``cache`` (transformers >= 5.25, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _CastLayer(DynamicLayer):
    """A cache layer that stores keys and values in ``dtype``: the precision autocast gives
    attention (its inputs are cast at every call), so attention sees the same values, bit for
    bit, without casting the whole cache at each forward; half the bytes to copy as it grows."""

    dtype = torch.bfloat16

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return super().update(key_states.to(self.dtype), value_states.to(self.dtype), *args,
                              **kwargs)  # fmt: skip


def new_cache() -> Any:
    """An empty key-value cache for the model's next forward: under CPU autocast its layers store
    keys and values in autocast's precision (:class:`_CastLayer`), else transformers' default
    (None: the model makes one)."""
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    cache = DynamicCache()
    cache.layer_class_to_replicate = _CastLayer
    return cache


def _cache_of(out: Any) -> Any:
    return getattr(out, "cache", None) or out.past_key_values  # (renamed in transformers 5.25)


def select_cache(cache: Any, index: torch.Tensor) -> Any:
    """A cache of the rows ``index`` of ``cache`` (repeats allowed), which stays as it is: each
    layer is copied shallowly and selects its rows into new tensors, as a cache updates its
    layers (by assignment, never in place)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(index)
    return out


class Prefix:
    """The key-value cache of ``ids`` (one row), computed once; :meth:`cache` gives each batch
    its own copy. ``ids`` may be empty (nothing shared: no cache)."""

    def __init__(self, model: PreTrainedModel, ids: Sequence[int], cast: Cast | None = None):
        self.model, self.ids = model, list(ids)
        self._cache = None
        if self.ids:
            with torch.no_grad():
                self._cache = extend(model, None, torch.zeros(1, 0, dtype=torch.long),
                                     [self.ids], cast=cast, logits_to_keep=1)[2]  # fmt: skip

    def __len__(self) -> int:
        return len(self.ids)

    def cache(self, rows: int) -> Any:
        """A copy of the cache for ``rows`` rows (None when nothing is shared)."""
        if self._cache is None:
            return None
        out = copy.deepcopy(self._cache)
        out.batch_repeat_interleave(rows)
        return out

    @classmethod
    def of(cls, model: PreTrainedModel, rows: Sequence[Sequence[int]], cast: Cast | None = None,
           *, keep: int = 1) -> Prefix:  # fmt: skip
        """The prefix every one of ``rows`` shares (:func:`shared_length`; it ends before the
        model's image placeholders)."""
        n = shared_length(rows, keep=keep, until=placeholders(model))
        return cls(model, rows[0][:n] if rows else [], cast)


def padded(rows: Sequence[Sequence[int]],
           left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(ids, mask)`` ``(B, W)`` of token rows padded to one width (right, or left)."""
    width = max(map(len, rows))
    x = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if left else slice(0, len(r))
        x[i, at], mask[i, at] = torch.tensor(r, dtype=torch.long), 1
    return x, mask


def extend(model: PreTrainedModel, cache: Any, mask: torch.Tensor,
           rows: Sequence[Sequence[int]], *, cast: Cast | None = None, left: bool = False,
           logits_to_keep: int = 0, hidden: bool = False,
           **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:  # fmt: skip
    """``(logits (B, W, V), mask (B, S + W), cache)``: ``rows`` continue the sequences a
    key-value ``cache`` holds (``mask (B, S)``; None and ``(B, 0)`` for none yet), padded right
    (row ``i``'s token ``j`` at ``j``) or left, each token at its unpadded position; the cache
    takes the new tokens. ``inputs`` go to the model (``pixel_values``). ``hidden``: the base
    model's last hidden states ``(B, W, D)`` in place of the logits (:func:`head` makes them)."""
    x, new = padded(rows, left)
    at = mask.sum(1)[:, None] + (new.cumsum(1) - 1).clamp(min=0)  # (B, W)
    mask = torch.cat([mask, new], 1)
    with cast or contextlib.nullcontext():
        cache = new_cache() if cache is None else cache
        kw = {} if cache is None else {cache_argument(model): cache}
        seen: list[torch.Tensor] = []  # the base model's last hidden states (hidden=True)
        hook = model.model.register_forward_hook(
            lambda _m, _a, o: seen.append(o.last_hidden_state)) if hidden else None  # fmt: skip
        try:  # (the whole model runs: its hooks, e.g. SMAR's modality ids, see the forward)
            out = model(input_ids=x, attention_mask=mask, position_ids=at, use_cache=True,
                        logits_to_keep=1 if hidden else logits_to_keep, **kw, **inputs)  # fmt: skip
        finally:
            if hook is not None:
                hook.remove()
    return (seen[-1] if hidden else out.logits), mask, _cache_of(out)


def head(model: PreTrainedModel) -> torch.nn.Module | None:
    """The layer that makes ``model``'s logits from its base model's last hidden states
    (``extend(..., hidden=True)``), where the logits are just that layer's output (no logit
    soft-capping); None otherwise."""
    text = model.config.get_text_config()
    out = model.get_output_embeddings()
    plain = getattr(text, "final_logit_softcapping", None) is None
    return out if plain and isinstance(getattr(model, "model", None), torch.nn.Module) else None


def forward(model: PreTrainedModel, rows: Sequence[Sequence[int]], prefix: Prefix, *,
            cast: Cast | None = None, left: bool = False, logits_to_keep: int = 0,
            hidden: bool = False,
            **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:  # fmt: skip
    """``(logits (B, W, V), mask (B, P + W), cache)`` of ``rows`` (each beginning with
    ``prefix.ids``) after the prefix (:func:`extend`): right-padded (row ``i``'s token
    ``j >= P`` at ``j - P``) or left-padded. ``inputs`` go to the model (``pixel_values``);
    ``hidden``: the last hidden states in place of the logits."""
    p = len(prefix)
    return extend(model, prefix.cache(len(rows)), torch.ones(len(rows), p, dtype=torch.long),
                  [r[p:] for r in rows], cast=cast, left=left, logits_to_keep=logits_to_keep,
                  hidden=hidden, **inputs)  # fmt: skip


GROUP_TOKENS = 256  # a forward's fixed cost, in padded tokens, when grouping rows by length


def _groups(lengths: Sequence[int]) -> list[list[int]]:
    """Positions of ``lengths`` in groups of like length (ascending), chosen to cost least: each
    group runs ``len(group) * its longest`` tokens, plus :data:`GROUP_TOKENS` per forward."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ends = [j + 1 for j in range(len(order)) if j + 1 == len(order)
            or lengths[order[j + 1]] != lengths[order[j]]]  # fmt: skip  # group ends allowed
    best: dict[int, tuple[float, int]] = {0: (0.0, 0)}  # end -> (cost, start of its last group)
    for e in ends:
        best[e] = min((best[b][0] + (e - b) * lengths[order[e - 1]] + GROUP_TOKENS, b)
                      for b in [0, *ends] if b < e and b in best)  # fmt: skip
    cuts, e = [], len(order)
    while e:
        cuts.append(e)
        e = best[e][1]
    bounds = [0, *reversed(cuts)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def prefill(model: PreTrainedModel, rows: Sequence[Sequence[int]], prefix: Prefix, *,
            cast: Cast | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, Any, list[int]]:  # fmt: skip
    """``(last logits (B, V), mask (B, P + W), cache, order)``: the first forward of ``rows``
    (each beginning with ``prefix.ids``), left-padded, run in groups of like length
    (:func:`_groups`: less padding) and joined into one batch, rows in ``order`` (indices into
    ``rows``): each group's cache and mask padded between the prefix and its rows, as one
    forward of them all lays them out (the padding masked)."""
    parts = []
    for group in _groups([len(r) for r in rows]):
        logits, mask, cache = forward(model, [rows[i] for i in group], prefix, cast=cast,
                                      left=True, logits_to_keep=1)  # fmt: skip
        parts.append((group, logits[:, -1], mask, cache))
        plain = all(type(layer) in (DynamicLayer, _CastLayer) for layer in cache.layers)
        if len(parts) == 1 and not plain:  # (a cache this does not know how to join)
            order = list(range(len(rows)))
            logits, mask, cache = forward(model, rows, prefix, cast=cast, left=True,
                                          logits_to_keep=1)  # fmt: skip
            return logits[:, -1], mask, cache, order
    if len(parts) == 1:
        return parts[0][1], parts[0][2], parts[0][3], parts[0][0]
    p, width = len(prefix), max(m.shape[1] for _, _, m, _ in parts)

    def widened(t: torch.Tensor, dim: int) -> torch.Tensor:  # padding after the prefix
        pad = width - t.shape[dim]
        if not pad:
            return t
        shape = list(t.shape)
        shape[dim] = pad
        rest = t.narrow(dim, p, t.shape[dim] - p)
        return torch.cat([t.narrow(dim, 0, p), t.new_zeros(shape), rest], dim)

    cache = parts[0][3]
    for n, layer in enumerate(cache.layers):
        layer.keys = torch.cat([widened(c.layers[n].keys, 2) for *_, c in parts])
        layer.values = torch.cat([widened(c.layers[n].values, 2) for *_, c in parts])
    mask = torch.cat([widened(m, 1) for _, _, m, _ in parts])
    return (torch.cat([last for _, last, _, _ in parts]), mask, cache,
            [i for group, *_ in parts for i in group])  # fmt: skip


@torch.no_grad()
def greedy(model: PreTrainedModel, rows: Sequence[Sequence[int]], *,
           max_new_tokens: int | Sequence[int], eos: set[int], batch: int = 64,
           cast: Cast | None = None, stop: Callable[[int, list[int]], bool] | None = None,
           inputs: Callable[[slice], dict[str, Any]] | None = None,
           prefilled: Callable[[list[int], torch.Tensor, torch.Tensor, Any], None] | None = None,
           share: bool = True) -> list[list[int]]:  # fmt: skip
    """The greedy continuation of each row (token ids; an end-of-sequence token it produced
    included), at most ``max_new_tokens`` (one for all rows, or one per row).

    A row ends at a token of ``eos``, or where ``stop(its index, its new tokens)`` is true.
    ``inputs(s)`` gives the model's other inputs for ``rows[s]`` (``pixel_values``), for the
    first forward; without them the first forward runs rows of like length together
    (:func:`prefill`).
    ``prefilled(index, last logits (B, V), mask (B, P + W), cache)`` is called after each batch's
    first forward, before its decoding (``index``: the batch's rows, in its order); it may extend
    the cache if it crops it back.
    ``share=False``: no shared prefix, and finished rows stay in the batch (their tokens dropped),
    as ``generate`` keeps them (image rows of a model that :func:`routes_by_sample`)."""
    limits = ([max_new_tokens] * len(rows) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))  # fmt: skip
    prefix = Prefix.of(model, rows, cast) if share else Prefix(model, [])
    out: list[list[int]] = [[] for _ in rows]
    for b in range(0, len(rows), batch):
        part = slice(b, min(b + batch, len(rows)))
        if inputs is None and share:
            last, mask, cache, order = prefill(model, rows[part], prefix, cast=cast)
            index = [b + i for i in order]
        else:
            extra = inputs(part) if inputs else {}
            logits, mask, cache = forward(model, rows[part], prefix, cast=cast, left=True,
                                          logits_to_keep=1, **extra)  # fmt: skip
            last, index = logits[:, -1], list(range(part.start, part.stop))
        if prefilled is not None:
            prefilled(index, last, mask, cache)
        alive = torch.tensor(index)  # (B,) the batch's rows
        ended = torch.zeros(len(alive), dtype=torch.bool)  # (B,) finished (kept: share=False)
        while True:
            # (B,) argmax: the first of equal maxima, as argmax gives (4x faster on bf16 logits)
            nxt = last.max(-1).indices
            for i, (r, t) in enumerate(zip(alive.tolist(), nxt.tolist(), strict=True)):
                if not ended[i]:
                    out[r].append(t)
                    ended[i] = (t in eos or len(out[r]) >= limits[r]
                                or (stop is not None and stop(r, out[r])))  # fmt: skip
            if bool(ended.all()):
                break
            if share and bool(ended.any()):  # finished rows leave the batch
                keep = (~ended).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                alive, ended, nxt, mask = (t[keep] for t in (alive, ended, nxt, mask))
            logits, mask, cache = extend(model, cache, mask, nxt[:, None].tolist(), cast=cast,
                                         logits_to_keep=1)  # fmt: skip
            last = logits[:, -1]
    return out
