"""Run configuration helpers: one override syntax, stable hashes, atomic files.

Configs are small dataclasses. ``apply_overrides(cfg, ["tune.lr=3e-4", "arms=none,smar"])``
changes fields by dotted path with values parsed from their field's type; every run writes its
resolved config next to its results with :func:`write_json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

__all__ = ["apply_overrides", "to_dict", "config_hash", "write_json", "read_json", "cache_dir"]


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


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Writes JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=float)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def cache_dir() -> Path:
    """The user's cache folder for smar: ``$SMAR_CACHE``, ``$XDG_CACHE_HOME/smar`` or
    ``~/.cache/smar``."""
    if os.environ.get("SMAR_CACHE"):
        return Path(os.environ["SMAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smar"
