"""``smar real run --workers``: stage 3 of two runs (``none`` and ``smar``, one seed, a few steps,
small evaluation) side by side in two worker processes against one after the other in this
process at every core's threads, from the same cached stages 0-1.

    python benchmarks/bench_real_workers.py [--steps 6] [--out /tmp/bench-workers]

Each side writes its own output folder (finished runs would be reused: pass a fresh ``--out``).
Side by side runs first, so that the one-process side does not profit from warm caches. Prints
figures, asserts nothing; one pair: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from smar.testbed.real.base import MODEL_ID, load_base
from smar.testbed.real.run import RealConfig, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", default="bench-workers")
    a = p.parse_args()
    base = load_base()
    cfg = RealConfig(arms=("none", "smar"), seeds=(a.seed,), steps=a.steps, eval_chat=4,
                     eval_code=2, eval_prose=2, eval_knowledge=8, eval_images=2)  # fmt: skip
    print(f"torch threads in this process: {torch.get_num_threads()}")
    seconds = {}
    for workers in (2, 1):
        t = time.perf_counter()
        res = run(cfg, f"{a.out}/workers{workers}", base=base, model_id=MODEL_ID,
                  progress=False, workers=workers)  # fmt: skip
        seconds[workers] = res["timing"]["stage3"]
        print(f"workers={workers}: stage 3 {seconds[workers]:.0f} s "
              f"(invocation {time.perf_counter() - t:.0f} s)")  # fmt: skip
    print(f"one process / side by side: {seconds[1] / seconds[2]:.2f}")


if __name__ == "__main__":
    main()
