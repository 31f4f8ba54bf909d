"""Megatron-Core on CPU for the tests (never in the library): the shims, the process groups and
tiny models shared by tests/test_megatron.py and the script torchrun starts
(tests/helpers/dist_megatron.py).

megatron-core 0.16.1 runs its router, an ``MoELayer`` (allgather dispatcher, ``SequentialMLP``,
local non-TransformerEngine specs) and a small ``GPTModel`` on CPU with gloo once two things are
patched, and only here:

1. ``moe_utils.te_general_gemm``: 0.16.1 without TransformerEngine never defines it (a NameError
   in the router's gating linear, fixed in 0.19): set it to None.
2. ``torch.cuda.current_device``: ``Router.gating`` moves its weight to it (still in 0.19.2) and
   ``tensor_parallel/mappings.py`` allocates the sequence-parallel gathers on it: it returns the
   CPU device while the shims are on.
3. The CUDA RNG tracker's ``fork`` (attention's dropout region, even at dropout 0): a no-op, for
   the GPT model only.
4. Activation recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA RNG
   states: only the CPU one here.
"""

from __future__ import annotations

import contextlib
import os

import torch

SEQ, BATCH, HIDDEN, EXPERTS, TOPK = 8, 2, 16, 4, 2


@contextlib.contextmanager
def cpu_shims():
    """Megatron-Core's router, MoE layer and GPT model on CPU while the block runs."""
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    had_gemm = hasattr(moe_utils, "te_general_gemm")
    old_gemm = getattr(moe_utils, "te_general_gemm", None)
    old_device = torch.cuda.current_device
    moe_utils.te_general_gemm = None
    torch.cuda.current_device = lambda: torch.device("cpu")
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()  # an instance attribute
    rng = tp_random._get_all_rng_states, tp_random._set_all_rng_states
    tp_random._get_all_rng_states = lambda: (torch.get_rng_state(), None, None)
    tp_random._set_all_rng_states = lambda cpu, cuda, tracked: torch.set_rng_state(cpu)
    try:
        yield
    finally:
        tp_random._get_all_rng_states, tp_random._set_all_rng_states = rng
        del tracker.fork
        torch.cuda.current_device = old_device
        if had_gemm:
            moe_utils.te_general_gemm = old_gemm
        else:
            del moe_utils.te_general_gemm


def init_dist(init_file: str) -> None:
    """gloo: torchrun's processes (from its environment), else one process."""
    import torch.distributed as dist

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)


def init_parallel(tp: int = 1, ep: int = 1, cp: int = 1) -> None:
    """Megatron's parallel state over the processes of ``init_dist``."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, context_parallel_size=cp
    )


def destroy() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def transformer_config(tp: int = 1, ep: int = 1, cp: int = 1, **overrides):
    """A tiny MoE ``TransformerConfig`` that runs on CPU (float32, local specs)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=16,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.01,
        moe_router_load_balancing_type="aux_loss", tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1, expert_model_parallel_size=ep, context_parallel_size=cp,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=False, add_bias_linear=False, gradient_accumulation_fusion=False,
    )  # fmt: skip
    kw.update(overrides)
    return TransformerConfig(**kw)


def batch(seed: int = 0, seq: int = SEQ, bsz: int = BATCH):
    """Hidden states ``(S, B, H)`` and modality ids ``(B, S)`` of one micro-batch: images in a
    span of each sample but the last, one padding-like ignored token."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq, bsz, HIDDEN, generator=g, dtype=torch.float32)
    ids = torch.zeros(bsz, seq, dtype=torch.long)
    for b in range(bsz - 1):
        ids[b, 1 + b : seq // 2 + 1 + b] = 1
    ids[-1, -1] = -1
    return hidden, ids


def logged() -> dict[str, torch.Tensor]:
    """Megatron's aux-loss tracker: per-layer values by name (0.17+'s metrics tracker or the
    0.16 dict)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    return {k: v.values.clone() for k, v in get_moe_metrics_tracker().metrics.items()}


def clear_logged() -> None:
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
    else:
        get_moe_metrics_tracker().clear()


def train_gpt(smar_config, steps: int = 30, seed: int = 0) -> list[dict]:
    """A 2-layer Megatron-Core GPT with MoE layers (SMARRouter in each) trained ``steps`` steps
    with Adam on a toy multimodal language: text tokens 0..31 count up from a random start,
    "image" tokens 32..63 (random) fill a span of half the samples. Returns per step the loss
    and the logged band loss and MRD of each layer."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from smar.megatron import modality_ids, use_smar_router

    V, S, B = 64, 16, 8
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS)
    use_smar_router(spec, smar_config)
    torch.manual_seed(seed)
    model = GPTModel(config=transformer_config(), transformer_layer_spec=spec, vocab_size=V,
                     max_sequence_length=S, position_embedding_type="rope")  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]  # True: masked
    positions = torch.arange(S)[None].expand(B, S)
    image = torch.zeros(B, S, dtype=torch.long)
    image[: B // 2, 2:10] = 1
    history = []
    clear_logged()
    for _ in range(steps):
        text = (torch.randint(0, 32, (B, 1), generator=g) + torch.arange(S)) % 32
        tokens = torch.where(image.bool(), torch.randint(32, V, (B, S), generator=g), text)
        with modality_ids(image):
            loss = model(tokens, positions, causal, labels=torch.roll(tokens, -1, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs = logged()
        history.append({"loss": loss.item(), "band": logs.get("smar_band_loss"),
                        "mrd": logs["smar_mrd"]})  # fmt: skip
        clear_logged()
    return history
