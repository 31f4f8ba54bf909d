"""Inspection of a saved model: the routers smar finds (``smar inspect DIR``), built on the meta
device from the config alone.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import transformers
from torch import nn

from smar.adapters import Adapter, find_routers
from smar.hf.upcycle import from_pretrained_upcycled, upcycle_hf
from smar.modality import special_token_ids
from smar.routing import balancing_loss_in_model

__all__ = ["load_model_dir", "inspect_model_dir", "config_model_class", "upcycle_spec"]

log = logging.getLogger(__name__)


def load_model_dir(path: str, *, weights: bool = True, **kwargs) -> nn.Module:
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
            raise ValueError(f"{_where(path)} smar_upcycle: {e}; {_UPCYCLE_FIX}") from None
    if weights:
        return cls.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        return cls._from_config(config)


def _where(path) -> str:
    return os.path.join(os.fspath(path), "config.json")


def _config(path):
    """The folder's config; a local folder without a readable config.json says so in one line
    (a model-hub id is left to transformers)."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.isdir(p) and not os.path.isfile(os.path.join(p, "config.json")):
        raise FileNotFoundError(
            f"{p} has no config.json; fix: pass a folder written by save_pretrained"
        )
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        if isinstance(e, OSError) and not os.path.isdir(p):
            raise  # a model-hub id: transformers' own message says what to do
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise ValueError(
            f"{_where(path)}: {first}; fix: save the model with save_pretrained from a "
            "transformers release that knows its model_type"
        ) from None


_AUTO = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")


def config_model_class(config, path: str = "the model") -> type:
    """The transformers model class that builds ``config``.

    The first of ``config.architectures`` that is a ``PreTrainedModel`` class made for this
    config's type; else the class the Auto mappings give for the config (image-text-to-text,
    then causal LM, then the bare model). ``architectures`` is only a hint a user can edit:
    a name that is no model class (``"pipeline"``, ``"Trainer"``) or a class of another model
    type (which would load with random weights) is passed over, with a warning.
    """
    names = getattr(config, "architectures", None) or []
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        cls = _transformers_attr(name)
        if _builds(cls, config):
            return cls
    for auto in _AUTO:
        try:
            cls = getattr(transformers, auto)._model_mapping[type(config)]
        except (KeyError, AttributeError, ValueError):
            continue
        if isinstance(cls, (tuple, list)):  # a few model types map to several classes
            cls = cls[0]
        if names:
            log.warning(
                "%s names architectures %s, none a model class for %s; using %s",
                _where(path), names, config.model_type, cls.__name__,
            )  # fmt: skip
        return cls
    raise ValueError(
        f"{_where(path)}: no transformers model class builds model_type "
        f"{getattr(config, 'model_type', None)!r} (architectures {names}); fix: set "
        '"architectures" to the model\'s class name, e.g. ["Qwen3MoeForCausalLM"]'
    )


def _transformers_attr(name):
    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:  # transformers imports lazily: a name may pull in a module missing a dependency
        return getattr(transformers, name, None)
    except Exception:  # noqa: BLE001
        return None


def _builds(cls, config) -> bool:
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return False
    expected = getattr(cls, "config_class", None)
    if expected is None:
        return False
    return isinstance(config, expected) or getattr(expected, "model_type", None) == getattr(
        config, "model_type", ""
    )


_UPCYCLE_KEYS = ("num_experts", "top_k", "layers")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_UPCYCLE_FIX = (
    "fix: upcycle the dense model again with smar.hf.upcycle_hf and save_pretrained, or remove "
    "smar_upcycle from config.json to load the model as saved"
)


def upcycle_spec(config, path: str = "the model") -> dict | None:
    """``config.smar_upcycle`` (written by :func:`smar.hf.upcycle_hf`) checked, or None.

    Raises:
        ValueError: not a dict of ``num_experts`` (>= 1), ``top_k`` (1 to num_experts),
            ``layers`` ("all", "alternate" or layer indices) and optional ``noise``, ``seed``.
    """
    spec = getattr(config, "smar_upcycle", None)
    if spec is None:
        return None
    where = f"{_where(path)} smar_upcycle"

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(spec, dict):
        raise ValueError(
            f"{where} must be a dict of {list(_UPCYCLE_KEYS)}; got {spec!r}; {_UPCYCLE_FIX}"
        )
    missing = [k for k in _UPCYCLE_KEYS if k not in spec]
    unknown = sorted(set(spec) - {*_UPCYCLE_KEYS, "noise", "seed"})
    if missing or unknown:
        raise ValueError(f"{where}: missing {missing}, unknown {unknown}; {_UPCYCLE_FIX}")
    n, k, layers = spec["num_experts"], spec["top_k"], spec["layers"]
    if not integer(n) or n < 1:
        problem = f"num_experts must be an integer >= 1; got {n!r}"
    elif not integer(k) or not 1 <= k <= n:
        problem = f"top_k must be an integer from 1 to num_experts={n}; got {k!r}"
    elif not (layers in ("all", "alternate") or (
            isinstance(layers, list) and all(integer(i) and i >= 0 for i in layers))):  # fmt: skip
        problem = f"layers must be 'all', 'alternate' or a list of layer indices; got {layers!r}"
    elif not _finite_number(spec.get("noise", 0.0)) or spec.get("noise", 0.0) < 0:
        problem = f"noise must be a finite number >= 0; got {spec['noise']!r}"
    elif not integer(spec.get("seed", 0)):
        problem = f"seed must be an integer; got {spec['seed']!r}"
    else:
        return spec
    raise ValueError(f"{where}: {problem}; {_UPCYCLE_FIX}")


def _check_local(path) -> None:
    """A path that is plainly local (absolute, ``./``, ``~``, a file) must be a folder: say so
    here rather than let the model hub answer for a missing folder."""
    p = os.fspath(path)
    local = os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1 or os.path.exists(p)
    if local and not os.path.isdir(os.path.expanduser(p)):
        what = "is a file, not a folder" if os.path.exists(p) else "no such directory"
        raise FileNotFoundError(f"{p}: {what} (pass a folder written by save_pretrained)")


def load_adapter(spec: str) -> Adapter:
    """An :class:`smar.adapters.Adapter` named ``"package.module:NAME"`` (``smar inspect
    --adapter``); ``NAME`` may be an adapter or a list of them."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--adapter must be 'package.module:NAME'; got {spec!r}")
    value = getattr(importlib.import_module(module_name), attr)
    adapters = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(a, Adapter) for a in adapters):
        raise ValueError(f"{spec} is not a smar.adapters.Adapter (or a list of them)")
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


def _bias_line(path) -> str:
    """What the folder's ``smar_bias.safetensors`` holds, in one line."""
    from smar.hf.saving import BIAS_FILE, _read

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


def _can_bias(site) -> str:
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
