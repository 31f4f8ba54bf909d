"""Forward+backward throughput of ``smar.moe.MoEBlock`` against transformers'
``Qwen3MoeSparseMoeBlock`` with the same dims and weights, in both of its CPU experts
implementations: ``grouped_mm`` (the default of a model built by ``from_config`` or
``from_pretrained``) and ``eager`` (a loop over experts; what the block gets on its own).

All blocks get identical router and expert weights (so they route the same tokens to the same
experts), repetitions are interleaved so that all see the same machine load, and the median
tokens/s and the ratios ours/HF are printed (target: ratio >= 1.5), beside the time of the
expert matrix products alone (the floor no implementation of the same products can go below).

    python benchmarks/bench_moe.py [--tokens 4096] [--reps 15] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import transformers
from timing import median_seconds
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from smar.moe import MoEBlock

HF_IMPLEMENTATIONS = ("grouped_mm", "eager")  # the first: a model's default


def hf_block(ours: MoEBlock, implementation: str) -> Qwen3MoeSparseMoeBlock:
    """transformers' block with ``ours``'s dims and weights, in one experts implementation."""
    E, F2, D = ours.gate_up_proj.shape
    cfg = Qwen3MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F2 // 2,
        num_experts=E,
        num_experts_per_tok=ours.top_k,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    cfg._experts_implementation = implementation  # what a model sets on its blocks' config
    hf = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.gate_up_proj)
        hf.experts.down_proj.copy_(ours.down_proj)
    return hf


def matmul_floor(block: MoEBlock, x: torch.Tensor):
    """The expert matrix products of one forward+backward alone, at the sizes this routing gives
    each expert (gate/up and down forward; input and weight gradients of both): no routing, no
    activation, no gather or scatter. No implementation in float32 runs below this time."""
    T, D = x.reshape(-1, x.shape[-1]).shape
    with torch.no_grad():
        _, experts, _ = block.route(x.reshape(T, D))
    counts = torch.bincount(experts.reshape(-1), minlength=block.num_experts).tolist()
    F2 = block.gate_up_proj.shape[1]  # 2F
    w1 = [block.gate_up_proj[e].detach() for e in range(block.num_experts)]  # (2F, D)
    w2 = [block.down_proj[e].detach() for e in range(block.num_experts)]  # (D, F)
    xs = [torch.randn(n, D) for n in counts]
    hs = [torch.randn(n, F2 // 2) for n in counts]
    gs = [torch.randn(n, F2) for n in counts]

    def run():
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x_e, h_e, g_e, gy = xs[e], hs[e], gs[e], xs[e]
            x_e @ w1[e].t()  # forward gate/up (n, 2F)
            h_e @ w2[e].t()  # forward down (n, D)
            gy @ w2[e]  # grad of the down input (n, F)
            gy.t() @ h_e  # grad of the down weight (D, F)
            g_e @ w1[e]  # grad of the gate/up input (n, D)
            g_e.t() @ x_e  # grad of the gate/up weight (2F, D)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    D, F, E, K, T = args.dim, args.ffn, args.experts, args.top_k, args.tokens
    torch.manual_seed(0)
    ours = MoEBlock(D, F, E, K)
    hf = {impl: hf_block(ours, impl) for impl in HF_IMPLEMENTATIONS}
    x = torch.randn(1, T, D)
    with torch.no_grad():  # same function, so the comparison is like for like
        diff = max((ours(x) - block(x)).abs().max().item() for block in hf.values())

    def step(block):
        def run():
            xi = x.clone().requires_grad_(True)
            block(xi).square().mean().backward()
            block.zero_grad(set_to_none=True)

        return run

    fns = {"ours": step(ours), **{f"hf {k}": step(v) for k, v in hf.items()}}
    fns["floor"] = matmul_floor(ours, x)
    med = median_seconds(fns, args.reps)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {args.reps} reps; D={D} FFN={F} E={E} K={K} T={T}; "
        f"max |ours - HF| = {diff:.2e}"
    )
    for name in fns:
        print(f"{name:>14}: {med[name] * 1e3:8.1f} ms  {T / med[name]:10.0f} tokens/s")
    for impl in HF_IMPLEMENTATIONS:
        default = " (a model's default)" if impl == HF_IMPLEMENTATIONS[0] else ""
        print(
            f"ratio ours/HF {impl}{default}: {med[f'hf {impl}'] / med['ours']:.2f}x "
            f"(target >= 1.5); floor/HF {impl}: {med[f'hf {impl}'] / med['floor']:.2f}x"
        )
    print(
        "floor: the expert matrix products alone, at this routing's sizes; no float32 "
        f"implementation of them runs below it (ours/floor: {med['floor'] / med['ours']:.2f}x)"
    )


if __name__ == "__main__":
    main()
