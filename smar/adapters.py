"""Adapters: the only place that knows model architectures.

An :class:`Adapter` says, for one family of router modules, how to read the canonical routing data
out of it (SPEC section 1: raw float logits ``(T, E)`` per MoE layer) and, optionally, how to
re-route from logits changed by a modality bias. Everything else in smar (hooks, losses, trainer)
works on the canonical form only.

Each built-in adapter was checked against the transformers 5.23 source of its router and is tested
against the model's own ``output_router_logits`` and expert choice (tests/test_adapters.py).

Shapes legend: T tokens (batch x sequence, flattened), D model width, E experts, K top-k.

This module does not import transformers: router classes are matched by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Adapter",
    "RouterSite",
    "ADAPTERS",
    "find_routers",
    "no_router_error",
]

Reroute = Callable[[nn.Module, object, Tensor], object]
"""``reroute(router, output, logits) -> output``: the router's output recomputed from ``logits``."""


@dataclass(frozen=True)
class Adapter:
    """How to read (and bias) one family of router modules.

    Args:
        name: a short name for messages and ``smar inspect``.
        classes: router module classes, by class name (or the class itself).
        router: ``"softmax"`` or ``"sigmoid"``: how the router turns logits into scores.
        index: the position of the raw logits ``(T, E)`` in the router's output tuple; ``None``
            when the output is the logits tensor itself.
        top_k: experts per token, from the router module and its parent module; by default the
            ``top_k`` attribute of the router, else of its parent.
        reroute: recomputes the router's output from biased logits ``(T, E)``, exactly as the
            router does from its own; ``None`` if this router cannot take a modality bias.
        note: one line shown by ``smar inspect``.

    Example:
        >>> Adapter("mine", classes=("MyRouter",), index=0)  # doctest: +SKIP
    """

    name: str
    classes: tuple[str | type, ...]
    router: str = "softmax"
    index: int | None = 0
    top_k: Callable[[nn.Module, nn.Module | None], int] | None = None
    reroute: Reroute | None = None
    note: str = ""

    def __post_init__(self):
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router must be 'softmax' or 'sigmoid'; got {self.router!r}")
        if not self.classes:
            raise ValueError("an Adapter needs at least one router class (name or type)")
        if self.index is not None and self.index < 0:
            raise ValueError(f"index must be >= 0 or None; got {self.index}")

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return any(c is cls or c == cls.__name__ for c in self.classes)

    def logits(self, output) -> Tensor:
        """The raw logits ``(T, E)`` from a router's output."""
        z = output if self.index is None else output[self.index]
        if not isinstance(z, Tensor) or z.dim() != 2:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"adapter {self.name!r}: output[{self.index}] of the router is {shape}, not "
                "(T, E) logits; fix the adapter's index"
            )
        return z

    def experts_per_token(self, module: nn.Module, parent: nn.Module | None) -> int:
        if self.top_k is not None:
            return int(self.top_k(module, parent))
        for m in (module, parent):
            k = getattr(m, "top_k", None)
            if isinstance(k, int):
                return k
        raise ValueError(
            f"adapter {self.name!r}: cannot tell top-k of {type(module).__name__}; give the "
            "Adapter a top_k function"
        )


@dataclass
class RouterSite:
    """One router found in a model: where it is and how to read it."""

    name: str  # qualified module name, e.g. "model.language_model.layers.3.mlp.gate"
    module: nn.Module
    parent: nn.Module | None
    attr: str  # attribute of ``parent`` holding the router
    layer: int  # decoder layer index
    adapter: Adapter
    extra: dict = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return self.adapter.experts_per_token(self.module, self.parent)

    @property
    def num_experts(self) -> int | None:
        for attr in ("num_experts", "out_features"):
            e = getattr(self.module, attr, None)
            if isinstance(e, int):
                return e
        w = getattr(self.module, "weight", None)
        return int(w.shape[0]) if isinstance(w, Tensor) else None


# ----------------------------------------------------------------------------------------------
# re-routing from biased logits: each mirrors its router's forward after the linear layer


def _softmax_topk(norm: str, cast: bool) -> Reroute:
    """Qwen2/3-MoE, Qwen3-VL-MoE, OLMoE, Mixtral: softmax over E, top-k of the probabilities.

    ``norm``: ``"always"`` renormalises the k probabilities, ``"attr"`` when the router's
    ``norm_topk_prob`` is set. ``cast``: the scores are cast back to the logits' dtype.
    """

    def reroute(router: nn.Module, output, z: Tensor):
        probs = F.softmax(z, dtype=torch.float, dim=-1)  # (T, E)
        top, experts = torch.topk(probs, router.top_k, dim=-1)  # (T, K)
        if norm == "always" or (norm == "attr" and router.norm_topk_prob):
            top /= top.sum(dim=-1, keepdim=True)
        if cast:
            top = top.to(z.dtype)
        return z, top, experts

    return reroute


def _reroute_llama4(router: nn.Module, output, z: Tensor):
    """Llama 4: top-k on the logits, sigmoid of the chosen ones, ``-inf`` elsewhere."""
    top, experts = torch.topk(z, router.top_k, dim=1)  # (T, K)
    scores = torch.full_like(z, float("-inf")).scatter_(1, experts, top)  # (T, E)
    scores = torch.sigmoid(scores.float()).to(scores.dtype)
    return scores, z


def _reroute_aria(router: nn.Module, output, z: Tensor):
    """Aria: top-k on the logits, softmax over the k."""
    top, experts = torch.topk(z, router.top_k, dim=-1)  # (T, K)
    return z, F.softmax(top, dim=-1), experts


