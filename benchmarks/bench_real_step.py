"""The real model's training step: SmolLM2-135M-Instruct upcycled (4 experts, top-2, alternate
layers), FLOP/s of one step against this machine's matrix peak measured in the same run, and
SMAR's overhead on that step (attached vs not).

    python benchmarks/bench_real_step.py [--batch 4] [--seq 128] [--reps 5] [--precision auto]

The step: forward, language-model loss (+ SMAR's loss when attached, half the positions marked
image), backward, AdamW on the MoE layers' parameters (what stage 3 trains). FLOPs are counted
once by ``torch.utils.flop_counter``; the peak is the best of one (4096 x 576) x (576 x 1536)
product (SmolLM2's FFN shape) in the step's dtype. Times are medians of interleaved repetitions
(benchmarks/timing.py): the machine is shared and noisy. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from timing import median_seconds
from torch.utils.flop_counter import FlopCounterMode

import smar
import smar.hf
from smar.testbed.real.base import load_base
from smar.testbed.real.precision import matmul_gflops, resolve_precision


def make_step(model, ids, labels, image, precision: str, reg=None):
    params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if reg is not None:
        params += reg.bias_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        cast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())  # fmt: skip
        if reg is not None:
            reg.set_modality(image)
        with cast:
            loss = model(input_ids=ids, labels=labels).loss
            if reg is not None:
                loss = loss + reg.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = ap.parse_args()
    precision, why = resolve_precision(args.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, _ = load_base()
    smar.hf.upcycle_hf(model, num_experts=4, top_k=2, layers="alternate")
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    image = torch.zeros_like(ids)
    image[:, : args.seq // 2] = 1  # (B, S) half the positions are image tokens
    # Two copies made the same way (a loaded model's weights lie in memory unlike a copy's,
    # which alone changed the step's time by ~10%), SMAR attached to one of them.
    twin = copy.deepcopy(model)
    model = copy.deepcopy(model)
    plain = make_step(model, ids, ids, image, precision)
    with FlopCounterMode(display=False) as counted:
        plain()
    flops = counted.get_total_flops()
    peak = matmul_gflops(dtype, m=4096)
    reg = smar.attach(twin, smar.SMARConfig())
    with_smar = make_step(twin, ids, ids, image, precision, reg)
    times = median_seconds({"plain": plain, "smar": with_smar}, args.reps)
    tokens = args.batch * args.seq
    print(f"precision {precision} ({why}); {tokens} tokens a step; {flops / 1e9:.1f} GFLOP a step")
    print(f"matrix peak ({dtype}, 4096x576x1536 product): {peak:.0f} GFLOP/s")
    for name, t in times.items():
        print(f"{name:6s} step {t:.3f} s  {tokens / t:.0f} tokens/s  {flops / t / 1e9:.0f} GFLOP/s "
              f"= {flops / t / 1e9 / peak:.0%} of the peak")  # fmt: skip
    print(f"SMAR's overhead on the step: {times['smar'] / times['plain'] - 1:+.1%}")


if __name__ == "__main__":
    main()
