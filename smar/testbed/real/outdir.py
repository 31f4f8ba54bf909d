"""What ``smar real run`` owns: its ``--out`` folder, the lock on it, and which finished runs in
it may be reused.

A folder is ``smar real``'s when it holds the marker :data:`MARKER` (written when the command
creates the folder or finds it empty), or when it is an output of a version that wrote no marker
(its ``config.json`` is a ``RealConfig``). Any other non-empty folder is refused in one line and
nothing in it is touched: a run rewrites ``config.json`` and ``report.md`` and replaces unfinished
run folders, which must never happen to a user's files. One run at a time holds the folder
(:func:`hold`). A finished run is reused only when its ``scores.json`` is whole
(:data:`smar.testbed.real.schema.RUN_SCORES`, its arm and seed) and was made with the same
settings, and its model file still has the sha256 recorded when the run finished; a corrupt run is
set aside (``<name>.corrupt-<time>-<pid>``) and trained again, a run of other settings is refused
unless ``--force`` sets it aside (``<name>.old-<time>-<pid>``). An unfinished run is removed only
when it holds nothing but what a run writes (:func:`clear_unfinished`), else it is set aside too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from smar.atomic import output_problem
from smar.testbed.errors import CorruptFile, UsageError
from smar.testbed.io import read_json, set_aside, sha256_file, write_json
from smar.testbed.real.schema import RUN_SCORES, problem, safetensors_problem

if TYPE_CHECKING:
    from smar.testbed.real.run import RealConfig

__all__ = ["MARKER", "MODEL_FILE", "check_out", "claim", "hold", "run_settings", "reusable",
           "clear_unfinished", "record_legacy_settings"]  # fmt: skip

log = logging.getLogger(__name__)

MARKER = ".smar-real"
LOCK = ".smar-real.lock"
MODEL_FILE = "model.safetensors"
# what a run's result depends on besides its arm and seed: every RealConfig field but these
NOT_A_SETTING = ("arms", "seeds")
# what the command writes into --out: folders and files (one of the other kind stops a run)
FOLDERS, FILES = ("runs", "analyze"), ("config.json", "results.json", "report.md", MARKER)
# what a run writes into its folder (transformers' save_model and save_pretrained, the bias,
# scores.json, temporary files, checkpoints): an unfinished run holding only these is removed
RUN_FILES = frozenset({
    MODEL_FILE, "model.safetensors.index.json", "scores.json", "config.json",
    "generation_config.json", "processor_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "training_args.bin",
    "smar_bias.safetensors",
})  # fmt: skip


def check_out(out: str | Path | None) -> Path:
    """``--out`` as a folder smar can write, or a one-line error."""
    if out is None or not str(out).strip():
        raise UsageError("--out is empty", "give the output folder, e.g. --out smar-real")
    problem_ = output_problem(out)
    if problem_:
        raise UsageError(f"--out {out}: {problem_}", "pass a folder smar can write")
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


def claim(out: str | Path | None) -> Path:
    """Makes ``out`` this command's (creating it with the marker), or refuses a folder it did not
    make; nothing in a refused folder is read or written."""
    out = check_out(out)
    if not (out / MARKER).is_file():
        if out.exists() and any(out.iterdir()) and not _legacy(out):
            raise UsageError(
                f"--out {out} holds files that smar real did not write (no {MARKER} marker); a "
                "run rewrites config.json, report.md and runs/",
                "give a new or empty folder as --out",
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MARKER, {"made_by": "smar real run",
                                  "time": time.strftime("%Y-%m-%d %H:%M")})  # fmt: skip
    for names, kind, ok in ((FOLDERS, "a file", Path.is_dir), (FILES, "a folder", Path.is_file)):
        bad = [n for n in names if (out / n).exists() and not ok(out / n)]
        if bad:
            raise UsageError(f"--out {out}: {bad[0]} there is {kind}, where smar real writes "
                             f"its {'folder' if kind == 'a file' else 'file'}",
                             f"move {out / bad[0]} away, or give another --out")  # fmt: skip
    return out


@contextlib.contextmanager
def hold(out: Path) -> Iterator[None]:
    """The folder for this process alone while it runs; a second command is refused at once
    (where :func:`smar.testbed.io.file_lock` would wait: the second would then find every run
    finished, but only after loading the model)."""
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


def run_settings(cfg: RealConfig) -> dict:
    """What a run's result depends on besides its arm and seed, as plain data."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {k: v for k, v in data.items() if k not in NOT_A_SETTING}


