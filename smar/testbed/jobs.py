"""The stage-3 job system: which runs a config asks for, one worker process per run (one thread
each), and reuse of finished runs keyed on what a run depends on (interrupted sweeps resume).

Ctrl-C or SIGTERM in the main process (or a failed run) stops every worker at once; finished
runs stay and :class:`~smar.errors.Interrupted` says how to resume. Workers ignore
Ctrl-C (the main process decides), remove their temporary files on SIGTERM, and exit by
themselves when their parent dies. A run holds a lock on its folder while it runs, so two
commands writing one output folder do each run once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from smar.errors import CorruptFile, Interrupted
from smar.testbed.arms import make_arm
from smar.testbed.config import RunConfig, config_from_dict
from smar.testbed.data.bundle import data_hashes, load_bundle
from smar.testbed.evaluate import eval_sets, evaluate_model, routing_summary
from smar.testbed.io import (
    file_lock,
    load_tensors,
    read_cached_json,
    recorded_sha256,
    remove_active_temp,
    set_aside,
    write_json,
)
from smar.testbed.loop import progress
from smar.testbed.model import TinyModel
from smar.testbed.overrides import to_dict
from smar.testbed.tune import Job, tune

_NOT_IN_RUN = (
    "arms",
    "controls",
    "control_seeds",
    "shuffled_control",
    "stop_control",
    "seeds",
    "text_ratios",
    "bands",
    "lrs",
    "workers",
    "out",
)


def _reusable(out: Path, resolved: dict) -> dict | None:
    """The results of a finished run made from ``resolved``, after checking its files (a corrupt
    one is set aside and the run made again)."""
    if not (out / "results.json").exists():
        return None
    run_cfg = read_cached_json(out / "run_config.json")
    results = read_cached_json(out / "results.json")
    if run_cfg != json_roundtrip(resolved) or results is None:
        return None
    try:
        load_tensors(out / "model.safetensors")
    except (CorruptFile, FileNotFoundError) as e:
        set_aside(out / "model.safetensors", getattr(e, "why", "missing"))
        return None
    return results


def run_job(cfg_dict: dict, job_dict: dict, base_dir: str) -> dict:
    """Worker entry point: tune one job from the cached stage-2 model, evaluate, save (on one
    thread; run here in the main process, its thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_job(cfg_dict, job_dict, base_dir)
    finally:
        torch.set_num_threads(threads)  # the stage cache keys hold the main process's count


def _run_job(cfg_dict: dict, job_dict: dict, base_dir: str) -> dict:
    cfg = config_from_dict(cfg_dict)
    job = Job(**job_dict)
    out = Path(cfg.out) / job.name
    # what the run depends on: not which other runs share its folder, nor where it is; but the
    # content of its data and of the model it starts from
    run = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_RUN}
    run["data"]["text_files"] = data_hashes(cfg.data)
    run["base_sha256"] = recorded_sha256(Path(base_dir) / "model.safetensors")
    resolved = {"run": run, "job": _job_record(job)}
    # config.json beside model.safetensors is the model's (TinyModel.save); the run's own
    # resolved config goes to run_config.json
    with file_lock(out.parent / f".{job.name}.lock", f"run {job.name}"):
        results = _reusable(out, resolved)
        if results is not None:
            return results
        return _run(cfg, job, base_dir, out, resolved)


# Job fields added after runs were first recorded, with their defaults: left out of a run's
# record while at the default, so that the runs recorded before them are still reused
_ADDED_JOB_FIELDS = {"shuffle_images": False, "stop_image_gradients": False}


def _job_record(job: Job) -> dict:
    return {
        k: v
        for k, v in dataclasses.asdict(job).items()
        if not (k in _ADDED_JOB_FIELDS and v == _ADDED_JOB_FIELDS[k])
    }


def _run(cfg: RunConfig, job: Job, base_dir: str, out: Path, resolved: dict) -> dict:
    t0 = time.time()
    bundle = load_bundle(cfg)
    base = TinyModel.load(base_dir)
    model, arm, history = tune(cfg, job, bundle, base)
    train_s = time.time() - t0
    scores, extra = evaluate_model(model, cfg, bundle, eval_sets(cfg, bundle), arm.modality)
    routing = routing_summary(model, cfg, bundle, arm.modality)
    results = {
        "name": job.name,
        "arm": job.arm,
        "seed": job.seed,
        "scores": scores,
        **extra,
        "routing": routing,
        "history": history,
        "train_s": train_s,
        "total_s": time.time() - t0,
    }
    model.save(out)
    write_json(out / "run_config.json", resolved)
    write_json(out / "results.json", results)  # last: the run is complete when it exists
    return results


def json_roundtrip(x: Any) -> Any:

    return json.loads(json.dumps(x))


