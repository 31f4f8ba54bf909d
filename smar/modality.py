"""Modality ids: which token is text, image, video or audio (docs/method.md#modality-ids).

Modality ids are an integer tensor ``(B, S)`` (flattened row-major to ``(T,)`` to match router
logits): ``0`` text, ``1`` image, ``2`` video, ``3`` audio, ``-1`` ignore (padding). They come,
in order of preference, from:

1. explicit ids given by the caller;
2. the processor's ``mm_token_type_ids`` (Qwen-VL, GLM-4V, Ernie-4.5-VL, Gemma 3 processors
   return them; same convention);
3. ``input_ids == image_token_id`` (and ``video_token_id``, ``audio_token_id``) of the model config:
   processors expand each image into that many placeholder tokens before the model sees them.

Padding (``attention_mask == 0``, or in a 4-D mask a key no query may attend, see
:func:`token_mask`) always becomes ``-1``. Modalities can be counted as one with
:func:`group_modalities` (``"visual"``: image and video tokens together).

Shapes legend: B batch, S sequence, T = B * S tokens.

This module does not import transformers: a config is read by attribute name only.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from smar.errors import UsageError, WrongType

__all__ = [
    "TEXT",
    "IMAGE",
    "VIDEO",
    "AUDIO",
    "IGNORE",
    "LEVELS",
    "special_token_ids",
    "check_placeholders",
    "modality_ids",
    "token_mask",
    "GROUPS",
    "resolve_groups",
    "group_modalities",
]

TEXT, IMAGE, VIDEO, AUDIO, IGNORE = 0, 1, 2, 3, -1
LEVELS = ("token", "sample")

# Config attribute names of placeholder tokens, per modality id. Llava, Llama 4 and Aria call the
# image token ``image_token_index``; most newer models ``image_token_id``.
_TOKEN_ATTRS = {
    IMAGE: ("image_token_id", "image_token_index"),
    VIDEO: ("video_token_id", "video_token_index"),
    AUDIO: ("audio_token_id", "audio_token_index"),
}


def special_token_ids(config: Any) -> dict[int, list[int]]:
    """Placeholder token ids per modality found in a (transformers) config.

    Looks at the top-level config, then at ``text_config``. Only non-negative integer ids count
    (None or a negative id: unset).

    Returns:
        ``{modality_id: [token ids]}``, e.g. ``{1: [151655], 2: [151656]}``; empty if none found.

    Raises:
        UsageError: for an id that is not an integer (a string, a float), which would never match.
    """
    found: dict[int, list[int]] = {}
    configs = [config, getattr(config, "text_config", None)]
    for mod, attrs in _TOKEN_ATTRS.items():
        for cfg in configs:
            if cfg is None:
                continue
            for attr in attrs:
                value = getattr(cfg, attr, None)
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, numbers.Integral)
                ):
                    raise UsageError(
                        f"the model config's {attr}={value!r} is not a token id (an integer), so "
                        "no token would count as that modality",
                        f"set config.{attr} to the placeholder's id, e.g. "
                        f"tokenizer.convert_tokens_to_ids('<image>')",
                    )
                value = None if value is None else int(value)  # numpy ints too
                if value is not None and value >= 0 and value not in found.setdefault(mod, []):
                    found[mod].append(value)
    return {m: ids for m, ids in found.items() if ids}


def _as_list(x: object) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_placeholders(model: torch.nn.Module, token_ids: dict[int, list[int]]) -> None:
    """Placeholder ids a text-only model (no ``vision_config`` or ``audio_config``) can never
    receive are refused: an id past its input embedding would fail in it, and without that id
    every token counts as text. One that is also its bos or eos token is warned about."""
    config = getattr(model, "config", None)
    multimodal = any(hasattr(config, f"{k}_config") for k in ("vision", "audio", "video"))
    try:
        hf: Any = model  # a transformers model, or another module
        rows = getattr(hf.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # not a transformers model, or none to give
        rows = None
    names = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}
    for mod, toks in token_ids.items():
        for t in toks:
            if not multimodal and isinstance(rows, int) and t >= rows:
                raise UsageError(
                    f"the {names.get(mod, mod)} token id {t} in {type(model).__name__}'s config "
                    f"is outside its vocabulary ({rows} embeddings): no input can hold it, so "
                    "every token would count as text",
                    f"set it to the id of the placeholder token your data holds (< {rows})",
                )
            same = [
                k for k in ("bos", "eos") if t in _as_list(getattr(config, f"{k}_token_id", None))
            ]
            if same:
                warnings.warn(
                    f"the {names.get(mod, mod)} token id {t} is also the {same[0]} token of "
                    f"{type(model).__name__}: every {same[0]} token counts as "
                    f"{names.get(mod, mod)}; fix: give the placeholder an id of its own",
                    stacklevel=5,
                )


def modality_ids(
    input_ids: Tensor | None = None,
    *,
    token_ids: Mapping[int, int | Sequence[int]] | None = None,
    mm_token_type_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    level: str = "token",
) -> Tensor:
    """Modality ids ``(B, S)`` from the inputs a Hugging Face model receives.

    Args:
        input_ids: ``(B, S)`` token ids; used with ``token_ids`` when ``mm_token_type_ids`` is
            not given.
        token_ids: placeholder token ids per modality, e.g. ``{1: image_token_id}`` (see
            :func:`special_token_ids`).
        mm_token_type_ids: ``(B, S)`` processor output (0 text, 1 image, 2 video, 3 audio); wins
            over ``input_ids``.
        attention_mask: ``(B, S)``, 0 for padding, or a 4-D mask ``(B, H, S, K)`` (see
            :func:`token_mask`); padding becomes ``-1``.
        level: ``"token"`` (each token its own modality, the default) or ``"sample"`` (every
            token of a sample holding any non-text token gets that sample's non-text modality,
            the smallest one if several; pure-text samples stay 0).

    Returns:
        ``(B, S)`` int64 tensor.

    Raises:
        ValueError: if neither ``mm_token_type_ids`` nor ``input_ids`` with ``token_ids`` is
            given, on shape mismatches, or an unknown ``level``.
    """
    if level not in LEVELS:
        raise UsageError(f"level must be one of {LEVELS}; got {level!r}")
    if mm_token_type_ids is not None:
        ids = mm_token_type_ids.long()  # (B, S)
    elif input_ids is not None and token_ids:
        ids = torch.zeros_like(input_ids, dtype=torch.long)  # (B, S)
        for mod, toks in _placeholders(token_ids).items():
            hit = torch.isin(input_ids, input_ids.new_tensor(toks))  # (B, S)
            ids = ids.masked_fill(hit, mod)
    else:
        raise UsageError(
            "cannot tell modalities apart: pass mm_token_type_ids (from the processor), or "
            "input_ids together with token_ids={1: image_token_id}, or explicit modality ids"
        )
    if ids.dim() == 1:
        ids = ids[None, :]  # (1, S)
    if ids.dim() != 2:
        raise UsageError(f"modality ids must be (B, S); got shape {tuple(ids.shape)}")
    if level == "sample":
        nontext = torch.where(ids > 0, ids, torch.full_like(ids, 1 << 30))  # (B, S)
        sample_mod = nontext.amin(dim=1, keepdim=True)  # (B, 1)
        sample_mod = torch.where(sample_mod == 1 << 30, torch.zeros_like(sample_mod), sample_mod)
        ids = torch.where(ids >= 0, sample_mod.expand_as(ids), ids)  # (B, S)
    if attention_mask is not None:
        ids = ids.masked_fill(~token_mask(attention_mask, (ids.shape[0], ids.shape[1])), IGNORE)
    return ids


def _placeholders(token_ids: object) -> dict[int, list[int]]:
    """``token_ids`` as ``{modality id: [token ids]}``, or one line naming the fix."""
    fix = "e.g. token_ids={1: image_token_id} or {1: [image_id], 2: [video_id]}"

    def integer(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(token_ids, Mapping):
        raise WrongType(f"token_ids must be a dict {{modality id: token id(s)}}; got "
                        f"{type(token_ids).__name__} {token_ids!r:.40}", fix)  # fmt: skip
    out = {}
    for mod, toks in token_ids.items():
        mod = int(mod) if isinstance(mod, str) and mod.lstrip("-").isdigit() else mod  # JSON
        toks = toks.tolist() if isinstance(toks, Tensor) else toks
        toks = [toks] if not isinstance(toks, (Sequence, set)) or isinstance(toks, str) else toks
        if not integer(mod) or mod < IGNORE or not all(integer(t) and t >= 0 for t in toks):
            raise UsageError(
                f"token_ids={token_ids!r:.80}: each key must be a modality id (1 image, 2 video, "
                "3 audio, -1 ignore) and each value a token id >= 0 or a list of them", fix
            )  # fmt: skip
        out[mod] = list(toks)
    return out


def _attends(mask: Tensor) -> Tensor:
    """Where a 3-D or 4-D attention mask lets a query attend a key, as the model reads it: bool
    masks are True where attended; float masks are additive (0 attends, -inf or the dtype's
    minimum masks); integer masks are 1 where attended."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    if bool((mask > 0).any()):  # a 0/1 "keep" mask would be read as biases by the model
        raise UsageError(
            f"attention_mask ({mask.dtype}, {mask.dim()}-D) holds positive values: a float 4-D "
            "mask is additive (0 attends, -inf masks); fix: pass a bool mask (True attends) or "
            "the additive form, e.g. (1 - keep) * torch.finfo(dtype).min"
        )
    return mask > torch.finfo(mask.dtype).min / 2