def _reroute_deepseek(router: nn.Module, output, z: Tensor):
    """GLM-4.5V / DeepSeek-V3: sigmoid scores, correction bias, group-limited top-k."""
    E, G = router.num_experts, router.num_group
    scores = z.sigmoid()  # (T, E)
    choice = scores + router.e_score_correction_bias  # (T, E)
    group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (T, G)
    score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)  # (T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    experts = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]  # (T, K)
    weights = scores.gather(1, experts)  # (T, K)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return z, weights * router.routed_scaling_factor, experts


def _reroute_logits_only(router: nn.Module, output, z: Tensor):
    """Routers that return only logits (the MoE block does top-k): the biased logits."""
    return z


def _ernie_top_k(module: nn.Module, parent: nn.Module | None) -> int:
    return module.text_moe.top_k


# ----------------------------------------------------------------------------------------------
# the built-in adapters

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "qwen-moe",
        ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "OlmoeTopKRouter"),
        reroute=_softmax_topk("attr", cast=True),
        note="softmax, top-k of probabilities",
    ),
    Adapter(
        "qwen3-vl-moe",
        ("Qwen3VLMoeTextTopKRouter",),
        reroute=_softmax_topk("always", cast=True),
        note="softmax, top-k renormalised",
    ),
    Adapter(
        "mixtral",
        ("MixtralTopKRouter",),
        reroute=_softmax_topk("always", cast=False),
        note="softmax, top-k renormalised",
    ),
    Adapter(
        "llama4",
        ("Llama4Router",),
        router="sigmoid",
        index=1,
        reroute=_reroute_llama4,
        note="top-k on logits, sigmoid gates; shared expert",
    ),
    Adapter(
        "aria",
        ("AriaTextTopKRouter",),
        reroute=_reroute_aria,
        note="top-k on logits, softmax over k; shared experts",
    ),
    Adapter(
        "glm4v-moe",
        ("Glm4vMoeTextTopkRouter",),
        router="sigmoid",
        reroute=_reroute_deepseek,
        note="sigmoid + correction bias, group top-k",
    ),
    Adapter(
        "ernie4.5-vl-moe",
        ("Ernie4_5_VLMoeMoeBlock",),
        index=1,
        top_k=_ernie_top_k,
        note="hard modality split: text and vision experts; no modality bias",
    ),
    Adapter(
        "smar",
        ("smar.moe.Router",),
        index=None,
        top_k=lambda module, parent: parent.top_k,
        reroute=_reroute_logits_only,
        note="smar.moe.Router (upcycled or own MoE block)",
    ),
)


def _smar_router_class():
    from smar.moe import Router

    return Router


def _resolve(adapter: Adapter) -> Adapter:
    """Replaces the string "smar.moe.Router" by the class (names may collide with users')."""
    if "smar.moe.Router" not in adapter.classes:
        return adapter
    classes = tuple(_smar_router_class() if c == "smar.moe.Router" else c for c in adapter.classes)
    return Adapter(
        adapter.name,
        classes,
        adapter.router,
        adapter.index,
        adapter.top_k,
        adapter.reroute,
        adapter.note,
    )


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


def _layer_index(name: str) -> int | None:
    hits = _LAYER.findall(name)
    return int(hits[-1]) if hits else None


def find_routers(
    model: nn.Module, adapters: Adapter | Sequence[Adapter] | None = None
) -> list[RouterSite]:
    """All router modules of ``model`` that an adapter recognises, ordered by layer.

    Modules inside a matched router are not searched (Ernie's MoE block holds two routers).

    Args:
        model: any ``nn.Module``, e.g. a transformers model.
        adapters: an adapter or several, tried before the built-in ones (:data:`ADAPTERS`).

    Returns:
        A list of :class:`RouterSite`, possibly empty (the caller decides whether that is an error;
        see :func:`no_router_error`).
    """
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    tried = [_resolve(a) for a in (*(adapters or ()), *ADAPTERS)]
    sites: list[RouterSite] = []
    modules = dict(model.named_modules())
    inside: list[str] = []
    for name, module in modules.items():
        if any(name.startswith(p + ".") for p in inside):
            continue
        adapter = next((a for a in tried if a.matches(module)), None)
        if adapter is None:
            continue
        inside.append(name)
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if name else None
        layer = _layer_index(name)
        sites.append(
            RouterSite(name, module, parent, attr, -1 if layer is None else layer, adapter)
        )
    if any(s.layer < 0 for s in sites):  # no layer index in the names: number in module order
        for i, s in enumerate(sites):
            s.layer = i
    if len({s.layer for s in sites}) != len(sites):
        raise ValueError(
            "several routers map to the same layer index: "
            f"{[(s.name, s.layer) for s in sites]}; pass adapter= for this model"
        )
    return sorted(sites, key=lambda s: s.layer)


def no_router_error(model: nn.Module) -> ValueError:
    """The error for a model without any recognised router, naming the fix."""
    known = ", ".join(f"{a.name} ({', '.join(map(str, a.classes))})" for a in ADAPTERS)
    return ValueError(
        f"no router found in {type(model).__name__}; known adapters: {known}. For another MoE "
        "architecture pass adapter=smar.adapters.Adapter(name, classes=('YourRouterClass',), "
        "index=<position of the logits in its output>, router='softmax' or 'sigmoid'); for a "
        "dense model, see smar.hf.upcycle_hf"
    )
