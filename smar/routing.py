"""Capture of router logits with removable hooks, the modality bias wrapper, and the regularizer.

``attach(model, config)`` finds a model's routers (through :mod:`smar.adapters`), captures their
raw logits ``(T, E)`` per MoE layer with forward hooks on every forward, derives the modality ids
of the batch from the model's inputs (:mod:`smar.modality`), optionally replaces each router with
a :class:`ModalityBiasRouter`, and returns a :class:`Regularizer` whose ``loss()`` is SMAR's
routing objective for the last forward::

    reg = smar.attach(model, smar.SMARConfig())
    out = model(**batch)
    loss = out.loss + reg.loss()
    ...
    reg.detach()                      # the model is exactly as before

``record(model)`` captures only (no bias, no loss). Neither uses ``output_router_logits``, whose
behaviour varies across transformers versions and models.

Shapes legend: B batch, S sequence, T = B * S tokens, L MoE layers, E experts, M modalities.

This module does not import transformers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from smar.adapters import Adapter, RouterSite, find_routers, no_router_error
from smar.losses import routing_objective, z_loss
from smar.modality import LEVELS, modality_ids, special_token_ids

__all__ = [
    "SMARConfig",
    "ModalityBiasRouter",
    "RouterCapture",
    "Regularizer",
    "attach",
    "record",
    "balancing_loss_in_model",
]

log = logging.getLogger(__name__)


@dataclass
class SMARConfig:
    """Weights and options of the SMAR regularizer (SPEC.md section 3 defaults).

    Args:
        smar_weight: weight of the tolerance-band loss on the per-layer MRD.
        band: ``(low, high)`` band of the MRD, or a list of one pair per MoE layer.
        hinge: ``"linear"`` or ``"squared"``.
        lb_weight: weight of the (Switch) load-balancing loss; 0 turns it off.
        lb_variant: ``"switch"`` (1 when balanced) or ``"hf"`` (transformers' pooled version).
        z_weight: weight of the router z-loss.
        modality_bias: replace each router by a :class:`ModalityBiasRouter` with a trainable,
            zero-initialised bias ``(M, E)``.
        modality: ``"token"`` (image tokens are 1, every text token 0) or ``"sample"`` (every
            token of a multimodal sample is 1).
        num_modalities: ``M``, rows of the modality bias (0 text, 1 image, 2 video, 3 audio).
        text: the anchor modality id of the MRD.
        image: the other modality id of the MRD.
    """

    smar_weight: float = 1.0
    band: tuple[float, float] | Sequence[tuple[float, float]] = (1.5, 2.0)
    hinge: str = "linear"
    lb_weight: float = 0.01
    lb_variant: str = "switch"
    z_weight: float = 0.0
    modality_bias: bool = True
    modality: str = "token"
    num_modalities: int = 2
    text: int = 0
    image: int = 1

    def __post_init__(self):
        for name in ("smar_weight", "lb_weight", "z_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a number >= 0; got {v!r}")
        if self.hinge not in ("linear", "squared"):
            raise ValueError(f"hinge must be 'linear' or 'squared'; got {self.hinge!r}")
        if self.lb_variant not in ("switch", "hf"):
            raise ValueError(f"lb_variant must be 'switch' or 'hf'; got {self.lb_variant!r}")
        if self.modality not in LEVELS:
            raise ValueError(f"modality must be one of {LEVELS}; got {self.modality!r}")
        if not isinstance(self.num_modalities, int) or self.num_modalities < 2:
            raise ValueError(f"num_modalities must be an integer >= 2; got {self.num_modalities}")
        if not 0 <= self.image < self.num_modalities or not 0 <= self.text < self.num_modalities:
            raise ValueError(
                f"text={self.text} and image={self.image} must be < num_modalities="
                f"{self.num_modalities}"
            )
        if isinstance(self.band, list) and self.band and isinstance(self.band[0], (int, float)):
            self.band = tuple(self.band)  # a pair read from JSON or YAML

    def to_dict(self) -> dict:
        return asdict(self)


class _Modality:
    """The modality ids of the current forward, shared by the hooks and the bias wrappers."""

    def __init__(self):
        self.ids: Tensor | None = None  # (B, S) or (T,), derived from the last forward's inputs
        self.explicit: Tensor | None = None  # set by the caller; wins over derived ids

    def current(self) -> Tensor | None:
        return self.explicit if self.explicit is not None else self.ids

    def flat(self, num_tokens: int, who: str) -> Tensor:
        ids = self.current()
        if ids is None:
            raise ValueError(
                f"{who} needs the modality ids of this forward but none are known: call the "
                "model with input_ids (and a config with image_token_id) or mm_token_type_ids, "
                "or call regularizer.set_modality(ids) before the forward"
            )
        flat = ids.reshape(-1)  # (T,)
        if flat.numel() != num_tokens:
            raise ValueError(
                f"{who} routed {num_tokens} tokens but the modality ids have {flat.numel()} "
                f"(shape {tuple(ids.shape)}); set explicit ids with regularizer.set_modality(ids)"
            )
        return flat


class ModalityBiasRouter(nn.Module):
    """A router wrapper adding a trainable per-modality bias ``b[m(t)]`` to each token's logits.

    The original router runs unchanged (so the model's own ``output_router_logits`` still sees
    it); its logits get the bias and the adapter re-routes from them exactly as the router does
    (top-k, gates). With ``bias == 0`` the outputs are bit-identical to the original's. Tokens of
    modality ``-1`` get no bias.

    Args:
        router: the original router module (kept as the submodule ``router``).
        adapter: how to read its logits and re-route.
        num_modalities: ``M``.
        num_experts: ``E``.

    Shapes:
        bias ``(M, E)``; the wrapped router's logits ``(T, E)``.
    """

    def __init__(
        self, router: nn.Module, adapter: Adapter, num_modalities: int, num_experts: int, state
    ):
        super().__init__()
        if adapter.reroute is None:
            raise ValueError(
                f"adapter {adapter.name!r} cannot add a modality bias to "
                f"{type(router).__name__} ({adapter.note}); use modality_bias=False"
            )
        self.router = router
        self.adapter = adapter
        self._state = state
        ref = next(router.parameters(), None)
        self.modality_bias = nn.Parameter(
            torch.zeros(num_modalities, num_experts, device=None if ref is None else ref.device)
        )

    def forward(self, *args, **kwargs):
        out = self.router(*args, **kwargs)
        z = self.adapter.logits(out)  # (T, E)
        ids = self._state.flat(z.shape[0], f"the modality bias of {type(self.router).__name__}")
        ids = ids.to(z.device)
        if ids.numel() and int(ids.max()) >= self.modality_bias.shape[0]:
            raise ValueError(
                f"modality id {int(ids.max())} >= num_modalities={self.modality_bias.shape[0]}; "
                "raise SMARConfig.num_modalities"
            )
        valid = (ids >= 0).unsqueeze(-1)  # (T, 1)
        bias = self.modality_bias[ids.clamp(min=0)] * valid  # (T, E)
        return self.adapter.reroute(self.router, out, z + bias.to(z.dtype))

    def extra_repr(self) -> str:
        M, E = self.modality_bias.shape
        return f"adapter={self.adapter.name!r}, modalities={M}, experts={E}"


def balancing_loss_in_model(model: nn.Module) -> str | None:
    """Describes the load-balancing loss a transformers model adds to its own loss, if any.

    A model adds ``router_aux_loss_coef * aux_loss`` to ``loss`` when ``output_router_logits`` is
    set in its config (or text config) and the coefficient is positive.

    Returns:
        A sentence naming the setting and how to turn it off, or None.
    """
    config = getattr(model, "config", None)
    for cfg, where in ((config, "config"), (getattr(config, "text_config", None), "text_config")):
        if cfg is None:
            continue
        coef = getattr(cfg, "router_aux_loss_coef", 0) or 0
        if getattr(cfg, "output_router_logits", False) and coef > 0:
            return (
                f"{type(model).__name__} adds its own load-balancing loss "
                f"({where}.output_router_logits=True, router_aux_loss_coef={coef}); set "
                f"model.{where}.output_router_logits=False, or SMARConfig(lb_weight=0) to keep "
                "the model's"
            )
    return None


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
    ):
        if modality not in LEVELS:
            raise ValueError(f"modality must be one of {LEVELS}; got {modality!r}")
        sites = find_routers(model, adapter)
        if not sites:
            raise no_router_error(model)
        routers = {s.adapter.router for s in sites}
        if len(routers) > 1:
            raise ValueError(f"mixed softmax and sigmoid routers in one model: {routers}")
        self.model = model
        self.sites: list[RouterSite] = sites
        self.layers = [s.layer for s in sites]
        self.router = sites[0].adapter.router
        self.level = modality
        self.token_ids = special_token_ids(getattr(model, "config", None))
        self._state = _Modality()
        self._logits: dict[int, Tensor] = {}
        self._handles: list = []
        self._hook_routers()
        self._handles.append(
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        )

    def _hook_routers(self) -> None:
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(self._capture_hook(site)))

    def _capture_hook(self, site: RouterSite):
        def hook(module, args, output):
            self._logits[site.layer] = site.adapter.logits(output)  # (T, E)

        return hook

    def _before_forward(self, module, args, kwargs):
        self._logits = {}
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, Tensor):
            input_ids = None
        mm = kwargs.get("mm_token_type_ids")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None  # 4-D masks carry no padding in a form we can read
        if mm is None and input_ids is None:
            self._state.ids = None  # inputs_embeds only: set_modality() must say
            return None
        # A text-only model (no placeholder token in its config) sees text only.
        token_ids = self.token_ids if self.token_ids else None
        if mm is None and token_ids is None:
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
        self._state.ids = ids  # (B, S)
        return None

    def set_modality(self, ids: Tensor | None) -> None:
        """Sets explicit modality ids ``(B, S)`` or ``(T,)`` for the next forwards (``None``:
        derive them from the inputs again)."""
        if ids is not None and (not isinstance(ids, Tensor) or ids.is_floating_point()):
            raise ValueError("modality ids must be an integer tensor (0 text, 1 image, -1 ignore)")
        self._state.explicit = ids

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
            raise ValueError(
                "no router logits captured: run a forward pass of the model after attach/record "
                "(and before detach)"
            )
        return [self._logits[layer] for layer in sorted(self._logits)]

    @property
    def captured_layers(self) -> list[int]:
        """Decoder layer indices of the captured logits, in the order of :meth:`logits`."""
        return sorted(self._logits)

    @property
    def top_k(self) -> int:
        ks = {s.top_k for s in self.sites}
        if len(ks) > 1:
            raise ValueError(f"routers disagree on top-k: {sorted(ks)}")
        return ks.pop()

    def detach(self) -> None:
        """Removes every hook; the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._logits = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}, {len(self.sites)} routers "
            f"({self.sites[0].adapter.name}), layers={self.layers})"
        )


