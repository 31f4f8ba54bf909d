"""Inspection of a saved model: the routers smar finds (``smar inspect DIR``), built on the meta
device from the config alone (read by :mod:`smar.hf.config`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from smar.adapters import Adapter, RouterSite, find_routers
from smar.errors import UsageError
from smar.hf.config import (
    _UPCYCLE_FIX,
    _check_local,
    _config,
    _where,
    config_model_class,
    upcycle_spec,
)
from smar.hf.upcycle import from_pretrained_upcycled, upcycle_hf
from smar.modality import special_token_ids
from smar.routing import balancing_loss_in_model

__all__ = ["load_model_dir", "inspect_model_dir", "config_model_class", "upcycle_spec"]

log = logging.getLogger(__name__)


def load_model_dir(path: str, *, weights: bool = True, **kwargs: Any) -> nn.Module:
    """A model from a ``save_pretrained`` directory: upcycled, or the class of its config.

    Args:
        path: the directory.
        weights: load the weights; ``False`` builds the architecture on the meta device (enough
            to list routers, whatever the model's size).
        kwargs: passed to ``from_pretrained`` (e.g. ``use_safetensors=True``).

    Raises:
        FileNotFoundError: ``path`` is a local path but not a folder, or has no config.json.
        ValueError: a config.json that names no model class transformers has, or a bad
            ``smar_upcycle`` entry.
    """
    _check_local(path)
    config = _config(path)
    cls = config_model_class(config, path)
    spec = upcycle_spec(config, path)
    if spec is not None:
        try:
            if weights:
                return from_pretrained_upcycled(path, cls, **kwargs)
            with torch.device("meta"):
                model = cls._from_config(config)
            # Outside the meta context: upcycling checks the activation on real numbers; the
            # new blocks follow the dense weights onto the meta device.
            return upcycle_hf(model, **{k: spec[k] for k in ("num_experts", "top_k", "layers")})
        except ValueError as e:  # e.g. layers out of range, or the model is already MoE
            raise UsageError(f"{_where(path)} smar_upcycle: {e}; {_UPCYCLE_FIX}") from None
    if weights:
        return cls.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        return cls._from_config(config)


def load_adapter(spec: str) -> list[Adapter]:
    """An :class:`smar.adapters.Adapter` named ``"package.module:NAME"`` (``smar inspect
    --adapter``); ``NAME`` may be an adapter or a list of them."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--adapter must be 'package.module:NAME'; got {spec!r}")
    value = getattr(importlib.import_module(module_name), attr)
    adapters = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(a, Adapter) for a in adapters):
        raise UsageError(f"{spec} is not a smar.adapters.Adapter (or a list of them)")
    return adapters


def inspect_model_dir(path: str, adapter: Adapter | list[Adapter] | None = None) -> str:
    """A printable table of the MoE routers smar finds in a saved model (``smar inspect DIR``).

    Only the config is needed: the model is built on the meta device, without its weights.

    Args:
        path: a ``save_pretrained`` directory.
        adapter: adapters for routers the model does not declare (as given to ``attach``).
    """
    model = load_model_dir(path, weights=False)
    sites = find_routers(model, adapter, kinds=("mlp", "attention"))
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
    lines.append(_bias_line(path))
    header = ("layer", "module", "kind", "class", "adapter", "gating", "experts", "top-k", "bias")
    rows = [
        (
            str(s.layer),
            s.name,
            s.kind,
            type(s.module).__name__,
            s.adapter.name,
            s.adapter.router,
            str(s.num_experts),
            str(s.top_k),
            _can_bias(s),
        )
        for s in sites
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _bias_line(path: str) -> str:
    """What the folder's ``smar_bias.safetensors`` holds, in one line."""
    from smar.hf.saving import BIAS_FILE, _read

    if os.path.isdir(os.path.join(path, BIAS_FILE)):
        return f"{BIAS_FILE}: a folder, not a file (smar analyze and retention refuse it)"
    if not os.path.isfile(os.path.join(path, BIAS_FILE)):
        return f"{BIAS_FILE}: none (no trained modality bias)"
    try:
        tensors, config = _read(path)
    except (ValueError, OSError) as e:
        # The error starts with the file's path, which this line already names.
        why = str(e).replace(os.path.join(path, BIAS_FILE), "").lstrip(": ").split("; fix")[0]
        return f"{BIAS_FILE}: unreadable ({why[:160]})"
    largest = max((float(t.abs().max()) for t in tensors.values()), default=0.0)
    return (
        f"{BIAS_FILE}: trained modality bias for {len(tensors)} routers (largest |b| "
        f"{largest:.3g}); smar analyze and smar retention load it, --no-bias leaves it out"
    )


def _can_bias(site: RouterSite) -> str:
    if not site.adapter.bias:
        return "no: " + site.adapter.note.split(":")[0]
    if site.adapter.reroute is not None:
        return "yes (reroute)"
    from smar.bias import logit_weight

    try:
        logit_weight(site.module)
    except ValueError:
        return "no: logits not from one linear layer"
    return "yes"
