"""The testbed's byte-level BPE tokenizer (``tokenizers``) and its special tokens.

The special tokens live here so that every user of them (the tokenizer, batching, evaluation)
imports them from one place without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import tokenizers

PAD, IMAGE, BOS, EOS = "<pad>", "<image>", "<bos>", "<eos>"
SPECIALS = (PAD, IMAGE, BOS, EOS)


class Tokenizer:
    """A byte-level BPE tokenizer with the testbed's special tokens."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        self.pad_id, self.image_id, self.bos_id, self.eos_id = (
            cast(int, tok.token_to_id(s)) for s in SPECIALS  # trained with them: never None
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
            return cls.load(path)
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
            from smar.testbed.io import atomic_write

            with atomic_write(path, "w") as f:
                f.write(tok.to_str())
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """A tokenizer saved by :meth:`train`; a file that does not parse raises
        :class:`~smar.errors.CorruptFile` naming it."""
        from tokenizers import Tokenizer as HFTokenizer

        from smar.errors import CorruptFile
        from smar.testbed.io import read_json

        read_json(path)  # strict JSON first: names the file when it is truncated or empty
        try:
            tok = cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises its own exception type
            raise CorruptFile(path, f"not a tokenizer: {str(e)[:100]}") from e
        if None in (tok.pad_id, tok.image_id, tok.bos_id, tok.eos_id):
            raise CorruptFile(path, "the special tokens are missing")
        return tok
