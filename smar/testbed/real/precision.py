"""Training precision for ``smar real``: bf16 autocast where the CPU multiplies bf16 matrices in
hardware, float32 elsewhere.

bf16 pays only with matrix instructions: with AMX or AVX512-BF16 a SmolLM2-sized product runs
5-8x faster in bf16 than in float32; without them torch emulates bf16 and the same product runs
~75x *slower* (measured on an AVX2-only EPYC: 75 GFLOP/s float32, 1 GFLOP/s bf16). ``auto``
therefore reads the CPU's flags and, where they say yes, also times one product of each dtype.

Under autocast every matrix product casts its float32 weight to bf16 again, each call: at a
decode step of the evaluation that copy is ~45% of the time. :func:`bf16_weights` holds the
matrix weights in bf16 for a while (the values autocast would cast them to, so the products are
the same bit for bit) and gives the float32 ones back after.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from smar.testbed.errors import UsageError

__all__ = ["PRECISIONS", "cpu_bf16_flags", "matmul_gflops", "resolve_precision", "autocast",
           "bf16_weights"]

PRECISIONS = ("auto", "bf16", "fp32")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU flags that give bf16 matrix products in hardware (``/proc/cpuinfo``; none where
    it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    return [f for f in BF16_FLAGS if f in flags]


def matmul_gflops(dtype: torch.dtype, m: int = 2048, k: int = 576, n: int = 1536,
                  reps: int = 3) -> float:  # fmt: skip
    """GFLOP/s of one ``(m, k) @ (k, n)`` product in ``dtype`` on this CPU (best of ``reps``)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def resolve_precision(precision: str, *, flags: list[str] | None = None,
                      probe: bool = True) -> tuple[str, str]:  # fmt: skip
    """``(precision, why)``: ``"bf16"`` or ``"fp32"`` for ``auto`` / ``bf16`` / ``fp32``.

    Raises:
        UsageError: ``bf16`` asked for on a CPU without bf16 matrix instructions, or an unknown
            name.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                         "use --precision auto")  # fmt: skip
    if precision == "fp32":
        return "fp32", "asked for"
    flags = cpu_bf16_flags() if flags is None else flags
    if not flags:
        if precision == "bf16":
            raise UsageError(
                "bf16 precision asked for, but this CPU has no bf16 matrix instructions (no "
                "amx_bf16 or avx512_bf16 in /proc/cpuinfo): bf16 products are emulated, far "
                "slower than float32", "use --precision auto (or fp32)"
            )  # fmt: skip
        return "fp32", "the CPU has no bf16 matrix instructions (amx_bf16, avx512_bf16)"
    if precision == "bf16" or not probe:
        return "bf16", f"CPU flags {', '.join(flags)}"
    f32, b16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    if b16 > f32:
        return "bf16", f"CPU flags {', '.join(flags)}; bf16 {b16:.0f} vs float32 {f32:.0f} GFLOP/s"
    return "fp32", f"bf16 measured slower ({b16:.0f} vs float32 {f32:.0f} GFLOP/s)"


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU for ``"bf16"``, nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _matrices(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s own parameters that only matrix products read (autocast casts
    them to bf16 at each call)."""
    from smar.moe import MoEBlock, Router

    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return ("weight", "bias")
    if isinstance(module, MoEBlock):
        return ("gate_up_proj", "down_proj")
    if isinstance(module, Router):
        return ("weight",)
    return ()


@contextlib.contextmanager
def bf16_weights(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s matrix weights (linear and convolution layers, MoE experts, routers)
    are bf16 copies, for inference under bf16 autocast; the float32 parameters (the same
    objects) are back on exit. Norms, embeddings and biases added outside products stay float32.
    A weight two modules share (a tied head) is cast only where a product reads it."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name in _matrices(module):
                weight = module._parameters.get(name)
                if weight is not None and weight.dtype == torch.float32:
                    swapped.append((module, name, weight))
                    module._parameters[name] = nn.Parameter(weight.detach().to(torch.bfloat16),
                                                            requires_grad=False)  # fmt: skip
        yield
    finally:
        for module, name, weight in reversed(swapped):
            module._parameters[name] = weight
