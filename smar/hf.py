"""Hugging Face integration: a Trainer that adds SMAR, MoE-LLaVA style upcycling, and inspection.

* :class:`SMARTrainer`: a ``transformers.Trainer`` whose loss is the model's loss plus
  :meth:`smar.routing.Regularizer.loss`, logging ``smar/*`` terms and per-layer MRD.
  :class:`SMARTrainerMixin` does the same for any Trainer subclass, e.g. TRL's ``SFTTrainer``::

      class SMARSFTTrainer(SMARTrainerMixin, trl.SFTTrainer):
          pass

      trainer = SMARSFTTrainer(model=model, args=sft_config, train_dataset=ds,
                               smar_config=smar.SMARConfig())

* :func:`upcycle_hf`: turns the MLPs of a dense decoder (Llama, Qwen2, Qwen3, Mistral, Phi-3) into
  :class:`smar.moe.MoEBlock` whose experts copy the MLP (the MoE-LLaVA recipe);
  :func:`from_pretrained_upcycled` loads what ``save_pretrained`` wrote.
* :func:`inspect_model_dir`: the routers smar finds in a saved model (``smar inspect DIR``).

Shapes legend: B batch, S sequence, T = B * S tokens, D model width, E experts, K top-k.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import transformers
from torch import nn

from smar.adapters import Adapter, find_routers
from smar.modality import special_token_ids
from smar.moe import MoEBlock, upcycle
from smar.routing import Regularizer, SMARConfig, attach, balancing_loss_in_model

__all__ = [
    "SMARTrainerMixin",
    "SMARTrainer",
    "upcycle_hf",
    "from_pretrained_upcycled",
    "upcycled_class",
    "load_model_dir",
    "inspect_model_dir",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Trainer


class SMARTrainerMixin:
    """Adds SMAR's routing loss to a ``transformers.Trainer`` subclass's loss and logs its terms.

    Keyword args (besides the Trainer's):
        smar_config: :class:`smar.SMARConfig` (defaults if None).
        smar_adapter: adapters for router classes smar does not know.

    The regularizer is attached before the Trainer is built, so the modality bias parameters are
    part of the model and of the optimizer. Logged at each logging step (means since the last
    log): ``smar/total``, ``smar/band``, ``smar/lb``, ``smar/z``, ``smar/mrd`` and
    ``smar/layerNN/mrd``. If the model adds its own load-balancing loss
    (``output_router_logits=True`` with ``router_aux_loss_coef > 0``) while ``lb_weight > 0``,
    a warning says how to keep only one.
    """

    def __init__(
        self,
        *args,
        smar_config: SMARConfig | None = None,
        smar_adapter: Adapter | Sequence[Adapter] | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("SMARTrainer needs the model at construction (model=...)")
        config = SMARConfig() if smar_config is None else smar_config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warned below, once, with the trainer's words
            self.smar: Regularizer = attach(model, config, adapter=smar_adapter)
        double = balancing_loss_in_model(model)
        if double and config.lb_weight > 0:
            warnings.warn(f"SMARTrainer: load balancing would count twice: {double}", stacklevel=2)
        self._smar_sums: dict[str, float] = {}
        self._smar_count = 0
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Only ask for the outputs if the caller does: TRL recomputes them with an extra forward.
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        reg = self.smar.loss()
        # The Trainer divides the loss by the accumulation steps unless the model already
        # normalised it by the number of items in the whole accumulated batch; then so do we.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if scaled and model.training:
            reg = reg / getattr(self, "current_gradient_accumulation_steps", 1)
        if model.training and torch.is_grad_enabled() and not reg.requires_grad:
            warnings.warn(
                "SMAR's routing loss is not connected to the graph (reentrant gradient "
                "checkpointing?): use gradient_checkpointing_kwargs={'use_reentrant': False}",
                stacklevel=2,
            )
        loss = loss + reg
        if model.training:
            for name, value in self.smar.terms().items():
                if value == value:  # NaN MRD: a modality absent from this batch
                    self._smar_sums[name] = self._smar_sums.get(name, 0.0) + value
                    self._smar_sums[f"{name}#n"] = self._smar_sums.get(f"{name}#n", 0.0) + 1
            self._smar_count += 1
        return (loss, *result[1:]) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._smar_count and "loss" in logs:
            for name, total in self._smar_sums.items():
                if not name.endswith("#n"):
                    logs[name] = total / self._smar_sums[f"{name}#n"]
            self._smar_sums, self._smar_count = {}, 0
        super().log(logs, *args, **kwargs)


class SMARTrainer(SMARTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with SMAR's routing loss; see :class:`SMARTrainerMixin`.

    Example:
        >>> trainer = SMARTrainer(model=model, args=TrainingArguments("out"),   # doctest: +SKIP
        ...                       train_dataset=ds, smar_config=smar.SMARConfig())
    """


# ----------------------------------------------------------------------------------------------
# upcycling


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(la, "mlp") for la in layers):
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected "
            "model.get_decoder().layers[i].mlp (Llama, Qwen2, Qwen3, Mistral, Phi-3 families)"
        )
    return layers


