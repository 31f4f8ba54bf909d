"""Stage 3 of ``smar real run`` in parallel: each ``(arm, seed)`` run in one of ``workers``
spawned processes, the cores shared out among them.

On a CPU a 135M-parameter model's training step does not use many cores well (its matrices are
small and the MoE layers' experts are many small products), and torch's OpenMP threads spin while
they wait: two runs of one thread each finish sooner than two runs one after the other on two
threads. Each worker receives the stage-1 model once (its weights, the language model's config
and the processor) and rebuilds it; every run starts from those weights, as in one process.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

__all__ = ["auto_workers", "run_parallel"]

_STATE: dict = {}


def auto_workers(jobs: int, parameters: int) -> int:
    """How many runs fit side by side: at most one per core and as many as the memory available
    holds (a run of the float32 model with AdamW takes about 34 bytes a parameter, measured with
    SmolLM2's LLaVA: 8.6 GiB for 255M parameters), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    need = 34 * parameters + 2**30
    return max(1, min(jobs, cores or 1, _available_bytes() // need))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: the cores decide


def _init(config, lm_config, tok, start, threads: int) -> None:
    import transformers

    from smar.testbed.real.model import CHAT_TEMPLATE, build_vlm

    torch.set_num_threads(threads)
    lm = transformers.AutoModelForCausalLM.from_config(lm_config)
    model, _, proc = build_vlm(lm, tok, vision=config.vision, layers=config.layers,
                               chat_template=CHAT_TEMPLATE)  # fmt: skip
    del lm
    model.load_state_dict(start)
    proc.tokenizer.padding_side = "right"
    _STATE.update(model=model, proc=proc, start=start, config=config)


def _job(arm: str, seed: int, folder: str, answers: dict, images: list[dict]) -> dict:
    from smar.testbed.real.run import train_and_score

    s = _STATE
    s["model"].load_state_dict(s["start"])
    return train_and_score(s["model"], s["proc"], s["config"], answers, images, arm, seed,
                           Path(folder), progress=False)  # fmt: skip


def run_parallel(model, lm_config, tok, cfg, jobs, answers, images, workers: int, done,
                 progress: bool = True) -> None:  # fmt: skip
    """Runs ``jobs`` (``(name, arm, seed, folder)``) in ``workers`` processes from ``model``'s
    weights (``model`` built by :func:`~smar.testbed.real.model.build_vlm` from a language model
    of config ``lm_config`` and tokenizer ``tok``); ``done(name, result)`` is called here as each
    finishes. Ctrl-C or an error stops every worker at once (finished runs are on disk)."""
    import multiprocessing as mp

    from smar.testbed.jobs import _stop_workers
    from smar.testbed.loop import progress as bar

    threads = max(1, torch.get_num_threads() // workers)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_init,
        initargs=(cfg, lm_config, tok, start, threads),
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
