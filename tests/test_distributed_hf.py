"""SMAR's regularizer on a tiny transformers MoE in two gloo processes: with global statistics
the routing loss and the router gradients (averaged over ranks, as DDP does) equal one process on
the concatenated batch, with and without statistics pooled over gradient accumulation; with
local statistics they differ. The Trainer under torchrun: tests/test_engines.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from dist_common import router_weights, samples, tiny_moe  # noqa: E402

import smar  # noqa: E402

WORLD = 2
MICRO = 2  # micro-batches per optimizer step
PER_RANK = 2  # samples per rank and micro-batch


def micro_batches(rank: int | None) -> list[torch.Tensor]:
    """Input ids of each micro-batch: this rank's share, or (None) every rank's, concatenated."""
    data = torch.stack([s["input_ids"] for s in samples(WORLD * PER_RANK * MICRO)])
    out = []
    for k in range(MICRO):
        step = data[k * WORLD * PER_RANK : (k + 1) * WORLD * PER_RANK]  # (WORLD * PER_RANK, S)
        out.append(step if rank is None else step[rank * PER_RANK : (rank + 1) * PER_RANK])
    return out


def run(config: smar.SMARConfig, rank: int | None) -> dict:
    """One optimizer step's forward and backward passes of the routing loss alone."""
    model = tiny_moe().train()
    reg = smar.attach(model, config)
    losses = []
    for ids in micro_batches(rank):
        model(input_ids=ids)
        loss = reg.loss()
        (loss / MICRO).backward()  # the Trainer's scaling under accumulation
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank is not None:  # what DDP does: the mean of the ranks' gradients
        for g in grads.values():
            dist.all_reduce(g)
            g /= WORLD
    reg.step()
    names = router_weights(model)
    grads = {n.replace(".router.", "."): g for n, g in grads.items()}
    return {"losses": torch.stack(losses), "grads": {n: grads[n] for n in names}}


CONFIGS = {
    "global": smar.SMARConfig(),
    "local": smar.SMARConfig(stats="local"),
    "accumulate": smar.SMARConfig(accumulate=True),
}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {name: run(cfg, rank) for name, cfg in CONFIGS.items()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def assert_same(ranks: dict, one: dict) -> None:
    torch.testing.assert_close(ranks["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    for name, g in one["grads"].items():
        torch.testing.assert_close(ranks["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


def relative_gap(a: dict, b: dict) -> float:
    num = sum(float((a["grads"][n] - g).norm()) for n, g in b["grads"].items())
    return num / sum(float(g.norm()) for g in b["grads"].values())


def test_global_statistics_equal_one_process_on_the_concatenated_batch(two_ranks):
    one = run(CONFIGS["global"], None)
    assert (one["losses"] > 0).all(), "the band must be active for gradients to mean anything"
    for r in two_ranks:
        assert_same(r["global"], one)


def test_local_statistics_differ(two_ranks):
    one = run(CONFIGS["global"], None)
    local = two_ranks[0]["local"]
    assert relative_gap(local, one) > 1e-2
    assert not torch.allclose(local["losses"], one["losses"], rtol=1e-4)


def test_statistics_pooled_over_the_accumulated_step(two_ranks):
    one = run(CONFIGS["accumulate"], None)
    for r in two_ranks:
        assert_same(r["accumulate"], one)
    # the first micro-batch sees only itself; the last one the whole step (its MRD is that of
    # one forward over every micro-batch of the step)
    plain = run(CONFIGS["global"], None)
    torch.testing.assert_close(one["losses"][0], plain["losses"][0])
    model = tiny_moe().train()
    reg = smar.attach(model, smar.SMARConfig())
    model(input_ids=torch.cat(micro_batches(None)))
    torch.testing.assert_close(one["losses"][-1], reg.loss().detach(), rtol=1e-5, atol=1e-6)
    assert relative_gap(one, plain) > 1e-3
