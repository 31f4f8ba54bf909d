"""Speed of SMAR's losses against transformers' load-balancing loss, on the same logits.

Times forward+backward of ``smar_loss + load_balancing_loss`` against transformers'
``load_balancing_loss_func`` alone, at two shapes, interleaving the repetitions so that all see
the same machine load, and prints the median times and the ratios (target: ours <= 1.0x):

- ``separate``: the two functions called on the raw list of per-layer logits;
- ``prepared``: the same two functions on ``smar.prepare_routing(logits)``, which validates,
  stacks and soft-maxes the logits once for both;
- ``objective``: ``smar.routing_objective`` (band + balancing from one softmax and one set of
  sums, what ``smar.attach`` runs), from the logits alone;
- ``captured``: the same with the experts the routers chose (``RouterCapture.chosen()``: most
  routers return them), so that no second top-k runs.

    python benchmarks/bench_losses.py [--reps 15] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import smar

SHAPES = [  # (L, T, E, K)
    (24, 8192, 64, 8),
    (32, 4096, 8, 2),
]


def candidates(L: int, T: int, E: int, K: int) -> dict:
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(T, E, generator=g).requires_grad_(True) for _ in range(L))
    ids = (torch.rand(T, generator=g) < 0.75).long()  # (T,) 3 image tokens per text token

    def separate():
        band = smar.smar_loss(layers, ids, band=(1.5, 2.0))
        (band + smar.load_balancing_loss(layers, top_k=K)).backward()

    def prepared():
        r = smar.prepare_routing(layers)
        band = smar.smar_loss(r, ids, band=(1.5, 2.0))
        (band + smar.load_balancing_loss(r, top_k=K)).backward()

    # what a top-k router returns beside its logits
    chosen = torch.stack([z.detach().topk(K, dim=-1).indices for z in layers])  # (L, T, K)

    def objective():
        total, _ = smar.routing_objective(layers, ids, top_k=K, smar_weight=1.0, lb_weight=0.01)
        total.backward()

    def captured():
        total, _ = smar.routing_objective(
            layers, ids, top_k=K, smar_weight=1.0, lb_weight=0.01, chosen=chosen
        )
        total.backward()

    def hf():
        load_balancing_loss_func(layers, E, K).backward()

    return {
        "separate": separate,
        "prepared": prepared,
        "objective": objective,
        "captured": captured,
        "hf": hf,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps")
    names = ("separate", "prepared", "objective", "captured")
    print(f"{'L':>3} {'T':>5} {'E':>3} {'K':>2} | " + " ".join(f"{n:>9}" for n in names)
          + f" {'HF':>7} ms | ratios to HF")  # fmt: skip
    for L, T, E, K in SHAPES:
        ms = {k: v * 1e3 for k, v in median_seconds(candidates(L, T, E, K), args.reps).items()}
        hf = ms["hf"]
        print(
            f"{L:>3} {T:>5} {E:>3} {K:>2} | "
            + " ".join(f"{ms[n]:9.1f}" for n in names)
            + f" {hf:7.1f}    | "
            + " ".join(f"{n} {ms[n] / hf:.2f}x" for n in names)
        )


if __name__ == "__main__":
    main()
