"""Atomic file writes (a unique temporary file beside the target, renamed into place), and why
an output path cannot be written, found before any work.

``tempfile.mkstemp`` creates files readable by their owner only; :func:`publish` gives the file
the permissions a plain ``open(path, "w")`` would (``0o666`` less the umask) before the rename,
so that reports and checkpoints are readable as any other output.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

__all__ = ["publish", "write_text", "output_problem"]

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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: a reader never sees half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def output_problem(path: str | os.PathLike, *, folder: bool = True) -> str | None:
    """Why ``path`` cannot be written as an output folder (``folder=True``) or file, or None:
    it is a file (a folder), it lies under a file, or its nearest existing folder is not
    writable by this process (a file is created there and removed at once to tell)."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        return "is a file"
    if not folder and p.is_dir():
        return "is a folder"
    d = p if folder else p.parent
    while not d.exists() and d.parent != d:
        d = d.parent
    if not d.is_dir():
        return f"is under {d}, a file"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"cannot be written: {d} is read-only for this user"
    try:  # what access() cannot tell: a read-only mount for root, sysfs, ...
        fd, probe = tempfile.mkstemp(dir=d, prefix=".smar-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"cannot be written: {d}: {e.strerror or e}"
    return None
