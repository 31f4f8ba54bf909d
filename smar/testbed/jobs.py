"""The stage-3 job system: which runs a config asks for, one worker process per run (one thread
each), and reuse of finished runs keyed on what a run depends on (interrupted sweeps resume).
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from smar.testbed.arms import make_arm
from smar.testbed.config import RunConfig, config_from_dict
from smar.testbed.data.bundle import load_bundle
from smar.testbed.evaluate import eval_sets, evaluate_model, routing_summary
from smar.testbed.io import read_json, write_json
from smar.testbed.model import TinyModel
from smar.testbed.overrides import to_dict
from smar.testbed.stages import progress
from smar.testbed.tune import Job, tune

_NOT_IN_RUN = (
    "arms",
    "controls",
    "control_seeds",
    "seeds",
    "text_ratios",
    "bands",
    "lrs",
    "workers",
    "out",
)


def run_job(cfg_dict: dict, job_dict: dict, base_dir: str) -> dict:
    """Worker entry point: tune one job from the cached stage-2 model, evaluate, save."""
    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    job = Job(**job_dict)
    out = Path(cfg.out) / job.name
    # what the run depends on: not which other runs share its folder, nor where it is
    run = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_RUN}
    resolved = {"run": run, "job": dataclasses.asdict(job)}
    # config.json beside model.safetensors is the model's (TinyModel.save); the run's own
    # resolved config goes to run_config.json
    if (out / "results.json").exists() and (out / "run_config.json").exists():
        if read_json(out / "run_config.json") == json_roundtrip(resolved):
            return read_json(out / "results.json")
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
    write_json(out / "results.json", results)
    return results


def json_roundtrip(x):

    return json.loads(json.dumps(x))


def jobs_for(cfg: RunConfig, sweep: bool = False) -> list[Job]:
    """The stage-3 runs: arms x seeds (x text ratios x bands x learning rates for a sweep),
    plus the calibration controls."""
    jobs = []
    ratios = cfg.text_ratios or [None]
    bands = cfg.bands or [None]
    lrs = cfg.lrs or [None]
    for arm in cfg.arms:
        make_arm(arm)  # fail early on an unknown name
        for seed in cfg.seeds:
            for r in ratios:
                for b in bands:
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
        # the no-image control pairs with `none` on every seed (the image-driven share); the two
        # text-ratio controls check the calibration and run on the first `control_seeds` seeds
        for k, seed in enumerate(cfg.seeds):
            jobs.append(Job(f"control_noimage_seed{seed}", "none", seed, drop_images=True))
            if k < cfg.control_seeds:
                jobs += [
                    Job(f"control_text_seed{seed}", "none", seed, text_ratio=1.0),
                    Job(f"control_none50_seed{seed}", "none", seed, text_ratio=0.5),
                ]
    return jobs


def run_jobs(cfg: RunConfig, jobs: list[Job], base_dir: Path, *, quiet: bool = False) -> dict:
    """Runs (or reuses) every job from the cached stage-2 model in ``base_dir``: in ``cfg.workers``
    spawned processes when there is more than one job, else here. Returns results by job name."""
    results = {}
    cfg_dict = to_dict(cfg)
    bar = progress(total=len(jobs), desc=f"stage 3: {len(jobs)} runs", disable=quiet)
    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {
                pool.submit(run_job, cfg_dict, dataclasses.asdict(j), str(base_dir)): j
                for j in jobs
            }
            for f in as_completed(futs):
                results[futs[f].name] = f.result()
                bar.update(1)
    else:
        for j in jobs:
            results[j.name] = run_job(cfg_dict, dataclasses.asdict(j), str(base_dir))
            bar.update(1)
    bar.close()
    return results
