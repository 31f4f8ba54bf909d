"""A saved model folder's config: read in one line or refused in one, the transformers class that
builds it, and its ``smar_upcycle`` entry checked. :mod:`smar.hf.inspect` (which re-exports
:func:`config_model_class` and :func:`upcycle_spec`), :mod:`smar.hf.upcycle` and
:mod:`smar.hf.loading` read folders through it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, TypeGuard

import transformers
from transformers import PretrainedConfig, PreTrainedModel

from smar.errors import MissingFile, UsageError

__all__ = ["config_model_class", "upcycle_spec"]

log = logging.getLogger("smar.hf.inspect")


def _where(path: str | os.PathLike) -> str:
    return os.path.join(os.fspath(path), "config.json")


def _config(path: str | os.PathLike) -> PretrainedConfig:
    """The folder's config; a local folder without a readable config.json says so in one line
    (a model-hub id is left to transformers)."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.isdir(p) and not os.path.isfile(os.path.join(p, "config.json")):
        what = "a folder where config.json should be" if os.path.isdir(
            os.path.join(p, "config.json")) else "no config.json"  # fmt: skip
        raise MissingFile(f"{p} has {what}", "pass a folder written by save_pretrained")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        if isinstance(e, OSError) and not os.path.isdir(p):
            raise  # a model-hub id: transformers' own message says what to do
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise UsageError(
            f"{_where(path)}: {first}; fix: save the model with save_pretrained from a "
            "transformers release that knows its model_type"
        ) from None


_AUTO = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")


def config_model_class(
    config: PretrainedConfig, path: str = "the model"
) -> type[PreTrainedModel]:
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
    raise UsageError(
        f"{_where(path)}: no transformers model class builds model_type "
        f"{getattr(config, 'model_type', None)!r} (architectures {names}); fix: set "
        '"architectures" to the model\'s class name, e.g. ["Qwen3MoeForCausalLM"]'
    )


def _transformers_attr(name: object) -> Any:
    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:  # transformers imports lazily: a name may pull in a module missing a dependency
        return getattr(transformers, name, None)
    except Exception:  # noqa: BLE001
        return None


def _builds(cls: object, config: PretrainedConfig) -> TypeGuard[type[PreTrainedModel]]:
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return False
    expected = getattr(cls, "config_class", None)
    if expected is None:
        return False
    return isinstance(config, expected) or getattr(expected, "model_type", None) == getattr(
        config, "model_type", ""
    )


_UPCYCLE_KEYS = ("num_experts", "top_k", "layers")


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_UPCYCLE_FIX = (
    "fix: upcycle the dense model again with smar.hf.upcycle_hf and save_pretrained, or remove "
    "smar_upcycle from config.json to load the model as saved"
)


def upcycle_spec(config: PretrainedConfig, path: str = "the model") -> dict[str, Any] | None:
    """``config.smar_upcycle`` (written by :func:`smar.hf.upcycle_hf`) checked, or None.

    Raises:
        ValueError: not a dict of ``num_experts`` (>= 1), ``top_k`` (1 to num_experts),
            ``layers`` ("all", "alternate" or layer indices) and optional ``noise``, ``seed``.
    """
    spec = getattr(config, "smar_upcycle", None)
    if spec is None:
        return None
    where = f"{_where(path)} smar_upcycle"

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(spec, dict):
        raise UsageError(
            f"{where} must be a dict of {list(_UPCYCLE_KEYS)}; got {spec!r}; {_UPCYCLE_FIX}"
        )
    missing = [k for k in _UPCYCLE_KEYS if k not in spec]
    unknown = sorted(set(spec) - {*_UPCYCLE_KEYS, "noise", "seed"})
    if missing or unknown:
        raise UsageError(f"{where}: missing {missing}, unknown {unknown}; {_UPCYCLE_FIX}")
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
    raise UsageError(f"{where}: {problem}; {_UPCYCLE_FIX}")


def _check_local(path: str | os.PathLike) -> None:
    """A path that is plainly local (absolute, ``./``, ``~``, a file) must be a folder: say so
    here rather than let the model hub answer for a missing folder."""
    p = os.fspath(path)
    local = os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1 or os.path.exists(p)
    if local and not os.path.isdir(os.path.expanduser(p)):
        what = "is a file, not a folder" if os.path.exists(p) else "no such directory"
        raise MissingFile(f"{p}: {what}", "pass a folder written by save_pretrained")
