"""Capture of raw router logits with removable forward hooks, and of each forward's modality ids.

``record(model)`` finds a model's routers (through :mod:`smar.adapters`), captures their raw
logits ``(T, E)`` per MoE layer on every forward and derives the modality ids of the batch from
the model's inputs (:mod:`smar.modality`), without changing the model::

    with smar.record(model) as rec:
        model(**batch)
        stats.update(rec.logits(), rec.modality_ids, top_k=rec.top_k)

It does not use ``output_router_logits``, whose behaviour varies across transformers versions and
models. :class:`smar.routing.Regularizer` builds on :class:`RouterCapture`.

Shapes legend: B batch, S sequence, T = B * S tokens, L MoE layers, E experts.

This module does not import transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from smar.adapters import Adapter, RouterSite, find_routers, no_router_error
from smar.bias import ModalityBiasRouter, RouterLinear, logit_weight
from smar.errors import UsageError, WrongType
from smar.modality import (
    LEVELS,
    ModalityState,
    check_placeholders,
    group_modalities,
    modality_ids,
    resolve_groups,
    special_token_ids,
    token_mask,
)
from smar.wrapping import check_adapters as _check_adapters
from smar.wrapping import unwrap

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["RouterCapture", "record", "unwrap"]


def _continues_cache(kwargs: dict[str, Any]) -> bool:
    """The forward continues a cached sequence (a decode step of ``generate()``): its KV cache
    already holds tokens."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    try:
        return bool(length is not None and length() > 0)
    except (TypeError, ValueError, AttributeError):  # a cache that cannot say
        return False


def _top_k(site: RouterSite) -> int | None:
    """The router's top-k, looked up once (None when it cannot be told)."""
    if "top_k" not in site.extra:
        try:
            site.extra["top_k"] = site.top_k
        except (ValueError, AttributeError):
            site.extra["top_k"] = None
    return site.extra["top_k"]


def _choice_in(output: object, num_tokens: int, top_k: int | None) -> Tensor | None:
    """The selected experts ``(T, K)`` in a router's output tuple: its one integer tensor of
    ``T * K`` elements shaped ``(..., K)``, else None."""
    if top_k is None or not isinstance(output, (tuple, list)):
        return None
    found = [
        x
        for x in output
        if isinstance(x, Tensor)
        and not x.is_floating_point()
        and x.dim() >= 2
        and x.shape[-1] == top_k
        and x.numel() == num_tokens * top_k
    ]
    return found[0].reshape(num_tokens, top_k) if len(found) == 1 else None


