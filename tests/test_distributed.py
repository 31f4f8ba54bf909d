"""Data-parallel SMAR: two gloo processes give the loss and router gradients of one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import smar

WORLD = 2


def batch(L=3, T=24, E=6):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(L, WORLD * T, E, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, 2, (WORLD * T,), generator=g)
    ids[T + 1 :] = torch.where(ids[T + 1 :] == 1, 0, ids[T + 1 :])  # rank 1 holds 1 image token
    return z, ids


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z, ids = batch()
        T = z.shape[1] // WORLD
        local = z[:, rank * T : (rank + 1) * T].clone().requires_grad_(True)
        local_ids = ids[rank * T : (rank + 1) * T]
        loss = smar.smar_loss(local, local_ids, band=(2.0, 3.0), group=dist.group.WORLD)
        loss.backward()
        D = smar.mrd(local, local_ids, group=dist.group.WORLD)
        P, counts = smar.modality_distributions(local, local_ids, group=dist.group.WORLD)
        torch.save(
            {"loss": loss.detach(), "grad": local.grad, "D": D, "P": P, "counts": counts},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    z, ids = batch()
    T = z.shape[1] // WORLD
    zz = z.clone().requires_grad_(True)
    loss = smar.smar_loss(zz, ids, band=(2.0, 3.0))
    loss.backward()
    D = smar.mrd(z, ids)
    P, counts = smar.modality_distributions(z, ids)
    assert loss.item() > 0, "the band must be active for the gradient comparison to mean anything"
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r["loss"], loss.detach())
        torch.testing.assert_close(r["D"], D)
        torch.testing.assert_close(r["P"], P)
        torch.testing.assert_close(r["counts"], counts)
        # each rank's gradient is WORLD x its share, so that averaging over ranks (DDP) gives the
        # single-process gradient of the global batch
        want = zz.grad[:, rank * T : (rank + 1) * T]
        torch.testing.assert_close(r["grad"] / WORLD, want)
