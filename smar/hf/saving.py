"""Saving and loading the trained modality bias, beside the model's own files.

Format (``smar_bias.safetensors`` in the directory ``save_pretrained`` wrote, or in a PEFT
adapter's directory):

* one float32 tensor ``(M, E)`` per biased router, named ``<router module name>.modality_bias``,
  where the router module name is the router's name in the model *without* smar or PEFT around
  it (e.g. ``model.layers.0.mlp.gate``; a PEFT ``base_model.model.`` prefix is removed);
* metadata ``format = "smar-bias/1"`` and ``smar_config`` = the :class:`smar.SMARConfig` as JSON.

The model's own weights are saved with the *original* router keys (the wrappers are taken out
while ``save_pretrained`` runs), so a plain ``from_pretrained`` loads every router weight;
:func:`load_bias` then attaches SMAR with the saved config and restores the bias::

    model = AutoModelForCausalLM.from_pretrained(path)
    reg = smar.hf.load_bias(model, path)      # outputs equal the trained model's
"""

from __future__ import annotations

import json
import os

from torch import Tensor, nn

from smar.routing import Regularizer, SMARConfig, attach

__all__ = ["BIAS_FILE", "FORMAT", "save_bias", "load_bias", "load_bias_into", "original_state_dict"]

BIAS_FILE = "smar_bias.safetensors"
FORMAT = "smar-bias/1"
_PEFT_PREFIX = "base_model.model."


def _plain(name: str) -> str:
    """The router's name without PEFT's prefix and tuner layer (``.base_layer``)."""
    name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def original_state_dict(reg: Regularizer, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of the model with SMAR attached, re-keyed as the model without it: the
    wrappers' ``<router>.router.<param>`` become ``<router>.<param>`` and the bias is left out."""
    wrapped = [s.name for s in reg.sites if "wrapper" in s.extra]
    out = {}
    for key, value in state.items():
        for name in wrapped:
            inner = f"{name}.router."
            at = key.find(inner)
            if at >= 0 and (at == 0 or key[at - 1] == "."):
                key = key[:at] + f"{name}." + key[at + len(inner) :]
                break
            if key.endswith(f"{name}.modality_bias") or key.endswith(".modality_bias"):
                key = None
                break
        if key is not None:
            out[key] = value
    return out


def save_bias(reg: Regularizer, path: str | os.PathLike) -> str | None:
    """Writes the regularizer's modality bias to ``path/smar_bias.safetensors``.

    Returns:
        The file written, or None when the regularizer has no bias (``modality_bias=False``).
    """
    from safetensors.torch import save_file

    state = reg.bias_state_dict()
    if not state:
        return None
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, BIAS_FILE)
    tensors = {_plain(k): v.detach().float().cpu().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "smar_config": json.dumps(reg.config.to_dict())}
    save_file(tensors, file, metadata=meta)
    return file


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    file = os.path.join(path, BIAS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no {BIAS_FILE} in {path}: save it with smar.hf.save_bias(reg, path) (SMARTrainer's "
            "checkpoints and save_model() write it)"
        )
    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a smar bias file (format {meta.get('format')!r})")
    return tensors, json.loads(meta["smar_config"])


def load_bias_into(reg: Regularizer, path: str | os.PathLike) -> None:
    """Copies the bias saved in ``path`` into an attached regularizer (same routers)."""
    tensors, _ = _read(path)
    mine = {_plain(k): k for k in reg.bias_state_dict()}
    reg.load_bias_state_dict({mine.get(k, k): v for k, v in tensors.items()})


def load_bias(
    model: nn.Module, path: str | os.PathLike, *, config: SMARConfig | None = None, adapter=None
) -> Regularizer:
    """Attaches SMAR to a loaded model with the saved config and restores the trained bias.

    Args:
        model: the model loaded from ``path`` (``from_pretrained``, or ``PeftModel.from_pretrained``
            for a PEFT adapter directory).
        path: a directory holding ``smar_bias.safetensors`` (see the module docstring).
        config: overrides the saved :class:`smar.SMARConfig` (e.g. other loss weights); its
            ``modality_bias`` must stay True.
        adapter: adapters for routers the model does not declare, as given to ``attach``.

    Returns:
        The attached regularizer; ``model``'s outputs equal the trained model's.
    """
    _, saved = _read(path)
    if config is None:
        config = SMARConfig(**saved)
    reg = attach(model, config, adapter=adapter)
    try:
        load_bias_into(reg, path)
    except Exception:
        reg.detach()
        raise
    return reg
