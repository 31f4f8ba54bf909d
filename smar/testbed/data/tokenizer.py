"""The testbed's byte-level BPE tokenizer (``tokenizers``) and its special tokens.

The special tokens live here so that every user of them (the tokenizer, batching, evaluation)
imports them from one place without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PAD, IMAGE, BOS, EOS = "<pad>", "<image>", "<bos>", "<eos>"
SPECIALS = (PAD, IMAGE, BOS, EOS)


class Tokenizer:
    """A byte-level BPE tokenizer with the testbed's special tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.pad_id, self.image_id, self.bos_id, self.eos_id = (
            tok.token_to_id(s) for s in SPECIALS
        )
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, path: Path | None = None) -> Tokenizer:
        """Trains (or loads from ``path`` when it exists) a BPE of ``vocab_size`` tokens."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if path is not None and path.exists():
            return cls(HFTokenizer.from_file(str(path)))
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
        return cls(tok)
