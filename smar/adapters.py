"""Adapters: the only place that knows model architectures.

An :class:`Adapter` says, for one family of router modules, how to read the canonical routing data
out of it (docs/method.md#notation: raw float logits ``(T, E)`` per MoE layer) and whether it can
take a modality bias. Everything else in smar (hooks, losses, trainer) works on the canonical form
only.

Most adapters are not written here: :func:`find_routers` reads each transformers model's own
declaration of which module records ``router_logits`` and at which output index
(``_can_record_outputs``), so every MoE family of the installed transformers is found and checked
against the model's own ``output_router_logits`` (tests/test_families.py). The hand-written
:data:`ADAPTERS` cover what the declaration does not: smar's own router, DeepSpeed-MoE's
``TopKGate`` (MoE-LLaVA's router), and Ernie-4.5-VL's hard modality split (which cannot take a
bias). Users pass their own for other engines.

Shapes legend: T tokens (batch x sequence, flattened), D model width, E experts, K top-k.

This module does not import transformers: router classes are matched by name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from smar.checks import ROUTERS
from smar.errors import UsageError
from smar.gating import gating, recorded_activation

__all__ = [
    "Adapter",
    "RouterSite",
    "ADAPTERS",
    "find_routers",
    "no_router_error",
    "ERNIE_NO_BIAS",
]

Reroute = Callable[[nn.Module, object, Tensor], object]
"""``reroute(router, output, logits) -> output``: the router's output recomputed from ``logits``."""


@dataclass(frozen=True)
class Adapter:
    """How to read (and bias) one family of router modules.

    Args:
        name: a short name for messages and ``smar inspect``.
        classes: router module classes, by class name (or the class itself).
        router: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"``: how the router turns logits
            into scores (see :func:`smar.routing_probs`).
        index: the position of the raw logits ``(T, E)`` in the router's output tuple; ``None``
            when the output is the logits tensor itself.
        top_k: experts per token, from the router module and its parent module; by default the
            ``top_k`` attribute of the router, else of its parent.
        reroute: recomputes the router's output from biased logits ``(T, E)`` (for routers whose
            logits do not come out of one linear layer, e.g. other engines'); ``None``: the
            modality bias is added to the output of the router's linear layer and the router's
            own code runs on it (see :mod:`smar.bias`).
        bias: whether this router can take a modality bias at all.
        note: one line shown by ``smar inspect``; where ``bias`` is False, the reason.
        from_linear: the router does not return its logits (DeepSpeed-MoE's ``TopKGate`` returns
            only dispatch tensors): they are read from its linear layer while it runs, as the
            output of the ``F.linear`` call with its ``(E, D)`` weight (``index`` is unused).

    Example:
        >>> Adapter("mine", classes=("MyRouter",), index=0)  # doctest: +SKIP
    """

    name: str
    classes: tuple[str | type, ...]
    router: str = "softmax"
    index: int | None = 0
    top_k: Callable[[nn.Module, nn.Module | None], int] | None = None
    reroute: Reroute | None = None
    bias: bool = True
    note: str = ""
    from_linear: bool = False

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise UsageError(f"router must be one of {ROUTERS}; got {self.router!r}")
        if not self.classes:
            raise UsageError("an Adapter needs at least one router class (name or type)")
        if self.index is not None and self.index < 0:
            raise UsageError(f"index must be >= 0 or None; got {self.index}")

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return any(c is cls or c == cls.__name__ for c in self.classes)

    def logits(self, output: Any) -> Tensor:
        """The raw logits ``(T, E)`` from a router's output."""
        # A router that returns a bare tensor under index 0 (DBRX declares index=0 and returns
        # the logits alone) records the tensor itself, as transformers' OutputRecorder does.
        bare = self.index is None or (self.index == 0 and isinstance(output, Tensor))
        z = output if bare else output[self.index]
        if isinstance(z, Tensor) and z.dim() == 3:
            z = z.reshape(-1, z.shape[-1])  # (B, S, E) -> (T, E), row-major as the ids
        if not isinstance(z, Tensor) or z.dim() != 2:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise UsageError(
                f"adapter {self.name!r}: output[{self.index}] of the router is {shape}, not "
                "(T, E) logits; fix the adapter's index"
            )
        return z

    def experts_per_token(self, module: nn.Module, parent: nn.Module | None) -> int:
        if self.top_k is not None:
            return int(self.top_k(module, parent))
        # The router's attribute, its MoE block's, then the router's config (Gemma 4's router
        # reads config.top_k_experts at each call).
        config = getattr(module, "config", None)
        for m, names in ((module, _TOP_K_ATTRS), (parent, _TOP_K_ATTRS),
                         (config, ("top_k_experts", *_TOP_K_ATTRS))):  # fmt: skip
            for attr in names:
                k = getattr(m, attr, None)
                if isinstance(k, int) and not isinstance(k, bool):
                    return k
        fixed = re.search(r"Top(\d+)", type(module).__name__)  # NllbMoeTop2Router, ...Top1Router
        if fixed:
            return int(fixed.group(1))
        raise UsageError(
            f"adapter {self.name!r}: cannot tell top-k of {type(module).__name__}; give the "
            "Adapter a top_k function"
        )


