"""The ``smar`` command: thin commands over the library."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("smar")

COMMANDS = ("demo", "inspect", "sweep")


def _routing_demo(args: argparse.Namespace) -> int:
    """Trains a 2-layer router on synthetic text and image tokens with SMAR + load balancing.

    Text and image tokens come from two Gaussian clusters; the routers start near uniform (MRD
    close to 0) and the band loss moves each layer's MRD into the band, while load balancing
    keeps the experts used.
    """
    import torch

    from smar.losses import load_balancing_loss, mrd, smar_loss

    torch.manual_seed(args.seed)
    L, D, E, K, T = 2, 32, 8, 2, 1024
    routers = torch.nn.ModuleList(torch.nn.Linear(D, E, bias=False) for _ in range(L))
    for r in routers:
        torch.nn.init.normal_(r.weight, std=1e-3)
    opt = torch.optim.Adam(routers.parameters(), lr=args.lr)
    centres = torch.randn(2, D)
    for step in range(args.steps + 1):
        ids = (torch.rand(T) < 0.75).long()  # (T,) 3 image tokens per text token
        x = centres[ids] + torch.randn(T, D)  # (T, D)
        logits = [r(x) for r in routers]  # L x (T, E)
        band = smar_loss(logits, ids, band=tuple(args.band))
        lb = load_balancing_loss(logits, top_k=K)
        if step % max(1, args.steps // 5) == 0:
            d = mrd(logits, ids).tolist()
            print(
                f"step {step:4d}  band loss {band.item():.4f}  LB {lb.item():.3f}  "
                f"MRD per layer {[round(v, 3) for v in d]}"
            )
        opt.zero_grad()
        (band + 0.1 * lb).backward()
        opt.step()
    d = mrd(logits, ids)
    inside = bool(((d >= args.band[0] - 0.1) & (d <= args.band[1] + 0.1)).all())
    print(
        f"final MRD {[round(v, 3) for v in d.tolist()]}, band {tuple(args.band)}: "
        f"{'inside' if inside else 'outside'}"
    )
    return 0 if inside else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the project's main example")
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--lr", type=float, default=0.003)
    demo.add_argument("--band", type=float, nargs=2, default=(1.5, 2.0))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_routing_demo)

    insp = sub.add_parser("inspect", help="list the MoE routers smar finds in a saved HF model")
    insp.add_argument("model_dir", help="a directory written by save_pretrained")
    insp.set_defaults(func=_inspect)

    sweep = sub.add_parser("sweep", help="arms x seeds x text ratios x bands x learning rates")
    sweep.set_defaults(func=_sweep)
    return p


def _inspect(args: argparse.Namespace) -> int:
    from smar.hf import inspect_model_dir

    print(inspect_model_dir(args.model_dir))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from smar.train import sweep_main

    return sweep_main(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
