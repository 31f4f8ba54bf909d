"""What ``smar real run`` owns: its ``--out`` folder, the lock on it, and which finished runs in
it may be reused.

A folder is ``smar real``'s when it holds the marker :data:`MARKER` (written when the command
creates the folder or finds it empty), or when it is an output of a version that wrote no marker
(its ``config.json`` is a ``RealConfig``). Any other non-empty folder is refused in one line and
nothing in it is touched: a run deletes unfinished run folders and rewrites ``config.json`` and
``report.md``, which must never happen to a user's files. One run at a time holds the folder
(:func:`hold`). A finished run is reused only when its ``scores.json`` is whole (its schema, its
arm and seed) and was made with the same settings, and its model file still has the sha256
recorded when the run finished; a corrupt run is set aside (``<name>.corrupt-<time>-<pid>``) and
trained again, a run of other settings is refused unless ``--force`` sets it aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path

from smar.atomic import output_problem
from smar.testbed.errors import UsageError
from smar.testbed.io import read_cached_json, read_json, set_aside, sha256_file, write_json

__all__ = ["MARKER", "check_out", "claim", "hold", "run_settings", "reusable", "MODEL_FILE"]

log = logging.getLogger(__name__)

MARKER = ".smar-real"
LOCK = ".smar-real.lock"
MODEL_FILE = "model.safetensors"
# what a run's result depends on besides its arm and seed: every RealConfig field but these
NOT_A_SETTING = ("arms", "seeds")
SCORES_KEYS = ("language", "multimodal", "arm", "seed", "knowledge_asked")


def check_out(out) -> Path:
    """``--out`` as a folder smar can write, or a one-line error."""
    if out is None or not str(out).strip():
        raise UsageError("--out is empty", "give the output folder, e.g. --out smar-real")
    problem = output_problem(out)
    if problem:
        raise UsageError(f"--out {out}: {problem}", "pass a folder smar can write")
    return Path(out)


def _legacy(out: Path) -> bool:
    """An output of a version without the marker: its config.json is a RealConfig."""
    from smar.testbed.real.run import RealConfig

    try:
        cfg = read_json(out / "config.json")
    except Exception:
        return False
    fields = {f.name for f in dataclasses.fields(RealConfig)}
    return isinstance(cfg, dict) and set(cfg) == fields and (out / "runs").is_dir()


def claim(out) -> Path:
    """Makes ``out`` this command's (creating it with the marker), or refuses a folder it did not
    make; nothing in a refused folder is read or written."""
    out = check_out(out)
    if (out / MARKER).is_file():
        return out
    if out.exists() and any(out.iterdir()) and not _legacy(out):
        raise UsageError(
            f"--out {out} holds files that smar real did not write (no {MARKER} marker); a run "
            "rewrites config.json, report.md and runs/",
            "give a new or empty folder as --out",
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"made_by": "smar real run", "time": time.strftime("%Y-%m-%d %H:%M")})
    return out


@contextlib.contextmanager
def hold(out: Path):
    """The folder for this process alone while it runs; a second command is refused at once."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another smar real run is writing --out {out}",
                "wait for it to finish, or give another --out",
            ) from None
        yield
    finally:
        os.close(fd)


def run_settings(cfg) -> dict:
    """What a run's result depends on besides its arm and seed, as plain data."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {k: v for k, v in data.items() if k not in NOT_A_SETTING}


def _settings_of(scores: dict, folder_config: dict | None) -> dict | None:
    if "settings" in scores:
        return scores["settings"]
    if folder_config is None:  # a run of a version that recorded none: the folder's config
        return None
    return {k: v for k, v in folder_config.items() if k not in NOT_A_SETTING}


def reusable(folder: Path, arm: str, seed: int, settings: dict, *, force: bool,
             folder_config: dict | None) -> dict | None:  # fmt: skip
    """The scores of a finished run in ``folder`` when they may be reused, else None (the run is
    to be trained: a missing, unfinished or corrupt one set aside; one of other settings set
    aside with ``force``, refused without)."""
    scores = read_cached_json(folder / "scores.json")  # corrupt JSON: set aside, None
    if scores is None:
        return None
    whole = isinstance(scores, dict) and all(k in scores for k in SCORES_KEYS)
    if not whole or scores["arm"] != arm or scores["seed"] != seed:
        set_aside(folder, "its scores.json is not a finished run's")
        return None
    model = folder / MODEL_FILE
    recorded = scores.get("model_sha256")
    if recorded is not None and (not model.is_file() or sha256_file(model) != recorded):
        set_aside(folder, f"its {MODEL_FILE} is not the one the run wrote")
        return None
    theirs = _settings_of(scores, folder_config)
    if theirs is not None and theirs != settings:
        changed = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        if not force:
            raise UsageError(
                f"--out {folder.parent.parent} holds {folder.name} trained with other settings "
                f"({', '.join(changed)} differ)",
                "give a new --out, or add --force to set those runs aside and train them again",
            )
        dest = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(folder, dest)
        log.warning("--force: %s (other %s) set aside as %s", folder.name, ", ".join(changed),
                    dest.name)  # fmt: skip
        return None
    return scores
