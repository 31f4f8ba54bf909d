"""Upcycling of Hugging Face dense decoders into MoE (the MoE-LLaVA recipe) and loading what
``save_pretrained`` wrote after it; works on partitioned (DeepSpeed ZeRO-3) parameters too.

Shapes legend: D model width, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from smar.errors import UsageError
from smar.moe import MoEBlock
from smar.upcycle import check_options, upcycle

__all__ = ["upcycle_hf", "from_pretrained_upcycled", "upcycled_class", "model_class"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# upcycling


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    hf: Any = model  # a transformers model, or its decoder itself
    decoder = hf.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(la, "mlp") for la in layers):
        raise UsageError(
            f"cannot find the decoder layers of {type(model).__name__}: expected "
            "model.get_decoder().layers[i].mlp (Llama, Qwen2, Qwen3, Mistral, Phi-3 families)"
        )
    return layers


def _gathered(module: nn.Module) -> AbstractContextManager[Any]:
    """Under DeepSpeed ZeRO-3 (``zero.Init``), the full weights of ``module`` for the duration:
    its parameters are partitioned (``ds_id``) and read as empty tensors otherwise. The expert
    copies are made inside; new modules built under ``zero.Init`` are partitioned by it."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _layer_indices(layers: str | Sequence[int], n: int) -> list[int]:
    if layers == "all":
        return list(range(n))
    if layers == "alternate":
        return list(range(0, n, 2))  # MoE-LLaVA's sparse layers: every other one from the first
    fix = f"layers must be 'all', 'alternate' or a list of indices in [0, {n}); got {layers!r}"
    if (
        isinstance(layers, str)
        or not hasattr(layers, "__iter__")
        or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers)
    ):
        raise UsageError(fix)
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise UsageError(fix)
    return idx


@torch.no_grad()
def upcycle_hf(
    model: nn.Module,
    *,
    num_experts: int = 4,
    top_k: int = 2,
    layers: str | Sequence[int] = "all",
    noise: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Turns the MLPs of a dense HF decoder into MoE blocks whose experts copy the MLP (MoE-LLaVA).

    Each chosen ``layers[i].mlp`` becomes a :class:`smar.moe.MoEBlock` (router ``smar.moe.Router``,
    softmax top-k, gates renormalised over the k): with ``noise=0`` it computes the same function
    as the MLP until training moves the experts apart. Works in place on a causal LM or on a
    LLaVA-style model around one (``model.get_decoder()``). The choice is stored in
    ``model.config.smar_upcycle`` so that :func:`from_pretrained_upcycled` rebuilds the model
    from what ``save_pretrained`` writes.

    Args:
        model: a transformers model with ``get_decoder().layers[i].mlp`` SwiGLU MLPs.
        num_experts: ``E``.
        top_k: ``K``.
        layers: ``"all"``, ``"alternate"`` (layers 0, 2, 4, ...) or a list of layer indices.
        noise: relative noise added to each expert copy (see :func:`smar.moe.upcycle`).
        seed: seed of the new routers and of the noise.

    Returns:
        The same model, upcycled.
    """
    check_options(num_experts, top_k, noise)
    decoder_layers = _decoder_layers(model)
    idx = _layer_indices(layers, len(decoder_layers))
    generator = torch.Generator().manual_seed(seed)
    for i in idx:
        mlp = decoder_layers[i].get_submodule("mlp")
        if isinstance(mlp, MoEBlock):
            raise UsageError(f"layer {i} is already a MoE block: upcycle a dense model once")
        with _gathered(mlp):
            decoder_layers[i].mlp = upcycle(
                mlp, num_experts=num_experts, top_k=top_k, noise=noise, generator=generator
            )
    config: Any = model.config  # a transformers config: it saves the attributes it is given
    config.smar_upcycle = {
        "num_experts": num_experts,
        "top_k": top_k,
        "layers": idx,
        "noise": noise,
        "seed": seed,
    }
    log.info(
        "upcycled layers %s of %s into %d experts, top-%d",
        idx,
        type(model).__name__,
        num_experts,
        top_k,
    )
    return model


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The model class that builds ``config`` (see :func:`smar.hf.inspect.config_model_class`)."""
    from smar.hf.config import config_model_class

    return config_model_class(config)


def upcycled_class(cls: type[PreTrainedModel], spec: dict[str, Any]) -> type[PreTrainedModel]:
    """A subclass of ``cls`` that upcycles itself in ``__init__`` as ``spec`` says.

    transformers' own loading (key renaming, tied weights, sharding, dtype, device map) then
    fills the MoE blocks like any other module. The class keeps ``cls``'s name, so that what it
    saves names the original architecture.
    """
    options = {k: spec[k] for k in ("num_experts", "top_k", "layers")}

    base: Any = cls  # the class built below derives from it at runtime

    def __init__(
        self: PreTrainedModel, config: PretrainedConfig, *args: Any, **kwargs: Any
    ) -> None:
        base.__init__(self, config, *args, **kwargs)
        upcycle_hf(self, **options)
        self.config.smar_upcycle = dict(spec)

    new = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    return cast(type[PreTrainedModel], new)


def from_pretrained_upcycled(
    path: str, cls: type[PreTrainedModel] | None = None, **kwargs: Any
) -> nn.Module:
    """Loads a model saved after :func:`upcycle_hf` (``save_pretrained``), bit-exactly.

    Builds the architecture recorded in ``config.smar_upcycle`` and lets transformers load the
    saved weights into it.

    Args:
        path: the directory ``save_pretrained`` wrote.
        cls: the model class; by default the first of ``config.architectures``.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    config = transformers.AutoConfig.from_pretrained(path)
    from smar.hf.config import upcycle_spec

    spec = upcycle_spec(config, str(path))
    if spec is None:
        raise UsageError(f"{path} has no smar_upcycle in its config: load it with from_pretrained")
    cls = model_class(config) if cls is None else cls
    return upcycled_class(cls, spec).from_pretrained(path, **kwargs)