class Regularizer(RouterCapture):
    """SMAR's routing objective on the routers of a model; returned by :func:`attach`.

    After each forward of the model, :meth:`loss` gives the weighted routing loss of that forward
    (band loss, load balancing, z-loss as configured) and :meth:`terms` its unweighted parts.
    Modality bias parameters (if configured) live inside the model, so an optimizer over
    ``model.parameters()`` trains them.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SMARConfig | None = None,
        *,
        adapter: Adapter | Sequence[Adapter] | None = None,
    ):
        self.config = config = SMARConfig() if config is None else config
        self.wrappers: list[ModalityBiasRouter] = []
        super().__init__(model, adapter=adapter, modality=config.modality)
        self._terms: dict[str, float] | None = None
        warning = balancing_loss_in_model(model)
        if warning and config.lb_weight > 0:
            warnings.warn(f"load balancing would count twice: {warning}", stacklevel=3)

    def _hook_routers(self) -> None:
        if self.config.modality_bias:
            for site in self.sites:
                E = site.num_experts
                if E is None:
                    raise ValueError(f"cannot tell the number of experts of {site.name}")
                wrapper = ModalityBiasRouter(
                    site.module, site.adapter, self.config.num_modalities, E, self._state
                )
                setattr(site.parent, site.attr, wrapper)
                site.extra["wrapper"] = wrapper
                self.wrappers.append(wrapper)
        for site in self.sites:
            target = site.extra.get("wrapper", site.module)
            self._handles.append(target.register_forward_hook(self._capture_hook(site)))

    def _before_forward(self, module, args, kwargs):
        self._terms = None
        return super()._before_forward(module, args, kwargs)

    def bias_parameters(self) -> list[nn.Parameter]:
        """The modality bias of each MoE layer ``(M, E)``, in layer order (empty without bias)."""
        return [w.modality_bias for w in self.wrappers]

    def loss(self) -> Tensor:
        """The weighted routing loss of the last forward (a graph-connected scalar).

        ``smar_weight * L_SMAR + lb_weight * L_LB + z_weight * L_z`` (SPEC section 3).
        """
        c = self.config
        logits = self.logits()  # (T, E) per layer; raises before any forward
        ids = self.modality_ids
        if ids is None and c.smar_weight:
            raise ValueError(
                "the band loss needs modality ids: call the model with input_ids or "
                "mm_token_type_ids, or regularizer.set_modality(ids) before the forward"
            )
        sigmoid = self.router == "sigmoid"
        if sigmoid:
            # sigmoid(z) / sum(sigmoid(z)) == softmax(logsigmoid(z)): the same probabilities
            # (SPEC section 1) through the softmax path; routing_objective does not yet pass
            # router= on to its terms. The z-loss stays on the raw logits.
            raw, logits = logits, [torch.nn.functional.logsigmoid(z.float()) for z in logits]
        total, terms = routing_objective(
            logits,
            ids,
            top_k=self.top_k,
            smar_weight=c.smar_weight,
            band=c.band,
            hinge=c.hinge,
            lb_weight=c.lb_weight,
            lb_variant=c.lb_variant,
            z_weight=0.0 if sigmoid else c.z_weight,
            text=c.text,
            image=c.image,
        )
        if sigmoid and c.z_weight:
            terms["z"] = z_loss(raw, mask=None if ids is None else ids >= 0)
            total = total + c.z_weight * terms["z"]
        self._terms = self._flatten(terms, total)
        return total

    def _flatten(self, terms: dict[str, Tensor], total: Tensor) -> dict[str, float]:
        out = {"smar/total": float(total.detach())}
        for name, value in terms.items():
            if name == "mrd":
                continue
            out[f"smar/{name}"] = float(value.detach())
        if "mrd" in terms:
            d = terms["mrd"]  # (L,)
            for layer, v in zip(self.captured_layers, d.tolist(), strict=True):
                out[f"smar/layer{layer:02d}/mrd"] = v
            finite = d[torch.isfinite(d)]
            out["smar/mrd"] = float(finite.mean()) if finite.numel() else float("nan")
        return out

    def terms(self) -> dict[str, float]:
        """The unweighted terms of the last forward as a flat dict: ``smar/band``, ``smar/lb``,
        ``smar/z`` (those configured), ``smar/total``, ``smar/mrd`` (mean over layers) and
        ``smar/layerNN/mrd`` (NaN where a modality is absent)."""
        if self._terms is None:
            with torch.no_grad():
                self.loss()
        return dict(self._terms)

    def detach(self) -> None:
        """Removes hooks and bias wrappers: the model gets its original routers back."""
        super().detach()
        for site in self.sites:
            wrapper = site.extra.pop("wrapper", None)
            if wrapper is not None:
                setattr(site.parent, site.attr, wrapper.router)
        self.wrappers = []


def attach(
    model: nn.Module,
    config: SMARConfig | None = None,
    *,
    adapter: Adapter | Sequence[Adapter] | None = None,
) -> Regularizer:
    """Attaches SMAR to a mixture-of-experts model and returns its :class:`Regularizer`.

    Args:
        model: a transformers MoE model (text MoE inside a LLaVA-style model, native multimodal
            MoE, or a model upcycled with :func:`smar.hf.upcycle_hf`), or any module whose routers
            an adapter recognises.
        config: weights and options (:class:`SMARConfig` defaults if None).
        adapter: adapters for router classes smar does not know
            (see :class:`smar.adapters.Adapter`).

    Returns:
        The regularizer; ``regularizer.detach()`` restores the model.

    Raises:
        ValueError: if no router is found (the message names the model class and the fix).
    """
    return Regularizer(model, config, adapter=adapter)


def record(
    model: nn.Module,
    *,
    adapter: Adapter | Sequence[Adapter] | None = None,
    modality: str = "token",
) -> RouterCapture:
    """Captures router logits and modality ids of each forward, without changing the model.

    Example:
        >>> with smar.record(model) as rec:          # doctest: +SKIP
        ...     model(**batch)
        ...     stats.update(rec.logits(), rec.modality_ids, top_k=rec.top_k)
    """
    return RouterCapture(model, adapter=adapter, modality=modality)