class RouterCapture:
    """Captures raw router logits per MoE layer and the modality ids of each forward.

    Created by :func:`record` (and, with a loss, :func:`attach`). A forward pre-hook on the model
    clears the last capture and derives modality ids from the call's ``input_ids``,
    ``mm_token_type_ids`` and ``attention_mask``; forward hooks on the routers store their logits.
    Usable as a context manager that detaches on exit.

    Attributes:
        sites: the routers found, ordered by layer (:class:`smar.adapters.RouterSite`).
        layers: the decoder layer index of each router.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter: Adapter | Sequence[Adapter] | None = None,
        modality: str = "token",
        groups: dict[int, int] | str | None = None,
        kinds: str | Sequence[str] = "mlp",
    ):
        model = unwrap(model, "record")
        if modality not in LEVELS:
            raise UsageError(f"modality must be one of {LEVELS}; got {modality!r}")
        adapter = _check_adapters(adapter)
        self.groups = resolve_groups(groups)
        sites = find_routers(model, adapter, kinds=kinds)
        if not sites:
            asked = {kinds} if isinstance(kinds, str) else set(kinds)
            other = "attention" if asked == {"mlp"} else "mlp"
            if asked == {"mlp", "attention"} or not find_routers(model, adapter, kinds=other):
                raise no_router_error(model, adapter)
            raise UsageError(
                f"{type(model).__name__} has {other} routers only, not the {asked.pop()} routers "
                f"asked for", f"pass SMARConfig(routers='{other}') (or record(model, "
                f"kinds='{other}'))",
            )  # fmt: skip
        for s in sites:
            k, E = _top_k(s), s.num_experts
            if k is not None and E is not None and k > E:
                raise UsageError(
                    f"{s.name} chooses top_k={k} of its {E} experts (num_experts_per_tok in the "
                    "model's config?)", f"set it to at most {E}",
                )  # fmt: skip
        routers = {s.adapter.router for s in sites}
        if len(routers) > 1:
            raise UsageError(f"mixed softmax and sigmoid routers in one model: {routers}")
        self.model = model
        self.sites: list[RouterSite] = sites
        self.layers = [s.layer for s in sites]
        self.router = sites[0].adapter.router
        self.level = modality
        self.token_ids = special_token_ids(getattr(model, "config", None))
        check_placeholders(model, self.token_ids)
        self._state = ModalityState()
        self._logits: dict[int, Tensor] = {}
        self._chosen: dict[int, Tensor] = {}  # the experts each router chose, where it says
        self._handles: list = []
        self._hook_routers()
        self._handles.append(
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        )

    def _hook_routers(self) -> None:
        for site in self.sites:
            self._hook(site, site.module)

    def _hook(self, site: RouterSite, target: nn.Module) -> None:
        """Captures the logits of ``site`` from ``target`` (the router, or its bias wrapper)."""
        if not site.adapter.from_linear or isinstance(target, ModalityBiasRouter):
            self._handles.append(target.register_forward_hook(self._capture_hook(site)))
            return
        # logits that are not in the output: read from the router's linear layer while it runs
        shape = tuple(logit_weight(site.module).shape)
        modes: list[RouterLinear] = []

        def before(module: nn.Module, args: tuple[Any, ...]) -> None:
            modes.append(RouterLinear(shape, keep=True))
            modes[-1].__enter__()

        def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            mode = modes.pop()
            mode.__exit__(None, None, None)
            if mode.logits is not None:
                self._logits[site.layer] = mode.logits.reshape(-1, shape[0])  # (T, E)

        self._handles.append(target.register_forward_pre_hook(before))
        self._handles.append(target.register_forward_hook(after, always_call=True))

    def _capture_hook(
        self, site: RouterSite
    ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if site.adapter.from_linear:  # the bias wrapper kept them
                z = cast(ModalityBiasRouter, module).last_logits
                assert z is not None  # the wrapper's forward has just set them
                self._logits[site.layer] = z.reshape(-1, z.shape[-1])  # (T, E)
                return
            z = site.adapter.logits(output)  # (T, E)
            self._logits[site.layer] = z
            chosen = (
                _choice_in(output, z.shape[0], _top_k(site))
                if isinstance(output, (tuple, list))
                else None
            )
            if chosen is not None:
                self._chosen[site.layer] = chosen

        return hook

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._logits = {}
        self._chosen = {}
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, Tensor):
            input_ids = None
        mm = kwargs.get("mm_token_type_ids")
        embeds = kwargs.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        # (B, S) from token ids, or from embeddings (B, S, D); a float (T, D) tells no batch
        shape = (
            (int(shaped.shape[0]), int(shaped.shape[1]))
            if isinstance(shaped, Tensor) and shaped.dim() >= 2 + shaped.is_floating_point()
            else None
        )
        state = self._state
        state.shape = shape
        continues = _continues_cache(kwargs)
        if state.explicit is not None and shape is not None:
            if state.fits(state.explicit, shape):
                state.fitted = True
                if self.level == "sample":  # the rows' ids, for generate()'s decode steps
                    state.sample_rows = state.explicit.reshape(shape).amax(dim=1).clamp_min(0)
                return None  # the caller's ids are this forward's: nothing to derive
            if not state.fitted:  # ids that fit no forward would be ignored
                raise UsageError(
                    f"set_modality ids of shape {tuple(state.explicit.shape)} do not fit this "
                    f"forward's inputs {shape}; fix: set_modality(ids of shape {shape}), or "
                    "set_modality(None) to derive them from the inputs (ids apply to the "
                    "forwards they fit: generate()'s decode steps derive their own)"
                )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # one mask per attention type (generate(), static cache)
            mask = mask.get("full_attention", next(iter(mask.values()), None))
        if not isinstance(mask, Tensor):
            mask = None  # a flex-attention BlockMask: its padding cannot be read
        elif shape is not None and mask.dim() == 2 and mask.shape[1] > shape[1]:
            # With a KV cache the mask covers the cached tokens too: the last S are this call's.
            mask = mask[:, -shape[1] :]
        elif mask.dim() > 2:  # padding read from a 4-D mask, as modality_ids() reads it
            mask = None if shape is None else token_mask(mask, shape)  # (B, S) bool
        width = None if shape is None else shape[1]
        if mm is not None and width is not None and mm.dim() == 2 and mm.shape[1] > width:
            mm = mm[:, -width:]
        if mm is None and input_ids is None:
            state.ids = None  # inputs_embeds only: set_modality() must say
            return None
        # A text-only model (no placeholder token in its config) sees text only.
        token_ids = self.token_ids if self.token_ids else None
        if mm is None and token_ids is None and input_ids is not None:
            ids = torch.zeros_like(input_ids, dtype=torch.long)
            ids = ids if mask is None else ids.masked_fill(mask == 0, -1)
        else:
            ids = modality_ids(
                input_ids,
                token_ids=token_ids,
                mm_token_type_ids=mm,
                attention_mask=mask,
                level=self.level,
            )
        if self.level == "sample":
            ids = self._sample_rows(ids, continues)
        state.ids = group_modalities(ids, self.groups)  # (B, S)
        return None

    def _sample_rows(self, ids: Tensor, continues: bool) -> Tensor:
        """Sample-level ids across ``generate()``: a decode step's new tokens hold no image, yet
        belong to their row's sample; they keep the id the row's prompt had (its forward saved
        it), so that generating routes as the teacher-forced sequence does."""
        state = self._state
        rows = state.sample_rows  # (B,) or None
        if continues and rows is not None and rows.shape[0] == ids.shape[0]:
            keep = rows.to(ids.device)[:, None].expand_as(ids)  # (B, S)
            return torch.where(ids >= 0, torch.maximum(ids, keep), ids)
        state.sample_rows = ids.amax(dim=1).clamp_min(0)  # (B,): a new sequence starts
        return ids

    def set_modality(self, ids: Tensor | None) -> None:
        """Sets explicit modality ids ``(B, S)`` or ``(T,)`` for the next forwards (``None``:
        derive them from the inputs again).

        They apply to every forward they fit; the first forward after this call must fit them
        (else it is refused); later forwards that do not fit (``generate()``'s decode steps after
        the prompt) derive their own ids from their inputs.

        Raises:
            TypeError: if ``ids`` is not an integer tensor.
            ValueError: for a shape other than ``(T,)`` or ``(B, S)``, ids below -1, or ids
                that are all -1 (no token would count).
        """
        if ids is not None:
            if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
                got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
                raise WrongType(
                    f"set_modality(ids): ids must be an integer tensor (0 text, 1 image, -1 "
                    f"ignore); got {got}; fix: e.g. ids.long()"
                )
            if ids.dim() not in (1, 2) or ids.numel() == 0:
                raise UsageError(
                    f"set_modality(ids): ids must have shape (T,) or (B, S) with tokens; got "
                    f"{tuple(ids.shape)}"
                )
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < -1:
                raise UsageError(
                    f"set_modality(ids): ids hold {lo}; fix: modality ids are >= 0 (0 text, 1 "
                    "image), and -1 marks a token to ignore"
                )
            if hi < 0:
                raise UsageError(
                    "set_modality(ids): every id is -1: no valid token for the band loss, the "
                    "MRD or load balancing; fix: mark text tokens 0 and image tokens 1 (-1 only "
                    "for padding)"
                )
        self._state.explicit = ids
        self._state.fitted = False

    @property
    def modality_ids(self) -> Tensor | None:
        """The modality ids of the last forward, flattened ``(T,)``, or None if unknown."""
        ids = self._state.current()
        return None if ids is None else ids.reshape(-1)

    def logits(self) -> list[Tensor]:
        """The raw logits ``(T, E)`` of each MoE layer in the last forward, ordered by layer.

        Raises:
            ValueError: if no router ran since the last forward started.
        """
        if not self._logits:
            raise UsageError(
                "no router logits captured: run a forward pass of the model after attach/record "
                "(and before detach)"
            )
        return [self._logits[layer] for layer in sorted(self._logits)]

    def chosen(self) -> list[Tensor] | None:
        """The experts each router chose in the last forward, ``(T, K)`` per layer in the order
        of :meth:`logits`, read from the routers' own outputs (most transformers routers return
        them beside the logits); None unless every router did. The balancing loss counts these
        instead of computing a second top-k."""
        if not self._chosen or sorted(self._chosen) != sorted(self._logits):
            return None
        return [self._chosen[layer] for layer in sorted(self._chosen)]

    @property
    def captured_layers(self) -> list[int]:
        """Decoder layer indices of the captured logits, in the order of :meth:`logits`."""
        return sorted(self._logits)

    @property
    def top_k(self) -> int:
        ks = {s.top_k for s in self.sites}
        if len(ks) > 1:
            raise UsageError(f"routers disagree on top-k: {sorted(ks)}")
        return ks.pop()

    def detach(self) -> None:
        """Removes every hook; the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._logits = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}, {len(self.sites)} routers "
            f"({self.sites[0].adapter.name}), layers={self.layers})"
        )


def record(
    model: nn.Module,
    *,
    adapter: Adapter | Sequence[Adapter] | None = None,
    modality: str = "token",
    groups: dict[int, int] | str | None = None,
    kinds: str | Sequence[str] = "mlp",
) -> RouterCapture:
    """Captures router logits and modality ids of each forward, without changing the model.

    Args:
        model: a model whose routers :func:`smar.adapters.find_routers` finds.
        adapter: adapters for routers the model does not declare.
        modality: ``"token"`` or ``"sample"`` (see :func:`smar.modality.modality_ids`).
        groups: modality ids counted as one, e.g. ``"visual"`` (video counts as image) or
            ``{2: 1, 3: 1}`` (see :func:`smar.modality.group_modalities`).
        kinds: ``"mlp"``, ``"attention"`` or both (see :func:`smar.adapters.find_routers`).

    Example:
        >>> with smar.record(model) as rec:          # doctest: +SKIP
        ...     model(**batch)
        ...     stats.update(rec.logits(), rec.modality_ids, top_k=rec.top_k)
    """
    return RouterCapture(model, adapter=adapter, modality=modality, groups=groups, kinds=kinds)
