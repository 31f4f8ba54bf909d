"""Files of the testbed: atomic JSON, and the user's cache folder.

Every run writes its resolved config and results with :func:`write_json` (a temporary file in
the same folder, then a rename), so an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_json", "read_json", "cache_dir"]


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
