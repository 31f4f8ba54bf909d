"""What the stages share: the tokenizer, the tokenised pretraining stream and the held-out prose,
built once per data config and the content of its text files, and cached (checked on load)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from smar.errors import CorruptFile
from smar.testbed.config import STAGE_VERSION, DataConfig, RunConfig
from smar.testbed.data import corpus, images, questions, skills
from smar.testbed.data.tokenizer import Tokenizer
from smar.testbed.io import (
    cache_dir,
    file_lock,
    load_tensors,
    save_tensors,
    set_aside,
    sha256_file,
)
from smar.testbed.overrides import config_hash, to_dict


@dataclass
class Bundle:
    """Data shared by the stages: tokenizer, token streams, held-out prose."""

    tok: Tokenizer
    train_ids: torch.Tensor
    held_out: str


_HASHES: dict[tuple, str] = {}  # (path, mtime_ns, size) -> sha256: each file hashed once


def data_hashes(data: DataConfig) -> list[str]:
    """The sha256 of each of ``data.text_files``: cache keys follow the content, not the name."""
    out = []
    for f in data.text_files:
        st = os.stat(f)
        key = (str(Path(f).resolve()), st.st_mtime_ns, st.st_size)
        if key not in _HASHES:
            _HASHES[key] = sha256_file(f)
        out.append(_HASHES[key])
    return out


def data_key(data: DataConfig) -> dict:
    """The data config as a cache key: text files by content."""
    d = to_dict(data)
    d["text_files"] = data_hashes(data)
    return d


def _cached(root: Path) -> tuple[Tokenizer, torch.Tensor] | None:
    """The cached tokenizer and token stream, or None (a corrupt file is set aside)."""
    ids_path, tok_path = root / "train_ids.safetensors", root / "tokenizer.json"
    if not ids_path.exists():
        return None
    try:
        tensors, meta = load_tensors(ids_path)
        if not tok_path.exists() or sha256_file(tok_path) != meta.get("tokenizer_sha256"):
            raise CorruptFile(
                tok_path, "missing, or not the tokenizer its token ids were made with"
            )
        return Tokenizer.load(tok_path), tensors["ids"]
    except CorruptFile as e:
        set_aside(e.path, e.why)
        set_aside(ids_path, f"goes with {Path(e.path).name}")
        return None


def load_bundle(cfg: RunConfig) -> Bundle:
    """Corpus, skill text, descriptions of images in words, and the tokenizer (cached by the
    data config and the content of the text files)."""
    key = config_hash(STAGE_VERSION, data_key(cfg.data), cfg.model.image_size)
    root = cache_dir() / "data" / key
    train_text, held_out = corpus.load_corpus(cfg.data.text_files or None)
    got = _cached(root)
    if got is None:
        with file_lock(root.with_name(root.name + ".lock"), f"the tokenizer in {root}"):
            got = _cached(root) or _build(cfg, root, train_text)
    return Bundle(got[0], got[1], held_out)


def _build(cfg: RunConfig, root: Path, train_text: str) -> tuple[Tokenizer, torch.Tensor]:
    skill_lines = skills.skill_text(cfg.data.skill_examples, cfg.data.seed)
    rng = random.Random(0)
    captions = [
        images.caption(im, rng) for im in images.vision_samples(400, 0, cfg.data.image_size)
    ]
    qa = [s.text for t in questions.QA_TYPES for s in questions.qa_samples(t, 100, 0, "train", 8)]
    tok = Tokenizer.train(
        [train_text, skill_lines, "\n".join(captions + qa)],
        cfg.data.vocab_size,
        root / "tokenizer.json",
    )
    described = questions.description_text(cfg.data.descriptions, cfg.data.seed)
    tokens = tok.encode(train_text) + tok.encode("\n" + skill_lines)
    if cfg.data.descriptions:
        tokens += tok.encode("\n" + described)
    ids = torch.tensor(tokens, dtype=torch.long)
    # no pickles: the token ids are safetensors, tied to the tokenizer by its sha256
    meta = {"tokenizer_sha256": sha256_file(root / "tokenizer.json")}
    save_tensors(root / "train_ids.safetensors", {"ids": ids}, meta)
    return tok, ids