def _settings_of(scores: dict, folder_config: dict | None) -> dict | None:
    if "settings" in scores:
        return scores["settings"]
    if not isinstance(folder_config, dict):  # a run of a version that recorded none
        return None
    return {k: v for k, v in folder_config.items() if k not in NOT_A_SETTING}


def _stamp() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def reusable(folder: Path, arm: str, seed: int, settings: dict, *, force: bool,
             folder_config: dict | None) -> dict | None:  # fmt: skip
    """The scores of a finished run in ``folder`` when they may be reused, else None (the run is
    to be trained: a missing, unfinished or corrupt one set aside; one of other settings set
    aside with ``force``, refused without)."""
    if not (folder / "scores.json").is_file():
        return None  # not finished
    try:
        scores = read_json(folder / "scores.json")
        why = problem(scores, RUN_SCORES)
    except CorruptFile as e:
        why = f"its scores.json: {e.why}"
    if why is None and (scores["arm"], scores["seed"]) != (arm, seed):
        why = f"it is the run of {scores['arm']} seed {scores['seed']}"
    if why is None:
        recorded, model = scores.get("model_sha256"), folder / MODEL_FILE
        if recorded is None:  # a version that recorded no checksum: the header and the size
            why = safetensors_problem(model)
            why = why and f"its {MODEL_FILE}: {why}"
        elif not model.is_file() or sha256_file(model) != recorded:
            why = f"its {MODEL_FILE} is not the one the run wrote (sha256)"
    if why:
        set_aside(folder, why)  # the whole run folder, trained again
        return None
    theirs = _settings_of(scores, folder_config)
    if theirs is not None and theirs != settings:
        changed = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        if not force:
            more = f" and {len(changed) - 4} more" if changed[4:] else ""
            named = ", ".join(changed[:4]) + more
            raise UsageError(
                f"--out {folder.parent.parent} holds {folder.name} trained with other settings "
                f"({named} differ)",
                "give a new --out, or add --force to set those runs aside and train them again",
            )
        dest = folder.with_name(f"{folder.name}.old-{_stamp()}")
        os.replace(folder, dest)
        log.warning("--force: %s (other %s) set aside as %s", folder.name, ", ".join(changed),
                    dest.name)  # fmt: skip
        return None
    return scores


def _a_run_wrote(path: Path) -> bool:
    name = path.name
    if path.is_dir():
        return name.startswith("checkpoint-")
    return (name in RUN_FILES or (name.startswith("model-") and name.endswith(".safetensors"))
            or (name.startswith(".") and name.endswith(".tmp")))  # fmt: skip


def clear_unfinished(folder: Path) -> None:
    """Makes room for a run to be trained in ``folder``: an unfinished run's folder is removed
    when it holds only what a run writes, else set aside (``<name>.unfinished-<time>-<pid>``)
    with a warning: files smar did not write are never deleted."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink():
        others = sorted(p.name for p in folder.iterdir() if not _a_run_wrote(p))
        if not others:
            shutil.rmtree(folder)  # an interrupted run starts again
            return
    else:
        others = [folder.name]
    dest = folder.with_name(f"{folder.name}.unfinished-{_stamp()}")
    os.replace(folder, dest)
    log.warning("warning: %s holds files a run does not write (%s); moved to %s, the run is "
                "trained again", folder, ", ".join(others[:3]), dest.name)  # fmt: skip


def record_legacy_settings(out: Path, folder_config: dict | None) -> None:
    """Writes the folder's settings into the ``scores.json`` of finished runs of a version that
    recorded none, before ``config.json`` is rewritten (they are judged by it)."""
    if not isinstance(folder_config, dict) or not (out / "runs").is_dir():
        return
    settings = _settings_of({}, folder_config)
    for path in sorted((out / "runs").glob("*/scores.json")):
        with contextlib.suppress(Exception):  # a broken one is judged when it is asked for
            scores = read_json(path)
            if isinstance(scores, dict) and "settings" not in scores:
                write_json(path, {**scores, "settings": settings})
