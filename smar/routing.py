"""SMAR on a model: the regularizer (its configuration, :class:`SMARConfig`, is
:mod:`smar.config`).

``attach(model, config)`` captures the model's routers (:mod:`smar.capture`), optionally replaces
each router with a :class:`smar.bias.ModalityBiasRouter`, and returns a :class:`Regularizer`
whose ``loss()`` is SMAR's routing objective for the last forward::

    reg = smar.attach(model, smar.SMARConfig())
    out = model(**batch)
    loss = out.loss + reg.loss()
    ...
    reg.detach()                      # the model is exactly as before

Shapes legend: B batch, S sequence, T = B * S tokens, L MoE layers, E experts, M modalities.

This module does not import transformers.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from smar.adapters import Adapter, RouterSite
from smar.bias import ModalityBiasRouter, check_modality_id
from smar.capture import RouterCapture, record, unwrap
from smar.collective import CarriedSums, StepSums, default_group
from smar.config import SMARConfig, check_config
from smar.distributions import prepare_routing
from smar.errors import UsageError
from smar.losses import routing_objective
from smar.pairs import pair_name
from smar.upstream import upstream_defect

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
                f"model.{where}.output_router_logits=False (with TRL's SFTTrainer, which turns "
                "it back on from its own setting: SFTConfig(router_aux_loss_coef=0.0)), or "
                "SMARConfig(lb_weight=0) to keep the model's"
            )
    return None


_NOT_CONNECTED = (
    "SMAR's routing loss is not connected to the graph, so it trains nothing: reentrant gradient "
    "checkpointing recomputes the routers outside it (or every router weight and bias is "
    "frozen); fix: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False})"
)


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """transformers' gradient checkpointing with ``use_reentrant=True`` (its layers hold the
    checkpoint function with its keywords)."""
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(m, "gradient_checkpointing", False) and fn is not None:
            return bool(getattr(fn, "keywords", {}).get("use_reentrant", False))
    return False


def _refuse_omni_wrapper(model: nn.Module) -> None:
    """An omni model's top class (Qwen3-Omni: a thinker and a talker) only generates: its config
    holds no modality token ids, and its talker routes speech-codec tokens. SMAR belongs on the
    thinker, which routes text, image, video and audio and has a forward to train."""
    thinker = getattr(model, "thinker", None)
    if isinstance(thinker, nn.Module):
        raise UsageError(
            f"{type(model).__name__} is an omni model's generation wrapper: its thinker routes "
            "text, image, video and audio (its talker, speech-codec tokens); fix: "
            "smar.attach(model.thinker, config) and train the thinker"
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
        self.config = config = check_config(config, "attach(model, config)")
        model = unwrap(model, "attach", new_parameters=config.modality_bias)
        _refuse_omni_wrapper(model)
        self.wrappers: list[ModalityBiasRouter] = []
        previous = getattr(model, "_smar_regularizer", None)
        if (previous is not None and previous() is not None) or any(
            isinstance(m, ModalityBiasRouter) for m in model.modules()
        ):
            raise UsageError(
                f"SMAR is already attached to this {type(model).__name__}: call detach() on the "
                "regularizer attach() returned before attaching again (SMARTrainer attaches "
                "itself: pass it the bare model)"
            )
        super().__init__(
            model, adapter=adapter, modality=config.modality, groups=config.groups,
            kinds=config.kinds,
        )  # fmt: skip
        setattr(model, "_smar_regularizer", weakref.ref(self))  # noqa: B010  (a plain attribute)
        self._terms: dict[str, Tensor] | None = None
        self._step_sums = StepSums() if config.accumulate else None
        self._carry = CarriedSums() if config.carry else None
        self._checked = False  # the first forward is checked at once
        self._bad: Tensor | None = None  # non-finite loss seen since the last check()
        defect = upstream_defect(model)
        if defect:
            warnings.warn(defect, stacklevel=3)
        warning = balancing_loss_in_model(model)
        if warning and config.lb_weight > 0:
            warnings.warn(f"load balancing would count twice: {warning}", stacklevel=3)
        if _reentrant_checkpointing(model):
            warnings.warn(_NOT_CONNECTED, stacklevel=3)
        self._warned_graph = False

    def _hook_routers(self) -> None:
        if self.config.modality_bias:
            for site in self.sites:
                E = site.num_experts
                if E is None:
                    raise UsageError(f"cannot tell the number of experts of {site.name}")
                parent, attr, inner = self._slot(site)
                wrapper = ModalityBiasRouter(
                    inner, site.adapter, self.config.num_modalities, E, self._state
                )
                setattr(parent, attr, wrapper)
                site.extra["wrapper"] = wrapper
                site.extra["slot"] = (parent, attr, inner)
                self.wrappers.append(wrapper)
        for site in self.sites:
            target = site.extra.get("wrapper", site.module)
            self._hook(site, target)

    def _slot(self, site: RouterSite) -> tuple[nn.Module, str, nn.Module]:
        """Where the bias wrapper goes: in place of the router, or, where PEFT put a tuner layer
        around the router (LoRA on the router's weight: ``gate.base_layer``), of that layer, so
        that PEFT's parametrization of the router's weight still finds the router."""
        if site.parent is None:  # the model is the router itself: no slot for a wrapper
            raise UsageError(f"cannot wrap the model itself ({type(site.module).__name__}) in "
                             "a bias router", "attach to the model holding the router")  # fmt: skip
        if site.attr == "base_layer" and "." in site.name:
            outer = site.name.rsplit(".", 1)[0]
            grand_name, _, grand_attr = outer.rpartition(".")
            grand = self.model.get_submodule(grand_name) if grand_name else self.model
            return grand, grand_attr, site.parent
        return site.parent, site.attr, site.module

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._terms = None
        return super()._before_forward(module, args, kwargs)

    def bias_parameters(self) -> list[nn.Parameter]:
        """The modality bias of each MoE layer ``(M, E)``, in layer order (empty without bias)."""
        return [w.modality_bias for w in self.wrappers]

    def loss(self) -> Tensor:
        """The weighted routing loss of the last forward (a graph-connected scalar).

        ``smar_weight * L_SMAR + lb_weight * L_LB + z_weight * L_z`` (docs/method.md#objective),
        over the global batch with ``stats="global"`` under ``torch.distributed`` (then every rank
        must call it, as a training step does), pooled over the optimizer step with
        ``accumulate=True`` in training.
        """
        c = self.config
        logits = self.logits()  # (T, E) per layer; raises before any forward
        ids = self.modality_ids
        if ids is None and c.smar_weight:
            raise UsageError(
                "the band loss needs modality ids: call the model with input_ids or "
                "mm_token_type_ids, or regularizer.set_modality(ids) before the forward"
            )
        check = c.check == "always" or not self._checked
        if ids is not None and not c.modality_bias and ids.numel():  # no bias wrapper checks them
            if check:
                check_modality_id(int(ids.max()), c.num_modalities)
            else:
                top, prev = ids.max(), self._state.max_id
                self._state.max_id = top if prev is None else torch.maximum(prev, top)
        training = self.model.training and torch.is_grad_enabled()
        total, terms = routing_objective(
            prepare_routing(logits, router=self.router, check=check),
            ids,
            top_k=self.top_k,
            smar_weight=c.smar_weight,
            band=c.band,
            hinge=c.hinge,
            lb_weight=c.lb_weight,
            lb_variant=c.lb_variant,
            z_weight=c.z_weight,
            text=c.text,
            image=c.modalities[1] if len(c.modalities) == 2 else c.modalities[1:],
            pairs=None if c.pairs == "text" else c.pairs,
            pair_bands=c.pair_bands,
            router=self.router,
            group=default_group(c.stats, c.group),
            step_sums=self._step_sums if training else None,
            carry=self._carry if training else None,
            chosen=self.chosen() if c.lb_weight else None,
        )
        weighted = c.smar_weight or c.lb_weight or c.z_weight  # else the loss is 0 by design
        if training and weighted and not total.requires_grad and not self._warned_graph:
            self._warned_graph = True  # once: the loss would train nothing
            warnings.warn(_NOT_CONNECTED, stacklevel=2)
        self._terms = {k: v.detach() for k, v in terms.items()}
        self._terms["total"] = total.detach()
        bad = ~torch.isfinite(total.detach())
        if check:
            self._raise_if_bad(bad)
        else:  # no wait for the device: looked at in check()
            self._bad = bad if self._bad is None else self._bad | bad
        self._checked = True
        self._state.check_ids = c.check == "always"
        return total

    def _raise_if_bad(self, bad: Tensor) -> None:
        if bool(bad):
            raise UsageError(
                "SMAR's routing loss is not finite: router logits with NaN or +inf (the model "
                "diverged, or overflowed in low precision), or a token whose experts are all "
                "masked; check the learning rate and the model's dtype"
            )

    def check(self) -> None:
        """Raises if a forward since the last check had a non-finite routing loss or a modality
        id without a row in the bias. Waits for the device: SMARTrainer calls it at logging
        steps; in your own loop, call it as often as you log (``SMARConfig(check="always")``
        checks every forward instead)."""
        bad, self._bad = self._bad, None
        if bad is not None:
            self._raise_if_bad(bad)
        top, self._state.max_id = self._state.max_id, None
        if top is not None:
            check_modality_id(int(top), self.config.num_modalities)

    def step(self) -> None:
        """Marks the end of an optimizer step: with ``SMARConfig(accumulate=True)`` the next
        micro-batch starts new statistics. SMARTrainer calls it; call it after
        ``optimizer.step()`` in your own loop."""
        if self._step_sums is not None:
            self._step_sums.reset()

    def term_tensors(self) -> dict[str, Tensor]:
        """The unweighted terms of the last forward as detached 0-d tensors, named as in
        :meth:`terms`, without waiting for the device."""
        if self._terms is None:
            with torch.no_grad():
                self.loss()
        t = self._terms
        assert t is not None  # loss() has set them
        out = {"smar/total": t["total"]}
        out.update({f"smar/{k}": v for k, v in t.items() if k not in ("total", "mrd")})
        if "mrd" in t:
            d = t["mrd"]  # (L,) or (L, P)
            names = [""] if d.dim() == 1 else [f"/{pair_name(p)}" for p in self.config.held_pairs]
            d = d[:, None] if d.dim() == 1 else d  # (L, P)
            # the first pair (text-image) also unnamed, as with two modalities
            out["smar/mrd"] = torch.nanmean(d[:, 0])  # NaN when no layer has both modalities
            for p, name in enumerate(names):
                if name:
                    out[f"smar/mrd{name}"] = torch.nanmean(d[:, p])
                for layer, v in zip(self.captured_layers, d[:, p].unbind(), strict=True):
                    out[f"smar/layer{layer:02d}/mrd{name}"] = v
        return out

    def terms(self) -> dict[str, float]:
        """The unweighted terms of the last forward as a flat dict: ``smar/band``, ``smar/lb``,
        ``smar/z`` (those configured), ``smar/total``, ``smar/mrd`` (mean over layers) and
        ``smar/layerNN/mrd`` (NaN where a modality is absent). With more than one pair of
        modalities held in a band, also each pair's, named as in ``smar/mrd/text-video`` and
        ``smar/layer03/mrd/text-video`` (``smar/mrd`` stays the first pair's, text-image).
        Waits for the device (see :meth:`term_tensors`)."""
        tensors = self.term_tensors()
        values = torch.stack(list(tensors.values())).tolist()
        return dict(zip(tensors, values, strict=True))

    def bias_state_dict(self) -> dict[str, Tensor]:
        """The modality bias of each router, keyed ``<router module name>.modality_bias``
        (the router's name in the model without smar, e.g. ``model.layers.0.mlp.gate``)."""
        return {
            f"{s.name}.modality_bias": s.extra["wrapper"].modality_bias
            for s in self.sites
            if "wrapper" in s.extra
        }

    @torch.no_grad()
    def load_bias_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copies biases saved by :meth:`bias_state_dict` into this regularizer's wrappers.

        Raises:
            ValueError: if the keys or shapes do not match this model's routers.
        """
        mine = self.bias_state_dict()
        if set(mine) != set(state):
            raise UsageError(
                "the saved modality bias does not fit this model: missing "
                f"{sorted(set(mine) - set(state))}, unexpected {sorted(set(state) - set(mine))}"
            )
        for key, param in mine.items():
            if param.shape != state[key].shape:
                raise UsageError(
                    f"{key}: saved bias {tuple(state[key].shape)} but the router's is "
                    f"{tuple(param.shape)} (num_modalities, experts)"
                )
            param.copy_(state[key].to(param.device, param.dtype))

    @contextlib.contextmanager
    def original_routers(self) -> Iterator[None]:
        """Puts the original routers back in the model for the duration (the biases wait in the
        regularizer): ``model.state_dict()`` and ``save_pretrained`` then have the original
        keys, and a checkpoint with them loads into the model."""
        swapped = [s.extra["slot"] + (s.extra["wrapper"],) for s in self.sites if "slot" in s.extra]
        for parent, attr, inner, _ in swapped:
            setattr(parent, attr, inner)
        try:
            yield
        finally:
            for parent, attr, _, wrapper in swapped:
                setattr(parent, attr, wrapper)

    def detach(self) -> None:
        """Removes hooks and bias wrappers: the model gets its original routers back."""
        super().detach()
        for site in self.sites:
            site.extra.pop("wrapper", None)
            slot = site.extra.pop("slot", None)
            if slot is not None:
                setattr(slot[0], slot[1], slot[2])
        self.wrappers = []
        if getattr(self.model, "_smar_regularizer", None) is not None:
            setattr(self.model, "_smar_regularizer", None)  # noqa: B010  (a plain attribute)


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
            an adapter recognises; in ``nn.DataParallel`` or DDP, the module inside is used.
        config: weights and options (:class:`SMARConfig` defaults if None).
        adapter: adapters for router classes smar does not know
            (see :class:`smar.adapters.Adapter`).

    Returns:
        The regularizer; ``regularizer.detach()`` restores the model.

    Raises:
        TypeError: if ``model`` is not a module.
        ValueError: if no router is found (the message names the model class and the fix).
    """
    return Regularizer(model, config, adapter=adapter)