_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "topk", "k")


@dataclass
class RouterSite:
    """One router found in a model: where it is and how to read it."""

    name: str  # qualified module name, e.g. "model.language_model.layers.3.mlp.gate"
    module: nn.Module
    parent: nn.Module | None
    attr: str  # attribute of ``parent`` holding the router
    layer: int  # decoder layer index
    adapter: Adapter
    kind: str = "mlp"  # "mlp" or "attention" (JetMoE's mixture of attention heads)
    extra: dict = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return self.adapter.experts_per_token(self.module, self.parent)

    @property
    def num_experts(self) -> int | None:
        for attr in ("num_experts", "n_routed_experts", "num_local_experts", "out_features"):
            e = getattr(self.module, attr, None)
            if isinstance(e, int) and not isinstance(e, bool):
                return e
        w = getattr(self.module, "weight", None)
        if isinstance(w, Tensor):
            return int(w.shape[0])
        linears = [m for m in self.module.children() if isinstance(m, nn.Linear)]
        return linears[0].out_features if len(linears) == 1 else None


# ----------------------------------------------------------------------------------------------
# the built-in adapters: only what transformers' own declaration does not cover


def _ernie_top_k(module: nn.Module, parent: nn.Module | None) -> int:
    text_moe: Any = module.text_moe  # the block's text experts and their router
    return text_moe.top_k


def _block_top_k(module: nn.Module, parent: nn.Module | None) -> int:
    block: Any = parent  # smar.moe.MoEBlock
    return block.top_k


ERNIE_NO_BIAS = (
    "hard modality split: text and vision tokens go to separate expert sets through separate "
    "routers (moe_mm_token_type_ids), so a per-modality bias on one router has nothing to choose "
    "between; capture, the band loss and load balancing still work with modality_bias=False"
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "ernie4.5-vl-moe",
        ("Ernie4_5_VLMoeMoeBlock",),
        index=1,
        top_k=_ernie_top_k,
        bias=False,
        note=ERNIE_NO_BIAS,
    ),
    Adapter(
        "deepspeed-moe",
        ("TopKGate",),
        index=None,
        from_linear=True,
        note=(
            "DeepSpeed-MoE's gate (deepspeed.moe.layer.MoE, as MoE-LLaVA builds it): logits "
            "read from F.linear on its wg weight (called directly: a hook on wg never fires)"
        ),
    ),
    Adapter(
        "smar",
        ("smar.moe.Router",),
        index=None,
        top_k=_block_top_k,
        note="smar.moe.Router (upcycled or own MoE block)",
    ),
)


def _smar_router_class() -> type[nn.Module]:
    from smar.moe import Router

    return Router


