"""One loader for model folders, used by every command that reads a trained model.

A folder is what ``save_pretrained`` (and :class:`smar.hf.SMARTrainer`) writes: a causal LM, a
LLaVA-style or native multimodal MoE model (the class its ``config.json`` names), a model
upcycled by :func:`smar.hf.upcycle_hf`, or a PEFT adapter folder (``adapter_config.json``: its
base model is loaded first, then the adapter). Where the folder holds ``smar_bias.safetensors``
the trained modality bias is attached with the saved config, so the model routes as it was
trained; ``bias=False`` looks at the model without it. :attr:`Loaded.note` says in one line which
of the two it is, and the commands print it.

    loaded = load_model_folder("out/checkpoint-100")
    print(loaded.note)          # "...: modality bias loaded (smar_bias.safetensors, 2 routers)"
    loaded.model(**batch)       # routes with the trained bias
    loaded.language_model()     # the part that reads text, for language retention
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from smar.hf.inspect import _check_local, load_model_dir
from smar.hf.saving import BIAS_FILE, load_bias
from smar.routing import Regularizer

__all__ = ["Loaded", "load_model_folder"]

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Loaded:
    """A model loaded from a folder.

    Attributes:
        model: the model in eval mode (a ``PeftModel`` for an adapter folder).
        path: the folder.
        regularizer: SMAR attached with the trained bias, or None (no bias file, or
            ``bias=False``). It holds the bias wrappers: ``regularizer.detach()`` removes them.
        note: one line saying what was loaded, the bias included.
    """

    model: nn.Module
    path: str
    regularizer: Regularizer | None
    note: str

    def language_model(self) -> nn.Module:
        """The model that reads text: the model itself. A LLaVA-style or native multimodal
        model run on ``input_ids`` alone is its language model (and the text row of the bias
        applies), so language retention measures what the vision training left of it."""
        return self.model


def _is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _load_adapter_folder(path: Path) -> nn.Module:
    from peft import PeftModel

    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{path / ADAPTER_CONFIG} names no base_model_name_or_path; fix: write it with PEFT's "
            "save_pretrained, or merge the adapter into its base model and save that"
        ) from None
    base_dir = Path(base) if Path(base).is_absolute() else (path / base)
    if not base_dir.is_dir():
        base_dir = Path(base)
    if not base_dir.is_dir():
        raise ValueError(
            f"{path} is a PEFT adapter of {base!r}, which is not a local folder; fix: save the "
            "base model locally and set base_model_name_or_path in adapter_config.json to it"
        )
    return PeftModel.from_pretrained(load_model_dir(str(base_dir)), str(path))


def load_model_folder(
    path, *, bias: bool = True, weights: bool = True, adapter=None
) -> Loaded:
    """The model of a folder, with its trained modality bias where it has one.

    Args:
        path: a folder written by ``save_pretrained`` (model or PEFT adapter).
        bias: attach ``smar_bias.safetensors`` when the folder has it (False: the model as
            ``from_pretrained`` gives it).
        weights: load the weights (False: the architecture on the meta device, without bias).
        adapter: adapters for routers the model does not declare, as given to ``smar.attach``.

    Returns:
        A :class:`Loaded`.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: an adapter folder whose base model is not local.
    """
    _check_local(path)
    folder = Path(path).expanduser()
    if _is_adapter_folder(folder):
        model, what = _load_adapter_folder(folder), "PEFT adapter"
    else:
        model, what = load_model_dir(str(folder), weights=weights), type_name(folder)
    model.eval()
    has_bias = (folder / BIAS_FILE).is_file()
    reg = None
    if has_bias and bias and weights:
        reg = load_bias(model, folder, adapter=adapter)
        note = f"modality bias loaded ({BIAS_FILE}, {len(reg.sites)} routers)"
    elif has_bias:
        note = f"{BIAS_FILE} not loaded (--no-bias): the model without its trained bias"
    else:
        note = f"no {BIAS_FILE}: the model as saved"
    return Loaded(model, str(path), reg, f"{path} ({what}): {note}")


def type_name(folder: Path) -> str:
    """The architecture a folder's config names, for messages."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "model"
    names = config.get("architectures") if isinstance(config, dict) else None
    return names[0] if names else str(config.get("model_type", "model"))
