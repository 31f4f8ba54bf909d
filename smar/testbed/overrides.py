"""One override syntax for the testbed's configs, and their stable hashes.

Configs are small dataclasses. ``apply_overrides(cfg, ["tune.lr=3e-4", "arms=none,smar"])``
changes fields by dotted path with values parsed from their field's type; :func:`config_hash`
keys the cached stages on what they depend on.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from smar.errors import UsageError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Config = TypeVar("_Config")

__all__ = ["apply_overrides", "to_dict", "config_hash"]


def to_dict(cfg: DataclassInstance) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses allowed)."""
    blob = json.dumps(
        [
            to_dict(p) if dataclasses.is_dataclass(p) and not isinstance(p, type) else p
            for p in parts
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _parse(value: str, annotation: Any, current: Any) -> Any:
    """Parses ``value`` as the type of a field (from its annotation or current value)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X] / X | None
        if value.lower() == "none":
            return None
        rest = [a for a in args if a is not type(None)]
        return _parse(value, rest[0] if len(rest) == 1 else None, current)
    if origin is tuple and len(args) == 2 and Ellipsis not in args:  # a (low, high) pair
        parts = value.replace(":", ",").split(",")
        if len(parts) != 2:
            raise UsageError("expected a pair low,high (e.g. 1.5,2)")
        return tuple(_parse(v, a, None) for v, a in zip(parts, args, strict=True))
    if origin in (list, tuple) or isinstance(current, (list, tuple)):
        inner = args[0] if args else (type(current[0]) if current else str)
        if inner is Ellipsis or isinstance(inner, typing.TypeVar):
            inner = str
        if typing.get_origin(inner) is tuple:  # a list of pairs: low:high,low:high
            items = [v for v in value.split(",") if v != ""]
            if any(v.count(":") != 1 for v in items):
                raise UsageError("write pairs as low:high, e.g. 1.5:2,0:0")
            parsed = [_parse(v, inner, None) for v in items]
        else:
            parsed = [_parse(v, inner, None) for v in value.split(",") if v != ""]
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
        raise UsageError("expected true or false")
    if value.lower() == "none" and current is None and annotation is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"expected {_TYPE_WORDS.get(kind, kind.__name__)}") from None


def apply_overrides(cfg: _Config, overrides: list[str]) -> _Config:
    """Returns a copy of ``cfg`` with ``section.field=value`` overrides applied.

    Raises:
        UsageError: (a ``ValueError``) an override that is malformed, given twice, names an
            unknown field (with the closest known one) or holds a value its field cannot take.
    """
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise UsageError(
                f"override {item!r} must look like section.field=value", "e.g. tune.lr=3e-4"
            )
        path, value = item.split("=", 1)
        if path in seen:
            raise UsageError(f"{path} is given twice ({seen[path]}, {item})", "give it once")
        seen[path] = item
        cfg = _set(cfg, path.split("."), value, item)
    return cfg


def _set(obj: Any, names: list[str], value: str, item: str, prefix: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = names[0]
    where = f" in {prefix[:-1]}" if prefix else ""
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(fields)}"
        raise UsageError(f"override {item!r}: unknown field {name!r}{where}", hint)
    current = getattr(obj, name)
    if len(names) > 1:
        if not dataclasses.is_dataclass(current):
            raise UsageError(
                f"override {item!r}: {prefix}{name!r} is not a section", f"write {prefix}{name}=..."
            )
        sub = _set(current, names[1:], value, item, f"{prefix}{name}.")
        return dataclasses.replace(obj, **{name: sub})
    if dataclasses.is_dataclass(current):
        first = dataclasses.fields(current)[0]
        example = f"{prefix}{name}.{first.name}={getattr(current, first.name)}"
        raise UsageError(
            f"override {item!r}: {prefix}{name} is a section", f"set a field: {example}"
        )
    hints = typing.get_type_hints(type(obj))
    try:
        parsed = _parse(value, hints.get(name), current)
    except (TypeError, ValueError) as e:
        raise UsageError(f"override {item!r}: cannot parse {value!r}: {e}") from None
    try:
        return dataclasses.replace(obj, **{name: parsed})
    except ValueError as e:  # the config's own __post_init__ check
        raise UsageError(f"override {item!r}: {e}") from None
