"""One override syntax for the testbed's configs, and their stable hashes.

Configs are small dataclasses. ``apply_overrides(cfg, ["tune.lr=3e-4", "arms=none,smar"])``
changes fields by dotted path with values parsed from their field's type; :func:`config_hash`
keys the cached stages on what they depend on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

__all__ = ["apply_overrides", "to_dict", "config_hash"]


def to_dict(cfg) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses allowed)."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _parse(value: str, annotation: Any, current: Any) -> Any:
    """Parses ``value`` as the type of a field (from its annotation or current value)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X] / X | None
        if value.lower() == "none":
            return None
        rest = [a for a in args if a is not type(None)]
        return _parse(value, rest[0] if len(rest) == 1 else None, current)
    if origin in (list, tuple) or isinstance(current, (list, tuple)):
        items = [v for v in value.split(",") if v != ""]
        inner = args[0] if args else (type(current[0]) if current else str)
        if inner is Ellipsis or isinstance(inner, typing.TypeVar):
            inner = str
        parsed = [_parse(v, inner, None) for v in items]
        return tuple(parsed) if (origin is tuple or isinstance(current, tuple)) else parsed
    kind = (
        annotation
        if isinstance(annotation, type)
        else (type(current) if current is not None else str)
    )
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if value.lower() == "none" and current is None and annotation is None:
        return None
    return kind(value)


def apply_overrides(cfg, overrides: list[str]):
    """Returns a copy of ``cfg`` with ``section.field=value`` overrides applied.

    Raises:
        ValueError: unknown field or unparsable value, naming the override and the known fields.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        path, value = item.split("=", 1)
        names = path.split(".")
        cfg = _set(cfg, names, value, item)
    return cfg


def _set(obj, names: list[str], value: str, item: str):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = names[0]
    if name not in fields:
        raise ValueError(f"override {item!r}: unknown field {name!r}; known: {sorted(fields)}")
    current = getattr(obj, name)
    if len(names) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"override {item!r}: {name!r} is not a section")
        return dataclasses.replace(obj, **{name: _set(current, names[1:], value, item)})
    hints = typing.get_type_hints(type(obj))
    try:
        parsed = _parse(value, hints.get(name), current)
    except (TypeError, ValueError) as e:
        raise ValueError(f"override {item!r}: cannot parse {value!r} ({e})") from e
    return dataclasses.replace(obj, **{name: parsed})