def _resolve(adapter: Adapter) -> Adapter:
    """Replaces the string "smar.moe.Router" by the class (names may collide with users')."""
    if "smar.moe.Router" not in adapter.classes:
        return adapter
    classes = tuple(_smar_router_class() if c == "smar.moe.Router" else c for c in adapter.classes)
    return dataclasses.replace(adapter, classes=classes)


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ATTENTION = re.compile(r"(?:^|\.)[^.]*(?:attn|attention)[^.]*(?:\.|$)")


def _layer_index(name: str) -> int | None:
    hits = _LAYER.findall(name)
    return int(hits[-1]) if hits else None


def _recorders(module: nn.Module) -> list | None:
    """The ``router_logits`` recorders a transformers model class declares, or None.

    transformers 5.x models declare ``_can_record_outputs = {"router_logits": OutputRecorder(
    RouterClass, index=i, layer_name=...)}`` (or a list of them, or a bare class: index 1).
    """
    table = getattr(type(module), "_can_record_outputs", None)
    if not isinstance(table, dict) or "router_logits" not in table:
        return [] if isinstance(table, dict) else None
    specs = table["router_logits"]
    specs = specs if isinstance(specs, (list, tuple)) else [specs]
    out = []
    for spec in specs:
        if hasattr(spec, "index") and hasattr(spec, "target_class"):
            out.append((spec.target_class, spec.class_name, spec.layer_name, spec.index))
        else:  # a bare class or class name: transformers records output[1]
            out.append((None, spec, None, 1) if isinstance(spec, str) else (spec, None, None, 1))
    return out


def _declared(model: nn.Module) -> dict[str, Adapter]:
    """Modules recorded as ``router_logits`` by the declaration of their (sub)model, by name.

    Scoped as transformers scopes it: each ``PreTrainedModel`` inside the model (a vision tower,
    a text model) brings its own declaration for its own modules.
    """
    found: dict[str, Adapter] = {}

    def walk(module: nn.Module, name: str, specs: list) -> None:
        own = _recorders(module)
        if own is not None:
            specs = own
        for target, class_name, layer_name, index in specs:
            if target is not None and isinstance(module, target):
                pass
            elif class_name is not None and ("." + name).endswith(class_name):
                pass
            else:
                continue
            if layer_name is not None and f".{layer_name.strip('.')}." not in f".{name}.":
                continue
            cls = type(module)
            probs = recorded_activation(cls, index)
            # A router that records its probabilities: the logits are read where they are made,
            # from its linear layer, so that the softmax does not run twice.
            found[name] = Adapter(
                cls.__name__, (cls,), router=probs or gating(module), index=index,
                from_linear=probs is not None,
                note="declared by transformers (_can_record_outputs)" + (
                    f"; records {probs} probabilities: logits read from its linear layer"
                    if probs else ""),
            )  # fmt: skip
            break
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, specs)

    walk(model, "", [])
    return found


