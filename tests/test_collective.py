"""smar.collective, data-parallel SMAR: two gloo processes give the loss and router gradients of
one process."""

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


# ----------------------------------------------------------------------------------------------
# the load-balancing loss and the routing objective with group=


def objective_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z, ids = batch()
        T = z.shape[1] // WORLD
        local = z[:, rank * T : (rank + 1) * T].clone().requires_grad_(True)
        local_ids = ids[rank * T : (rank + 1) * T]
        out = {}
        for variant in ("switch", "hf"):
            lb = smar.load_balancing_loss(
                local, top_k=2, mask=local_ids >= 0, variant=variant, group=dist.group.WORLD
            )
            (g,) = torch.autograd.grad(lb, local)
            out[variant] = (lb.detach(), g)
        total, terms = smar.routing_objective(
            local, local_ids, top_k=2, smar_weight=1.0, band=(2.0, 3.0), lb_weight=0.5,
            group=dist.group.WORLD,
        )  # fmt: skip
        (g,) = torch.autograd.grad(total, local)
        out["objective"] = (total.detach(), g, {k: v.detach() for k, v in terms.items()})
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_load_balancing_and_objective_over_the_global_batch(tmp_path):
    mp.spawn(objective_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    z, ids = batch()
    T = z.shape[1] // WORLD
    zz = z.clone().requires_grad_(True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for variant in ("switch", "hf"):
        lb = smar.load_balancing_loss(zz, top_k=2, mask=ids >= 0, variant=variant)
        (g,) = torch.autograd.grad(lb, zz)
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r[variant][0], lb.detach())
            torch.testing.assert_close(r[variant][1] / WORLD, g[:, rank * T : (rank + 1) * T])
    total, terms = smar.routing_objective(
        zz, ids, top_k=2, smar_weight=1.0, band=(2.0, 3.0), lb_weight=0.5
    )
    (g,) = torch.autograd.grad(total, zz)
    assert terms["band"] > 0
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["objective"][0], total.detach())
        torch.testing.assert_close(r["objective"][1] / WORLD, g[:, rank * T : (rank + 1) * T])
        for name, value in terms.items():
            torch.testing.assert_close(r["objective"][2][name], value.detach(), equal_nan=True)
    # local statistics differ (so that the comparisons above can fail)
    T0 = slice(0, T)
    local, _ = smar.routing_objective(
        z[:, T0], ids[T0], top_k=2, smar_weight=1.0, band=(2.0, 3.0), lb_weight=0.5
    )
    assert abs(float(local.detach()) - float(total)) > 1e-3


# ----------------------------------------------------------------------------------------------
# more than two modalities: audio on one rank only


def omni_batch(L=3, T=24, E=6):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(L, WORLD * T, E, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, 3, (WORLD * T,), generator=g)  # text, image, video on both ranks
    ids[2:6] = 3  # audio: rank 0 only
    return z, ids


def omni_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z, ids = omni_batch()
        T = z.shape[1] // WORLD
        local = z[:, rank * T : (rank + 1) * T].clone().requires_grad_(True)
        total, terms = smar.routing_objective(
            local, ids[rank * T : (rank + 1) * T], top_k=2, smar_weight=1.0, band=(2.0, 3.0),
            image=(1, 2, 3), pairs="all", pair_bands={(1, 2): (0.0, 0.5)}, lb_weight=0.5,
            group=dist.group.WORLD,
        )  # fmt: skip
        (g,) = torch.autograd.grad(total, local)
        torch.save((total.detach(), g, terms["mrd"]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_omni_pairs_with_audio_on_one_rank_equal_one_process(tmp_path):
    """Presence is decided from the all-reduced counts: rank 1, which holds no audio, still
    holds the audio pairs in their bands, as one process on the global batch does."""
    mp.spawn(omni_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    z, ids = omni_batch()
    T = z.shape[1] // WORLD
    assert not (ids[T:] == 3).any() and (ids[:T] == 3).any()
    zz = z.clone().requires_grad_(True)
    total, terms = smar.routing_objective(
        zz, ids, top_k=2, smar_weight=1.0, band=(2.0, 3.0), image=(1, 2, 3), pairs="all",
        pair_bands={(1, 2): (0.0, 0.5)}, lb_weight=0.5,
    )  # fmt: skip
    (g,) = torch.autograd.grad(total, zz)
    assert terms["mrd"].shape == (3, 6) and torch.isfinite(terms["mrd"]).all()
    for rank in range(WORLD):
        loss, grad, mrd = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(loss, total.detach())
        torch.testing.assert_close(grad / WORLD, g[:, rank * T : (rank + 1) * T])
        torch.testing.assert_close(mrd, terms["mrd"])
    # rank 1 alone would leave the audio pairs out: the comparison above can fail
    alone, _ = smar.routing_objective(
        z[:, T:], ids[T:], top_k=2, smar_weight=1.0, band=(2.0, 3.0), image=(1, 2, 3),
        pairs="all", pair_bands={(1, 2): (0.0, 0.5)}, lb_weight=0.5,
    )  # fmt: skip
    assert abs(float(alone) - float(total)) > 1e-3