def _layer_indices(layers: str | Sequence[int], n: int) -> list[int]:
    if layers == "all":
        return list(range(n))
    if layers == "alternate":
        return list(range(0, n, 2))  # MoE-LLaVA's sparse layers: every other one from the first
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"layers must be 'all', 'alternate' or indices in [0, {n}); got {layers}")
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
    decoder_layers = _decoder_layers(model)
    idx = _layer_indices(layers, len(decoder_layers))
    generator = torch.Generator().manual_seed(seed)
    for i in idx:
        mlp = decoder_layers[i].mlp
        if isinstance(mlp, MoEBlock):
            raise ValueError(f"layer {i} is already a MoE block: upcycle a dense model once")
        decoder_layers[i].mlp = upcycle(
            mlp, num_experts=num_experts, top_k=top_k, noise=noise, generator=generator
        )
    model.config.smar_upcycle = {
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


def _model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def upcycled_class(cls: type, spec: dict) -> type:
    """A subclass of ``cls`` that upcycles itself in ``__init__`` as ``spec`` says.

    transformers' own loading (key renaming, tied weights, sharding, dtype, device map) then
    fills the MoE blocks like any other module. The class keeps ``cls``'s name, so that what it
    saves names the original architecture.
    """
    options = {k: spec[k] for k in ("num_experts", "top_k", "layers")}

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        upcycle_hf(self, **options)
        self.config.smar_upcycle = dict(spec)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def from_pretrained_upcycled(path: str, cls: type | None = None, **kwargs) -> nn.Module:
    """Loads a model saved after :func:`upcycle_hf` (``save_pretrained``), bit-exactly.

    Builds the architecture recorded in ``config.smar_upcycle`` and lets transformers load the
    saved weights into it.

    Args:
        path: the directory ``save_pretrained`` wrote.
        cls: the model class; by default the first of ``config.architectures``.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    config = transformers.AutoConfig.from_pretrained(path)
    spec = getattr(config, "smar_upcycle", None)
    if not spec:
        raise ValueError(f"{path} has no smar_upcycle in its config: load it with from_pretrained")
    cls = _model_class(config) if cls is None else cls
    return upcycled_class(cls, spec).from_pretrained(path, **kwargs)


def load_model_dir(path: str, *, weights: bool = True) -> nn.Module:
    """A model from a ``save_pretrained`` directory: upcycled, or the class of its config.

    Args:
        path: the directory.
        weights: load the weights; ``False`` builds the architecture on the meta device (enough
            to list routers, whatever the model's size).
    """
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "smar_upcycle", None):
        if weights:
            return from_pretrained_upcycled(path)
        with torch.device("meta"):
            model = _model_class(config)._from_config(config)
        # Outside the meta context: upcycling checks the activation on real numbers; the new
        # blocks follow the dense weights onto the meta device.
        spec = config.smar_upcycle
        return upcycle_hf(model, **{k: spec[k] for k in ("num_experts", "top_k", "layers")})
    cls = _model_class(config)
    if weights:
        return cls.from_pretrained(path)
    with torch.device("meta"):
        return cls._from_config(config)


def inspect_model_dir(path: str) -> str:
    """A printable table of the MoE routers smar finds in a saved model (``smar inspect DIR``).

    Only the config is needed: the model is built on the meta device, without its weights.
    """
    model = load_model_dir(path, weights=False)
    sites = find_routers(model)
    lines = [f"{type(model).__name__} from {path}"]
    if not sites:
        lines.append(
            "no router found: this model has no MoE layer smar knows (pass adapter= to "
            "smar.attach, or upcycle a dense model with smar.hf.upcycle_hf)"
        )
        return "\n".join(lines)
    tokens = special_token_ids(model.config)
    names = {1: "image", 2: "video", 3: "audio"}
    lines.append(
        f"{len(sites)} routers; modality tokens: "
        + (", ".join(f"{names[m]}={ids}" for m, ids in tokens.items()) or "none (text only)")
    )
    double = balancing_loss_in_model(model)
    if double:
        lines.append(f"note: {double}")
    header = ("layer", "module", "class", "adapter", "gating", "experts", "top-k")
    rows = [
        (
            str(s.layer),
            s.name,
            type(s.module).__name__,
            s.adapter.name,
            s.adapter.router,
            str(s.num_experts),
            str(s.top_k),
        )
        for s in sites
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
