"""Stage 3 of ``smar real run`` in parallel: each ``(arm, seed)`` run in one of ``workers``
spawned processes, the cores shared out among them (``smar real run --workers N``).

For machines whose cores one run cannot keep busy (many cores, or a GPU-less node shared by
several runs); on a 2-core CPU two runs side by side took as long as the two one after the other
at two threads (docs/real.md). Each worker receives the stage-1 model once (its weights, the
language model's config and the tokenizer) and rebuilds it; every run starts from those weights,
as in one process, and gives the same scores and weights at the same thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from smar.testbed.real.run import RealConfig

__all__ = ["run_parallel"]

_STATE: dict = {}


def _init(config: RealConfig, lm_config: PretrainedConfig, tok: PreTrainedTokenizerBase,
          start: dict[str, torch.Tensor], threads: int,
          reference: torch.Tensor | None = None) -> None:  # fmt: skip
    import transformers

    from smar.testbed.real.model import build_run_vlm

    torch.set_num_threads(threads)
    lm = transformers.AutoModelForCausalLM.from_config(lm_config)
    model, proc = build_run_vlm(lm, tok, config.vision, config.layers)
    del lm
    model.load_state_dict(start)
    _STATE.update(model=model, proc=proc, start=start, config=config, reference=reference)


def _job(arm: str, seed: int, folder: str, answers: dict, images: list[dict]) -> dict:
    from smar.testbed.real.run import train_and_score

    s = _STATE
    s["model"].load_state_dict(s["start"])
    return train_and_score(s["model"], s["proc"], s["config"], answers, images, arm, seed,
                           Path(folder), progress=False, reference=s["reference"])  # fmt: skip


def run_parallel(model: torch.nn.Module, lm_config: PretrainedConfig, tok: PreTrainedTokenizerBase,
                 cfg: RealConfig, jobs: list[tuple[str, str, int, Path]], answers: dict,
                 images: list[dict], workers: int, done: Callable[[str, dict], None],
                 progress: bool = True, reference: torch.Tensor | None = None) -> None:  # fmt: skip
    """Runs ``jobs`` (``(name, arm, seed, folder)``) in ``workers`` processes from ``model``'s
    weights (``model`` built by :func:`~smar.testbed.real.model.build_run_vlm` from a language model
    of config ``lm_config`` and tokenizer ``tok``); ``done(name, result)`` is called here as each
    finishes. Ctrl-C or an error stops every worker at once (finished runs are on disk)."""
    import multiprocessing as mp

    from smar.testbed.jobs import _stop_workers
    from smar.testbed.loop import progress as bar

    threads = max(1, torch.get_num_threads() // workers)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_init,
        initargs=(cfg, lm_config, tok, start, threads, reference),
    )  # fmt: skip
    try:
        futures = {pool.submit(_job, arm, seed, str(folder), answers, images): name
                   for name, arm, seed, folder in jobs}  # fmt: skip
        pending = set(futures)
        with bar(total=len(jobs), desc=f"stage 3: {len(jobs)} runs, {workers} at a time",
                 disable=not progress) as shown:  # fmt: skip
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(futures[f], f.result())
                    shown.update(1)
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
