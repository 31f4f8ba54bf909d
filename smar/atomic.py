"""Atomic file writes: a unique temporary file beside the target, renamed into place.

``tempfile.mkstemp`` creates files readable by their owner only; :func:`publish` gives the file
the permissions a plain ``open(path, "w")`` would (``0o666`` less the umask) before the rename,
so that reports and checkpoints are readable as any other output.
"""

from __future__ import annotations

import os
import threading

__all__ = ["publish"]

_lock = threading.Lock()


def _umask() -> int:
    with _lock:  # os.umask can only be read by setting it
        mask = os.umask(0)
        os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Renames the finished temporary file ``tmp`` to ``path`` with ordinary permissions."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
