"""MoE-LLaVA style upcycling: a dense SwiGLU FFN (the testbed's, or a Hugging Face Llama, Qwen,
Mistral or Phi-3 decoder's MLP) turned into a :class:`smar.moe.MoEBlock` whose experts all copy
it, so that the block computes the dense FFN's output until training moves the experts apart.

Shape legend: D model width, F expert hidden width, E experts.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smar.errors import UsageError, WrongType
from smar.moe import MoEBlock

__all__ = ["upcycle", "check_options"]


def check_options(num_experts: int, top_k: int, noise: float) -> None:
    """The options of an upcycling (:func:`upcycle`, :func:`smar.hf.upcycle_hf`), one line each,
    before any layer changes."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise WrongType(f"{name}={value!r} must be an integer >= 1", f"e.g. {name}=2")
        if value < 1:
            raise UsageError(f"{name}={value!r} must be an integer >= 1", f"e.g. {name}=2")
    if top_k > num_experts:
        raise UsageError(
            f"top_k={top_k} must be <= num_experts={num_experts}: each token picks top_k of "
            "the experts",
            f"top_k={num_experts} or num_experts>={top_k}",
        )
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise WrongType(f"noise={noise!r} must be a finite number >= 0", "e.g. noise=0.0")
    if not 0 <= noise < math.inf:
        raise UsageError(f"noise={noise!r} must be a finite number >= 0", "e.g. noise=0.0")


def _dense_weights(dense_mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (F, D), up (F, D), down (D, F)) of a SwiGLU MLP, tiny or Hugging Face style."""
    names = ("gate_proj", "up_proj", "down_proj")
    if all(hasattr(dense_mlp, n) for n in names):
        for n in names:
            if getattr(getattr(dense_mlp, n), "bias", None) is not None:
                raise UsageError(
                    f"{type(dense_mlp).__name__}.{n} has a bias; upcycle supports bias-free SwiGLU "
                    "MLPs (Llama, Qwen, Mistral, Phi-3 style)"
                )
        gate, up, down = (getattr(dense_mlp, n).weight for n in names)
        return gate, up, down
    if hasattr(dense_mlp, "gate_up_proj") and hasattr(dense_mlp, "down_proj"):
        fused: Any = dense_mlp  # Phi-3's MLP
        gate, up = fused.gate_up_proj.weight.chunk(2, dim=0)  # fused (2F, D)
        return gate, up, fused.down_proj.weight
    raise UsageError(
        f"cannot upcycle {type(dense_mlp).__name__}: expected a SwiGLU MLP with gate_proj, up_proj "
        "and down_proj linear layers (or a fused gate_up_proj)"
    )


def _check_silu(dense_mlp: nn.Module) -> None:
    act = getattr(dense_mlp, "act_fn", None)
    if act is None:
        return
    probe = torch.linspace(-3, 3, 13, device="cpu")  # explicit: works under a meta context
    if not torch.allclose(act(probe), F.silu(probe), atol=1e-6):
        raise UsageError(
            f"{type(dense_mlp).__name__}.act_fn is not SiLU; the MoE experts are SwiGLU and would "
            "not reproduce this MLP"
        )


@torch.no_grad()
def upcycle(
    dense_mlp: nn.Module,
    *,
    num_experts: int,
    top_k: int,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    **router_kwargs: Any,
) -> MoEBlock:
    """Turns a dense SwiGLU FFN into a :class:`MoEBlock` whose experts all copy it (MoE-LLaVA).

    The router is new (random); because every expert is the same function and the gates sum to 1,
    the block's output equals the dense FFN's on any input when ``noise == 0``. ``noise > 0`` adds
    Gaussian noise of that relative scale to each expert copy, to break the symmetry between them.

    Args:
        dense_mlp: an MLP with ``gate_proj``, ``up_proj``, ``down_proj`` (:class:`SwiGLU`, or the
            MLP of a Hugging Face Llama/Qwen/Mistral decoder) or Phi-3's fused ``gate_up_proj``.
        num_experts: ``E``.
        top_k: ``K``.
        noise: relative standard deviation of the noise added to each copy.
        generator: random generator for the router and the noise.
        router_kwargs: passed to :class:`smar.moe.Router`.
    """
    check_options(num_experts, top_k, noise)
    _check_silu(dense_mlp)
    gate, up, down = _dense_weights(dense_mlp)  # (F, D), (F, D), (D, F)
    hidden, dim = gate.shape
    block = MoEBlock(dim, hidden, num_experts, top_k, **router_kwargs)
    block.to(device=gate.device, dtype=gate.dtype)
    block.router.weight.copy_(
        torch.randn(block.router.weight.shape, generator=generator) * dim**-0.5
    )
    gate_up = torch.cat([gate, up], dim=0)  # (2F, D)
    block.gate_up_proj.copy_(gate_up.expand(num_experts, -1, -1))
    block.down_proj.copy_(down.expand(num_experts, -1, -1))
    if noise > 0:
        for p in (block.gate_up_proj, block.down_proj):
            eps = torch.randn(p.shape, generator=generator).to(p)
            p.add_(eps * noise * p.std())
    return block
