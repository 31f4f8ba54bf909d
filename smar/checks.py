"""Input validation of the canonical routing representation (router logits ``(T, E)`` per layer,
modality ids, masks, top-k, router kind): every public function of :mod:`smar.distributions`,
:mod:`smar.losses`, :mod:`smar.baselines` and :mod:`smar.metrics` goes through these, so errors
read the same everywhere. :mod:`smar.distributions` re-exports them.

Shapes legend: L MoE layers, T tokens, E experts, B batch, S sequence.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from smar.errors import UsageError, WrongType

ROUTERS = ("softmax", "sigmoid", "sqrtsoftplus")  # how a router scores experts
_ROUTERS = ROUTERS


def _layer_list(router_logits: Sequence[Tensor], name: str) -> list[Tensor]:
    """Checks a sequence of per-layer logits: L tensors (T, E) of one shape."""
    if len(router_logits) == 0:
        raise UsageError(f"{name} is empty: no MoE layer was captured")
    for i, layer in enumerate(router_logits):
        if not isinstance(layer, Tensor) or layer.dim() != 2:
            shape = tuple(layer.shape) if isinstance(layer, Tensor) else type(layer).__name__
            raise UsageError(f"{name}[{i}] must be a (T, E) tensor; got {shape}")
        if layer.shape != router_logits[0].shape:
            raise UsageError(
                f"{name}[{i}] has shape {tuple(layer.shape)} but {name}[0] has "
                f"{tuple(router_logits[0].shape)}: every layer must route the same tokens"
            )
    return list(router_logits)


def _check_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...], name: str) -> None:
    if not dtype.is_floating_point:
        raise UsageError(f"{name} must be floating point (raw router logits); got {dtype}")
    if shape[1] == 0 or shape[2] == 0:
        raise UsageError(f"{name} has no tokens or no experts: shape (L, T, E) = {shape}")


def _check_values(layers: Sequence[Tensor], name: str) -> None:
    """NaN, +inf and fully masked tokens, with one wait for the device in the common case: NaN
    propagates into both extremes, +inf shows in the max, -inf (a masked expert under hard
    routing) in the min; only then is the rarer per-token check needed."""
    extremes = torch.stack([torch.stack(torch.aminmax(z.detach())) for z in layers])  # (L, 2)
    lo, hi = extremes[:, 0].min(), extremes[:, 1].max()
    if torch.isnan(hi) or torch.isnan(lo) or torch.isposinf(hi):
        raise UsageError(f"{name} contains NaN or +inf: check the model's forward for overflow")
    if torch.isneginf(lo) and any(torch.isneginf(z.detach().amax(dim=-1)).any() for z in layers):
        raise UsageError(f"{name} has a token whose experts are all -inf: it cannot be routed")


def _upcast(z: Tensor) -> Tensor:
    # routing statistics are sums over many tokens and lose too much in half precision
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def checked(router_logits: Tensor | Sequence[Tensor], name: str, check: bool) -> Tensor | list:
    """The logits validated: one (L, T, E) tensor as given, or the list of L layers (T, E)."""
    if isinstance(router_logits, Tensor):
        if router_logits.dim() != 3:
            raise UsageError(
                f"{name} must be a sequence of (T, E) tensors or one (L, T, E) tensor; got a "
                f"tensor of shape {tuple(router_logits.shape)}. For a single layer pass [logits]."
            )
        _check_dtype_and_shape(router_logits.dtype, tuple(router_logits.shape), name)
        z = _upcast(router_logits)
        if check:
            _check_values([z], name)
        return z
    if not isinstance(router_logits, (list, tuple)):
        raise UsageError(
            f"{name} must be a sequence of (T, E) tensors or one (L, T, E) tensor; "
            f"got {type(router_logits).__name__}"
        )
    layers = _layer_list(router_logits, name)
    _check_dtype_and_shape(layers[0].dtype, (len(layers), *layers[0].shape), name)
    layers = [_upcast(z) for z in layers]
    dtype = functools.reduce(torch.promote_types, (z.dtype for z in layers))
    layers = [z.to(dtype) for z in layers]  # one dtype, as stacking them would give
    if check:
        _check_values(layers, name)
    return layers


def as_logits(
    router_logits: Tensor | Sequence[Tensor], name: str = "router_logits", *, check: bool = True
) -> Tensor:
    """Validates router logits and returns them as one float tensor ``(L, T, E)``.

    Low-precision logits (fp16, bf16) are upcast to float32: routing statistics are sums over
    many tokens and lose too much in half precision. ``check=False`` skips the checks of the
    values (NaN, +inf, a token with every expert at -inf), which wait for the device: a training
    loop that checked its first forward can skip them later (the losses then come out NaN).
    """
    z = checked(router_logits, name, check)
    return z if isinstance(z, Tensor) else torch.stack(z)  # (L, T, E)


def _flat_ids(ids: Tensor, num_tokens: int, name: str, *, allow_bool: bool) -> Tensor:
    if not isinstance(ids, Tensor):
        raise UsageError(f"{name} must be a tensor; got {type(ids).__name__}")
    if ids.dtype == torch.bool:
        if not allow_bool:
            raise UsageError(
                f"{name} must be an integer tensor (0 text, 1 image, -1 ignore); got bool"
            )
    elif ids.is_floating_point() or ids.is_complex():
        if not allow_bool:
            raise UsageError(
                f"{name} must be an integer tensor (0 text, 1 image, -1 ignore); got {ids.dtype}"
            )
        if not torch.isin(ids, ids.new_tensor([0.0, 1.0])).all():
            raise UsageError(f"{name} must hold only 0 and 1 (or be bool)")
    if ids.dim() not in (1, 2):
        raise UsageError(f"{name} must have shape (T,) or (B, S); got {tuple(ids.shape)}")
    flat = ids.reshape(-1)  # (T,) row-major, matching the logits' rows
    if flat.numel() != num_tokens:
        raise UsageError(
            f"{name} has {flat.numel()} tokens (shape {tuple(ids.shape)}) but the router logits "
            f"have T={num_tokens} rows"
        )
    return flat


def modality_ids_flat(modality_ids: Tensor, num_tokens: int) -> Tensor:
    """Validates modality ids and returns them flattened to ``(T,)`` int64."""
    return _flat_ids(modality_ids, num_tokens, "modality_ids", allow_bool=False).long()


def check_mask(mask: Tensor | None) -> None:
    """An integer mask must hold only 0 and 1: it weighs tokens, so modality ids passed as a
    mask would weigh image tokens 1, video tokens 2 and padding -1."""
    if not isinstance(mask, Tensor) or mask.dtype == torch.bool or mask.is_floating_point():
        return  # bool is the canonical form; float masks are checked for 0/1 downstream
    if mask.is_meta or mask.numel() == 0:
        return
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.numel():
        raise UsageError(
            f"mask holds {sorted(set(bad.unique()[:4].tolist()))}: a mask is bool (or 0 and 1), "
            "true for the tokens that count; fix: pass a bool mask, e.g. mask=ids >= 0 for "
            "modality ids"
        )


def mask_flat(mask: Tensor | None, num_tokens: int) -> Tensor | None:
    """Validates a token mask and returns it as float ``(T,)`` of 0/1, or None."""
    if mask is None:
        return None
    check_mask(mask)
    return _flat_ids(mask, num_tokens, "mask", allow_bool=True).float()


def check_router(router: str) -> None:
    if router not in _ROUTERS:
        raise UsageError(f"router must be one of {_ROUTERS}; got {router!r}")


def check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise UsageError(f"top_k must be an integer in [1, E={num_experts}]; got {top_k!r}")


def check_modalities(modalities: Sequence[int], name: str = "modalities") -> tuple[int, ...]:
    mods = tuple(int(m) for m in modalities)
    if not mods or any(m < 0 for m in mods) or len(set(mods)) != len(mods):
        raise UsageError(f"{name} must be distinct non-negative ids; got {tuple(modalities)}")
    return mods


def check_weight(name: str, value: object) -> None:
    """A loss weight must be a finite number >= 0 (NaN would make the total NaN, a negative
    weight rewards the term it weighs)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WrongType(f"{name} must be a number >= 0; got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise UsageError(
            f"{name}={value!r} must be a finite number >= 0; fix: {name}=0.0 turns the term off"
        )


def check_logits(router_logits: object) -> None:
    """Router logits with values to read: not on the meta device, at least one token."""
    first = router_logits
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    if not isinstance(first, Tensor):
        return  # a Routing, or an error the canonical checks word
    if first.is_meta:
        raise UsageError(
            "router_logits are on the meta device (shapes without values, e.g. a model built "
            "under init_empty_weights); fix: load the model's weights before its forward"
        )
    if first.dim() >= 2 and first.shape[-2] == 0:
        shape = tuple(first.shape)
        raise UsageError(f"router_logits have no token (T=0, shape {shape})", "route a token")