def jobs_for(cfg: RunConfig, sweep: bool = False) -> list[Job]:
    """The stage-3 runs: arms x seeds (x text ratios x bands x learning rates for a sweep),
    plus the calibration controls."""
    jobs = []
    # None: the config's own value (not part of the run's name)
    ratios: Sequence[float | None] = cfg.text_ratios or [None]
    bands: Sequence[tuple[float, float] | None] = cfg.bands or [None]
    lrs: Sequence[float | None] = cfg.lrs or [None]
    for arm in cfg.arms:
        make_arm(arm)  # fail early on an unknown name
        # an arm whose loss has no band (none, lb, hard, ...) runs once, not once per band; the
        # report pairs its runs with every band's
        arm_bands: Sequence[tuple[float, float] | None] = bands if _uses_band(arm) else [None]
        for seed in cfg.seeds:
            for r in ratios:
                for b in arm_bands:
                    for lr in lrs:
                        parts = [arm]
                        if r is not None:
                            parts.append(f"text{r:g}")
                        if b is not None:
                            parts.append(f"band{b[0]:g}-{b[1]:g}")
                        if lr is not None:
                            parts.append(f"lr{lr:g}")
                        parts.append(f"seed{seed}")
                        jobs.append(Job("_".join(parts), arm, seed, r, b, lr))
    if cfg.controls:
        # the no-image and image-gradient-stop controls pair with `none` on every seed (the
        # shares of the forgetting); the two text-ratio controls check the calibration and run
        # on the first `control_seeds` seeds
        for k, seed in enumerate(cfg.seeds):
            jobs.append(Job(f"control_noimage_seed{seed}", "none", seed, drop_images=True))
            if cfg.stop_control:
                jobs.append(
                    Job(f"control_stop_seed{seed}", "none", seed, stop_image_gradients=True)
                )
            if cfg.shuffled_control:
                jobs.append(Job(f"control_shuffled_seed{seed}", "none", seed, shuffle_images=True))
            if k < cfg.control_seeds:
                jobs += [
                    Job(f"control_text_seed{seed}", "none", seed, text_ratio=1.0),
                    Job(f"control_none50_seed{seed}", "none", seed, text_ratio=0.5),
                ]
    return jobs


def _uses_band(arm: str) -> bool:
    """Whether the tolerance band changes what the arm trains."""
    one, other = make_arm(arm, band=(0.0, 1.0)), make_arm(arm, band=(2.0, 3.0))
    return one.smar_weight > 0 and one.band != other.band


def _worker_init() -> None:
    """In each worker: Ctrl-C is the main process's to handle; SIGTERM removes half-written
    files and exits; a watchdog exits when the parent dies (its children would run on)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stop(signum: int | None = None, frame: FrameType | None = None) -> NoReturn:
        remove_active_temp()
        os._exit(143)

    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        stop()

    threading.Thread(target=watchdog, name="smar-parent-watchdog", daemon=True).start()


def _stop_workers(pool: ProcessPoolExecutor, grace: float = 3.0) -> None:
    """Cancels queued runs and stops every worker now (SIGTERM, then SIGKILL after ``grace``)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def run_jobs(cfg: RunConfig, jobs: list[Job], base_dir: Path, *, quiet: bool = False) -> dict:
    """Runs (or reuses) every job from the cached stage-2 model in ``base_dir``: in ``cfg.workers``
    spawned processes when there is more than one job, else here. Returns results by job name.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the finished runs are kept.
    """
    results = {}
    cfg_dict = to_dict(cfg)
    bar = progress(total=len(jobs), desc=f"stage 3: {len(jobs)} runs", disable=quiet)
    try:
        if cfg.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            pool = ProcessPoolExecutor(
                min(cfg.workers, len(jobs)),
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
            )
            try:
                futs = {
                    pool.submit(run_job, cfg_dict, dataclasses.asdict(j), str(base_dir)): j
                    for j in jobs
                }
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        results[futs[f].name] = f.result()  # a failed run stops them all
                        bar.update(1)
            except BaseException:
                _stop_workers(pool)
                raise
            pool.shutdown(wait=True)
        else:
            for j in jobs:
                results[j.name] = run_job(cfg_dict, dataclasses.asdict(j), str(base_dir))
                bar.update(1)
    except KeyboardInterrupt as e:
        raise Interrupted(
            f"{str(e) or 'Ctrl-C'} during stage 3: {len(results)} of {len(jobs)} runs finished "
            f"(kept in {cfg.out}), the others stopped"
        ) from e
    finally:
        bar.close()
    return results


def recorded_config(*folders: str | Path) -> RunConfig:
    """The run config recorded with the first run folder among ``folders``: the pipeline's
    ``config.json`` beside the run folder, else the run's ``run_config.json``. Stage folders
    record none, so at least one folder must be a run folder."""
    for f in map(Path, folders):
        if not (f / "run_config.json").exists():
            continue
        try:
            top = json.loads((f.parent / "config.json").read_text())
            if {"data", "model", "tune"} <= set(top):
                return config_from_dict(top)
        except (OSError, ValueError):
            pass
        run = dict(json.loads((f / "run_config.json").read_text())["run"])
        run.pop("base_sha256", None)
        if run["data"].get("text_files"):  # recorded by content: the paths are gone
            raise ValueError(
                f"{f} was made from local text files that its run_config.json records by hash "
                "only; fix: keep the pipeline's config.json beside the run folder"
            )
        return config_from_dict(run)
    names = ", ".join(str(f) for f in folders)
    raise ValueError(
        f"no testbed run config found in {names} (a stage folder records none); fix: pass a run "
        "folder made by `smar demo` (it holds run_config.json) as one of the two models"
    )