def token_mask(attention_mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """Which tokens count ``(B, S)`` bool (False for padding), from a 2-D or a 4-D mask.

    A 4-D mask ``(B, H, S, K)`` (or 3-D ``(B, S, K)``; ``B`` and ``H`` may be 1) has one row per
    token of the forward and one column per key, the cached ones included. A token is padding
    when no token of the forward may attend its key: this holds for causal, packed
    (block-diagonal) and bidirectional masks alike. Its key is among the last ``S`` columns (no
    cache, or a growing KV cache) unless a static cache puts the forward's keys elsewhere (no
    token then attends its own column there): causal attention is assumed in that case, and a
    token counts when it attends a key beyond those the tokens before it attend.

    Raises:
        ValueError: on shapes that do not fit ``shape``, or an ambiguous float mask.
    """
    B, S = shape
    if attention_mask.dim() == 2 and tuple(attention_mask.shape) == (B, S):
        return attention_mask != 0
    m = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask
    if m.dim() != 4 or m.shape[0] not in (1, B) or m.shape[2] != S or m.shape[3] < S:
        raise UsageError(
            f"attention_mask must be (B, S) = {(B, S)} or 4-D (B, heads, S, keys >= S); got "
            f"{tuple(attention_mask.shape)}; fix: pass modality ids explicitly (-1 for padding)"
        )
    a = _attends(m).any(dim=1)  # (B, S, K): a query attends a key through any head
    K = a.shape[-1]
    q = torch.arange(S, device=a.device)
    if K == S or bool(a[:, q, K - S + q].any()):
        keep = a[:, :, K - S :].any(dim=1)  # (B, S): some query attends the token's key
    else:  # a static cache: the last key each token attends must move on
        last = torch.where(a, torch.arange(K, device=a.device), -1).amax(dim=-1)  # (B, S)
        before = torch.cummax(last, dim=-1).values.roll(1, dims=-1)
        before[:, 0] = -1
        keep = last > before
    return keep.expand(B, S)


# Named groupings: each maps modality ids onto the id they are counted as.
GROUPS: dict[str, dict[int, int]] = {
    "visual": {VIDEO: IMAGE},  # image and video tokens are one "visual" modality (id 1)
    "nontext": {VIDEO: IMAGE, AUDIO: IMAGE},  # everything that is not text is modality 1
}


def _group_id(x: object, groups: object) -> int:
    """A modality id of a grouping: an integer, or its digits (JSON keys are strings)."""
    if isinstance(x, str) and x.strip().isdigit():
        return int(x)
    if isinstance(x, int) and not isinstance(x, bool):
        if x < 0:
            raise UsageError(f"groups={groups!r}: {x} is not a modality id (ids are >= 0)")
        return x
    raise WrongType(
        f"groups={groups!r}: {x!r} is not a modality id; fix: map integer ids, e.g. "
        "groups={2: 1} (video counts as image)"
    )


def resolve_groups(
    groups: dict[int, int] | str | None, *, keep: Sequence[int] = ()
) -> dict[int, int]:
    """A grouping as a ``{from_id: to_id}`` dict: a name of :data:`GROUPS`, a dict, or None.

    Args:
        groups: the grouping.
        keep: ids that must stay themselves (the two sides of the MRD: merging one into another
            id leaves that side empty on every forward).

    Raises:
        ValueError: for an unknown name, negative ids, or an id of ``keep`` mapped away.
        TypeError: for ids that are not integers.
    """
    if groups is None:
        return {}
    if isinstance(groups, str):
        if groups not in GROUPS:
            raise UsageError(f"unknown modality grouping {groups!r}; known: {sorted(GROUPS)}",
                             "groups='visual', groups={2: 1} or groups=None")  # fmt: skip
        out = dict(GROUPS[groups])
    elif isinstance(groups, Mapping):
        out = {_group_id(a, groups): _group_id(b, groups) for a, b in groups.items()}
    else:
        raise WrongType(
            f"groups must be a name of {sorted(GROUPS)}, a dict {{from_id: to_id}} or None; "
            f"got {type(groups).__name__}", "groups='visual', groups={2: 1} or groups=None"
        )  # fmt: skip
    for a, b in out.items():
        if a in keep and b != a:
            raise UsageError(
                f"groups={groups!r} counts modality {a} as {b}, but the MRD compares "
                f"modalities {tuple(keep)}: that side would be empty on every forward (band 0, "
                "MRD NaN); fix: group the other modalities onto them, e.g. groups={2: 1}"
            )
    return out


def group_modalities(ids: Tensor, groups: dict[int, int] | str | None) -> Tensor:
    """Modality ids with grouped modalities counted as one, e.g. ``"visual"``: video -> image.

    Args:
        ids: modality ids, any shape (``-1`` stays ``-1``).
        groups: ``{from_id: to_id}``, or a name of :data:`GROUPS`.

    Returns:
        A tensor of the same shape; ``ids`` itself when there is nothing to group.
    """
    table = resolve_groups(groups)
    if not table:
        return ids
    out = ids.clone()
    for a, b in table.items():
        out = out.masked_fill(ids == a, b)
    return out


class ModalityState:
    """The modality ids of the current forward, shared by the hooks and the bias wrappers."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None  # (B, S) or (T,), derived from the last forward's inputs
        self.explicit: Tensor | None = None  # set by the caller; wins over derived ids
        self.shape: tuple[int, int] | None = None  # (B, S) of the last forward's inputs, if known
        self.fitted = False  # the explicit ids fitted a forward since they were set
        # True: the bias wrappers check the ids at once (a host-device sync); False: they keep
        # the largest id seen (max_id, on the device) for a later check (Regularizer.check)
        self.check_ids = True
        self.max_id: Tensor | None = None
        # sample level: each row's id in the sequence being generated (B,), for decode steps
        self.sample_rows: Tensor | None = None

    def current(self) -> Tensor | None:
        """Explicit ids if they fit the current forward, else the derived ones: the decode steps
        of ``generate()`` after ``set_modality(prompt ids)`` see their new tokens."""
        explicit = self.explicit
        if explicit is not None and (self.shape is None or self.fits(explicit, self.shape)):
            return explicit
        return self.ids if self.ids is not None else explicit

    @staticmethod
    def fits(ids: Tensor, shape: tuple[int, int]) -> bool:
        """Explicit ids fit a forward of ``shape`` (B, S): ``(T,)`` of ``B * S``, or ``(B, S)``."""
        if ids.dim() == 1:
            return ids.numel() == shape[0] * shape[1]
        return tuple(ids.shape) == shape

    def flat(self, num_tokens: int, who: str) -> Tensor:
        ids = self.current()
        if ids is None:
            raise UsageError(
                f"{who} needs the modality ids of this forward but none are known: call the "
                "model with input_ids (and a config with image_token_id) or mm_token_type_ids, "
                "or call regularizer.set_modality(ids) before the forward"
            )
        flat = ids.reshape(-1)  # (T,)
        if flat.numel() != num_tokens:
            raise UsageError(
                f"{who} routed {num_tokens} tokens but the modality ids have {flat.numel()} "
                f"(shape {tuple(ids.shape)}); set explicit ids with regularizer.set_modality(ids)"
            )
        return flat
