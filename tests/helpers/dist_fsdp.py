"""SMAR's regularizer in a plain training loop under FSDP2 (``fully_shard``) on CPU over gloo:
the script tests/test_engines.py runs with torchrun (the Trainer's FSDP path needs GPUs:
accelerate falls back to DDP on CPU).

Writes ``--out/fsdp.pt`` (rank 0): the loss of each step and every router's update.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import router_weights, samples, tiny_moe  # noqa: E402

STEPS = 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--per-device", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    import smar

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = tiny_moe().train()
    reg = smar.attach(model, smar.SMARConfig())
    before = router_weights(model)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.stack([s["input_ids"] for s in samples(STEPS * a.per_device * world)])
    losses = []
    for step in range(STEPS):
        batch = data[step * a.per_device * world : (step + 1) * a.per_device * world]
        local = batch[rank * a.per_device : (rank + 1) * a.per_device]
        out = model(input_ids=local, labels=local)
        routing = reg.loss()
        (out.loss + routing).backward()  # FSDP averages the gradients over ranks
        opt.step()
        opt.zero_grad()
        lm = out.loss.detach()
        if world > 1:
            dist.all_reduce(lm)
            lm /= world
        losses.append([float(lm), float(routing.detach())])
    reg.check()
    after = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        after[name.replace(".router.", ".")] = full.detach().clone()
    if rank == 0:
        update = {n: after[n] - before[n] for n in before}
        torch.save({"losses": losses, "update": update}, os.path.join(a.out, "fsdp.pt"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
