"""SMARRouter in a Megatron-Core MoE layer on CPU (gloo), started by tests/test_megatron.py.

One process (``python tests/helpers/dist_megatron.py --out DIR``) routes the whole micro-batch: the
reference. Two (``torchrun --nproc_per_node 2 tests/helpers/dist_megatron.py --out DIR``) run each
parallelism in turn on the same micro-batch, split as Megatron splits it: ``dp`` (the batch),
``tp`` (the sequence, tensor parallel with sequence parallelism), ``ep`` (experts; the batch
over the dense data-parallel ranks) and ``cp`` (the sequence in 2 x CP load-balanced chunks);
each with SMAR's global statistics and, as ``<mode>-local``, with local ones.

Each run writes, per rank, the band loss and MRD as Megatron's aux-loss tracker logs them and the
router's weight and bias gradients after the reduction Megatron applies to them (summed over TP
for sequence-parallel parameters, averaged over data+context parallel, the aux loss scaled by the
context-parallel size as the pipeline schedule scales it). Only the band loss reaches the
router: Megatron's load balancing is off here (its per-rank loss is not one process's).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import megatron_cpu as mc  # noqa: E402

S, B = 8, 4  # the whole micro-batch
BAND = (2.0, 3.0)  # above the MRD of the data: the loss is active
MODES = {"dp": {}, "tp": {"tp": 2}, "ep": {"ep": 2}, "cp": {"cp": 2}}


def whole_batch():
    """Hidden states ``(S, B, H)`` and modality ids ``(B, S)``; rank-uneven image counts."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, B, mc.HIDDEN, generator=g)
    ids = torch.zeros(B, S, dtype=torch.long)
    ids[0, 1:6] = 1
    ids[1, 2:4] = 1
    ids[2, 6:] = 1
    ids[3, 0] = -1
    return hidden, ids


def this_rank(mode: str, hidden, ids):
    """This rank's part of the micro-batch, as Megatron's data path and layers give it."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    if mode in ("dp", "ep"):
        n, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        part = slice(r * B // n, (r + 1) * B // n)
        return hidden[:, part].contiguous(), ids[part]
    if mode == "tp":  # the embedding's sequence-parallel scatter; ids stay whole
        n, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        return hidden.chunk(n, dim=0)[r], ids
    if mode == "cp":
        got = get_batch_on_this_cp_rank({"hidden": hidden.transpose(0, 1), "ids": ids})
        return got["hidden"].transpose(0, 1).contiguous(), got["ids"]
    return hidden, ids  # one process


def moe_layer(config, smar_config):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from smar.megatron import use_smar_router

    spec = get_moe_module_spec(use_te=False, num_experts=mc.EXPERTS, moe_grouped_gemm=False)
    use_smar_router(spec, smar_config)
    layer = build_module(spec, config=config)
    layer.set_layer_number(1)
    g = torch.Generator().manual_seed(1)  # the same router on every rank and in the reference
    layer.router.weight.data.copy_(torch.randn(mc.EXPERTS, mc.HIDDEN, generator=g))
    layer.router.modality_bias.data.copy_(0.3 * torch.randn(2, mc.EXPERTS, generator=g))
    return layer


def reduce_grads(router) -> dict[str, torch.Tensor]:
    """The router's gradients as finalize_model_grads and DDP reduce them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = {}
    for name in ("weight", "modality_bias"):
        p = getattr(router, name)
        g = p.grad.clone()
        if getattr(p, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(dp_cp) > 1:
            dist.all_reduce(g, group=dp_cp)
            g /= dist.get_world_size(dp_cp)
        out[name] = g
    return out


def run(mode: str, stats: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    from smar.megatron import TRACK_NAMES, SMARRouterConfig, modality_ids

    sizes = MODES.get(mode, {})
    mc.init_parallel(**sizes)
    try:
        config = mc.transformer_config(**sizes, moe_aux_loss_coeff=0.0)
        layer = moe_layer(config, SMARRouterConfig(smar_weight=1.0, band=BAND, stats=stats))
        hidden, ids = this_rank(mode, *whole_batch())
        # the pipeline schedule's aux-loss scale: loss_scale * cp / num_microbatches
        MoEAuxLossAutoScaler.set_loss_scale(
            torch.tensor(float(ps.get_context_parallel_world_size()))
        )
        with modality_ids(ids):
            out, _ = layer(hidden)
        (0.0 * out.sum()).backward()  # the band loss alone reaches the router
        reduce_aux_losses_tracker_across_ranks(track_names=list(TRACK_NAMES))
        logged = {
            k: v["values"][0].clone() for k, v in get_moe_layer_wise_logging_tracker().items()
        }
        clear_aux_losses_tracker()
        return {"band": logged["smar_band_loss"], "mrd": logged["smar_mrd"],
                **reduce_grads(layer.router)}  # fmt: skip
    finally:
        ps.destroy_model_parallel()


def main() -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    torch.set_num_threads(1)
    with mc.cpu_shims():
        mc.init_dist(os.path.join(args.out, "init"))
        rank, world = dist.get_rank(), dist.get_world_size()
        results = {}
        if world == 1:
            results["one"] = run("one", "global")
        else:
            for mode in args.modes.split(","):
                results[mode] = run(mode, "global")
                results[f"{mode}-local"] = run(mode, "local")
        torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
        mc.destroy()


if __name__ == "__main__":
    main()
