"""What the stages share: the tokenizer, the tokenised pretraining stream and the held-out prose,
built once per data config and cached."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from smar.testbed.config import STAGE_VERSION, RunConfig
from smar.testbed.data import corpus, images, questions, skills
from smar.testbed.data.tokenizer import Tokenizer
from smar.testbed.io import cache_dir
from smar.testbed.overrides import config_hash


@dataclass
class Bundle:
    """Data shared by the stages: tokenizer, token streams, held-out prose."""

    tok: object
    train_ids: torch.Tensor
    held_out: str


def load_bundle(cfg: RunConfig) -> Bundle:
    """Corpus, skill text, descriptions of images in words, and the tokenizer (cached by the
    data config)."""
    key = config_hash(STAGE_VERSION, cfg.data, cfg.model.image_size)
    root = cache_dir() / "data" / key
    train_text, held_out = corpus.load_corpus(cfg.data.text_files or None)
    if (root / "train_ids.pt").exists() and (root / "tokenizer.json").exists():
        tok = Tokenizer.train([], cfg.data.vocab_size, root / "tokenizer.json")
        return Bundle(tok, torch.load(root / "train_ids.pt"), held_out)
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
    ids = tok.encode(train_text) + tok.encode("\n" + skill_lines)
    if cfg.data.descriptions:
        ids += tok.encode("\n" + described)
    ids = torch.tensor(ids, dtype=torch.long)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(ids, root / "train_ids.tmp")
    os.replace(root / "train_ids.tmp", root / "train_ids.pt")
    return Bundle(tok, ids, held_out)