def find_routers(
    model: nn.Module,
    adapters: Adapter | Sequence[Adapter] | None = None,
    *,
    kinds: str | Sequence[str] = "mlp",
) -> list[RouterSite]:
    """The router modules of ``model``, ordered by layer (then by position in the model).

    Routers are found, in order of precedence, by the ``adapters`` given, by :data:`ADAPTERS`
    (smar's own router; Ernie-4.5-VL, to say why it takes no bias), and by the model's own
    declaration (transformers 5.x ``_can_record_outputs["router_logits"]``: the router class and
    the index of its logits, so every family of the installed transformers is found without an
    entry here). Where a declared module contains another declared one
    (JetMoE records both its attention block and the gating inside it) the inner one is the router.

    Args:
        model: any ``nn.Module``, e.g. a transformers model.
        adapters: an adapter or several, tried before the declaration and the built-in ones.
        kinds: ``"mlp"`` (routers of the feed-forward experts, the default: SMAR's target),
            ``"attention"`` (routers of attention experts: JetMoE's mixture of attention heads)
            or both, e.g. ``("mlp", "attention")``. A router is ``"attention"`` when its module
            path goes through a module whose name contains ``attn`` or ``attention``.

    Returns:
        A list of :class:`RouterSite`, possibly empty (the caller decides whether that is an error;
        see :func:`no_router_error`).
    """
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not set(kinds) <= {"mlp", "attention"} or not kinds:
        raise UsageError(f"kinds must be 'mlp', 'attention' or both; got {kinds!r}")
    given = [_resolve(a) for a in adapters or ()]
    builtin = [_resolve(a) for a in ADAPTERS]
    declared = _declared(model)
    modules = dict(model.named_modules())
    matched: dict[str, Adapter] = {}
    for name, module in modules.items():
        if type(module).__name__ == "ModalityBiasRouter":
            continue  # a wrapper from an earlier attach: its router inside is the one
        adapter = next((a for a in (*given, *builtin) if a.matches(module)), None)
        adapter = adapter or declared.get(name)
        if adapter is not None:
            matched[name] = adapter
    # Keep the innermost: drop a match that holds another match.
    names = [n for n in matched if not any(o.startswith(n + ".") for o in matched if n)]
    sites: list[RouterSite] = []
    for position, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        kind = "attention" if _ATTENTION.search(name) else "mlp"
        if kind not in kinds:
            continue
        layer = _layer_index(name)
        site = RouterSite(
            name, modules[name], modules[parent_name] if name else None, attr,
            -1 if layer is None else layer, matched[name], kind=kind,
        )  # fmt: skip
        site.extra["position"] = position
        sites.append(site)
    if any(s.layer < 0 for s in sites) or len({s.layer for s in sites}) != len(sites):
        # No layer index in the names, or several routers per index (encoder and decoder,
        # attention and MLP): number the routers in module order.
        for i, s in enumerate(sites):
            s.layer = i
    return sorted(sites, key=lambda s: s.layer)


_ROUTER_LIKE = re.compile(r"(?:router|gate|gating)$", re.IGNORECASE)


def no_router_error(
    model: nn.Module, adapters: Adapter | Sequence[Adapter] | None = None
) -> UsageError:
    """The :class:`UsageError` for a model without any recognised router, its fix for what the
    model holds: a module named like a router (an ``adapter=`` for its class; a class of its own
    for a bare ``nn.Linear``), or none (a dense model: upcycle it)."""
    known = ", ".join(f"{a.name} ({', '.join(map(str, a.classes))})" for a in ADAPTERS)
    problem = (f"no router found in {type(model).__name__}: no module is declared as recording "
               "router_logits (transformers' _can_record_outputs) and no adapter matches (built-in"
               f": {known}")  # fmt: skip
    given = [adapters] if isinstance(adapters, Adapter) else list(adapters or ())
    if given:
        problem += f"; adapter= given for {sorted({str(c) for a in given for c in a.classes})}"
    like = {type(m): n for n, m in reversed(list(model.named_modules()))
            if n and (_ROUTER_LIKE.search(n) or _ROUTER_LIKE.search(type(m).__name__))}  # fmt: skip
    fix = "pass adapter=smar.adapters.Adapter(name, classes=({!r},), index={}, router='softmax')"
    if not like:
        return UsageError(f"{problem}); no module is named like a router: a dense model?",
                          "upcycle it with smar.hf.upcycle_hf (or smar.upcycle), then attach; for "
                          "another MoE architecture " + fix.format("YourRouterClass", "<position "
                          "of the logits in its output>"))  # fmt: skip
    cls, name = next(reversed(like.items()))  # the first in module order
    problem = f"{problem}); {name} ({cls.__name__}) is named like a router"
    if cls.__module__.startswith("torch.nn"):  # a bare nn.Linear: every linear layer's class
        return UsageError(problem, f"give it a class of its own (class MyRouter(nn.{cls.__name__})"
                                   ": pass) and " + fix.format("MyRouter", "None"))  # fmt: skip
    return UsageError(problem, fix.format(cls.__name__, "<position of the logits in its output, "
                                          "None if it returns them alone>"))  # fmt: skip
