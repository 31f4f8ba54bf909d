"""Files of the testbed: atomic writes, locks, checked reads, and the user's cache folder.

Every file is written through :func:`atomic_write`: a uniquely named temporary file in the same
folder, then a rename, so an interrupted or concurrent writer never leaves half a file behind nor
trips over another writer's temporary file. Builders of shared cache entries hold
:func:`file_lock`, so two commands on one cache build each entry once and both finish.

Every read is checked: :func:`read_json` (strict JSON, the one place JSON is parsed) and
:func:`load_tensors` (safetensors header and the sha256 of its data, recorded at write time)
raise :class:`~smar.errors.CorruptFile` naming the file. Caches set a corrupt file aside
with :func:`set_aside` and rebuild it. JSON is written strictly: NaN and infinities become null.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

from smar.atomic import publish
from smar.errors import CorruptFile, UsageError

__all__ = [
    "atomic_write",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "file_lock",
    "set_aside",
    "sha256_file",
    "recorded_sha256",
    "read_cached_json",
    "cache_dir",
    "http_get",
    "fetch_pypi_file",
]

log = logging.getLogger(__name__)

# temporary files being written by this process: removed on SIGTERM (see jobs.py)
ACTIVE_TEMP: set[str] = set()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yields a file object for a unique temporary file beside ``path``; renames it to ``path``
    when the block ends without an error, removes it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    ACTIVE_TEMP.add(tmp)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        ACTIVE_TEMP.discard(tmp)
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_active_temp() -> None:
    """Removes this process's half-written temporary files (called when it is told to stop)."""
    for tmp in list(ACTIVE_TEMP):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _strict(x: Any) -> Any:
    """``x`` with non-finite floats as None and tuples as lists (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy and torch scalars
        return _strict(x.item())
    return x


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Writes strict JSON atomically (NaN and infinities as null)."""
    path = Path(path)
    text = json.dumps(_strict(data), indent=2, allow_nan=False) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def _no_constant(name: str) -> NoReturn:
    raise UsageError(f"{name} is not strict JSON")


def read_json(path: str | os.PathLike) -> Any:
    """Parses a JSON file; raises :class:`CorruptFile` naming it when it is empty, truncated or
    not strict JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise UsageError("empty file")
        return json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFile(path, str(e).splitlines()[0][:120]) from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Writes tensors as safetensors atomically, with the sha256 of the data section in the
    header (``smar_sha256``) so that :func:`load_tensors` can check every byte."""
    from safetensors.torch import save

    blob = save(tensors, metadata={**(metadata or {}), "format": "pt"})
    n = int.from_bytes(blob[:8], "little")
    digest = hashlib.sha256(blob[8 + n :]).hexdigest()
    # rewrite with the digest of the data section in the header (the data do not move)
    blob = save(tensors, metadata={**(metadata or {}), "format": "pt", "smar_sha256": digest})
    with atomic_write(path) as f:
        f.write(blob)
    return Path(path)


def load_tensors(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file after checking its header, its size and (when
    recorded) the sha256 of its data; raises :class:`CorruptFile` naming the file otherwise."""
    from safetensors.torch import load

    path = Path(path)
    blob = path.read_bytes()
    if len(blob) < 8:
        raise CorruptFile(path, f"{len(blob)} bytes, too short for a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    try:
        if 8 + n > len(blob):
            raise UsageError(f"header of {n} bytes in a file of {len(blob)}")
        header = json.loads(blob[8 : 8 + n])
        meta = header.pop("__metadata__", None) or {}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end != len(blob):
            raise UsageError(f"data end at {8 + n + end} but the file has {len(blob)} bytes")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CorruptFile(path, f"bad safetensors header: {e}") from e
    if verify and "smar_sha256" in meta:
        if hashlib.sha256(blob[8 + n :]).hexdigest() != meta["smar_sha256"]:
            raise CorruptFile(path, "its data do not match the sha256 recorded when it was written")
    try:
        return load(blob), meta
    except Exception as e:  # safetensors raises its own error types
        raise CorruptFile(path, f"unreadable safetensors: {e}") from e


_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: re-entrant within a process


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed) between processes, re-entrant within
    one; says so in the log when another command holds it."""
    key = str(Path(path).resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    Path(key).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another smar command building %s", what or key)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD[key] = [fd, 1]
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the lock


def set_aside(path: str | os.PathLike, why: str = "") -> Path:
    """Renames a corrupt file to ``<name>.corrupt-<time>`` beside it and logs both names."""
    path = Path(path)
    stem = f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest, n = path.with_name(stem), 1
    while dest.exists():  # a second one in the same second: never over the first
        dest, n = path.with_name(f"{stem}-{n}"), n + 1
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, dest)
        log.warning("warning: %s is corrupt (%s); moved to %s and rebuilding", path, why, dest.name)
    return dest


def cache_dir() -> Path:
    """The user's cache folder for smar: ``$SMAR_CACHE``, ``$XDG_CACHE_HOME/smar`` or
    ``~/.cache/smar``."""
    if os.environ.get("SMAR_CACHE"):
        return Path(os.environ["SMAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smar"


def http_get(url: str, accept: str | None = None) -> bytes:
    """The body of ``url`` (the package index: the only network these downloads use)."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def fetch_pypi_file(
    index_url: str,
    filename: str,
    sha256: str,
    *,
    error: type[Exception],
    fix: str,
    download: Callable[..., bytes] = http_get,
) -> bytes:
    """The bytes of one file of a PyPI project, found through its JSON simple index
    (``index_url``) and checked by sha256 before anything opens it; ``error(problem, fix)``
    when it cannot be downloaded or is not that file. Nothing of the package runs."""
    try:
        index = json.loads(download(index_url, "application/vnd.pypi.simple.v1+json"))
        url = next(f["url"] for f in index["files"] if f["filename"] == filename)
        blob = download(url)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise error(f"could not download {filename} ({e})", fix) from e
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise error(f"the downloaded {filename} has sha256 {digest}, expected {sha256}", fix)
    return blob


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The data sha256 that :func:`save_tensors` recorded in a safetensors header (header only)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        except ValueError as e:
            raise CorruptFile(path, f"bad safetensors header: {e}") from e
    return meta.get("smar_sha256")


def read_cached_json(path: str | os.PathLike) -> Any:
    """A cache file's JSON, or None when it is missing or corrupt (then set aside, to rebuild)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_json(path)
    except CorruptFile as e:
        set_aside(path, e.why)
        return None
