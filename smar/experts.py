"""The experts of :class:`smar.moe.MoEBlock` on tokens grouped by expert, forward and backward
written by hand (``GroupedExperts``): the products of a loop of ``F.linear`` calls, without
autograd's copies and zero fills, and with an optional per-assignment mask on the weights'
gradients (:func:`smar.moe.weight_gradient_stop`).

On the CPU, oneDNN compiles a kernel for each new row count of a product, and each expert sees
another row count at every call: inside :func:`bucketed_rows` each expert's rows are padded to
one of a few sizes (:func:`bucket`), so that inference reuses the kernels (an evaluation of
``smar real`` runs 1.3x faster in bf16); the products then differ from the unpadded ones by
rounding.

Shape legend: T tokens, K experts per token, D model width, F expert hidden width, E experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GroupedExperts", "bucket", "bucketed_rows"]

_BUCKETED: ContextVar[bool] = ContextVar("smar_bucketed_rows", default=False)


def bucket(n: int) -> int:
    """The row count ``n`` is padded to inside :func:`bucketed_rows`: a multiple of 16 up to
    128, above that one of 8 sizes per doubling (at most 1/8 more rows)."""
    if n <= 128:
        return -(-n // 16) * 16
    step = 1 << (n.bit_length() - 4)  # 2**k <= n < 2**(k+1): steps of 2**(k-3)
    return -(-n // step) * step


@contextlib.contextmanager
def bucketed_rows() -> Iterator[None]:
    """Inside, each expert's rows are padded to :func:`bucket` sizes (zero rows, dropped after the
    products): fewer distinct product shapes for the CPU's kernel cache. For inference; the
    gradients are those of the unpadded rows."""
    token = _BUCKETED.set(True)
    try:
        yield
    finally:
        _BUCKETED.reset(token)


class GroupedExperts(torch.autograd.Function):
    """The experts of a :class:`MoEBlock` on tokens grouped by expert, forward and backward by hand.

    The gate and up products of an expert are two products, ``(n, F)`` each, so that SiLU and the
    element-wise products run on contiguous memory, and the backward makes none of the copies,
    zero fills and concatenations that autograd makes around the per-expert slices. Every
    product is written into its place (``torch.mm`` / ``torch.addmm`` with ``out=``), in the
    orientation ``F.linear`` uses: the
    forward gives the bits of a loop of ``F.linear`` calls (transformers' eager experts), and does
    not depend on where the weights lie in memory (a loaded checkpoint's views are not aligned
    like freshly allocated weights; the transposed orientation gives other bits there for small
    experts).

    ``keep`` (or None) multiplies the rows of the weights' gradients in the backward only: an
    assignment with ``keep == 0`` gives nothing to ``d_gate_up`` and ``d_down`` and its usual
    share to ``dx`` and ``d_gates``.

    Shapes: ``x (T, D)``, ``gate_up (E, 2F, D)``, ``down (E, D, F)``, ``gates (T*K,)``,
    ``token (T*K,)`` and ``keep (T*K,)`` in expert order, ``counts`` (E ints) -> ``(T, D)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        gate_up: Tensor,
        down: Tensor,
        gates: Tensor,
        token: Tensor,
        counts: list[int],
        keep: Tensor | None = None,
    ) -> Tensor:
        F_ = down.shape[2]
        xs = x.index_select(0, token)  # (T*K, D)
        y = x.new_empty(xs.shape)  # (T*K, D) each assignment's expert output, before its gate
        saved: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] = []
        padded = _BUCKETED.get()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                saved.append(None)
                continue
            xe = xs[start : start + n]  # (n, D)
            if padded and bucket(n) > n:
                xe = F.pad(xe, (0, 0, 0, bucket(n) - n))  # (m, D) zero rows after the n
            g = torch.mm(xe, gate_up[e, :F_].t())  # (n, F) or (m, F)
            u = torch.mm(xe, gate_up[e, F_:].t())  # (n, F) or (m, F)
            s = F.silu(g)
            a = s * u  # (n, F) or (m, F)
            if len(a) > n:
                y[start : start + n] = torch.mm(a, down[e].t())[:n]
                g, u, s, a = g[:n], u[:n], s[:n], a[:n]
            else:
                torch.mm(a, down[e].t(), out=y[start : start + n])
            saved.append((g, u, s, a))
            start += n
        out = torch.zeros_like(x).index_add_(0, token, y * gates[:, None])  # (T, D)
        ctx.counts, ctx.hidden = counts, saved
        ctx.save_for_backward(xs, y, gates, token, gate_up, down, keep)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        xs, y, gates, token, gate_up, down, keep = ctx.saved_tensors
        need_x, need_w1, need_w2, need_g = ctx.needs_input_grad[:4]
        F_ = down.shape[2]
        dy_full = grad_out.index_select(0, token)  # (T*K, D)
        d_gates = (dy_full * y).sum(1) if need_g else None  # (T*K,)
        dy = dy_full * gates[:, None]  # (T*K, D)
        dy_w: Tensor | None = dy  # what the weights' gradients see (T*K, D)
        xs_w: Tensor | None = xs
        if keep is not None:
            dy_w = dy * keep[:, None] if need_w2 else None
            xs_w = xs * keep[:, None] if need_w1 else None
        dxs = torch.empty_like(xs) if need_x else None
        # every expert's slice is written below; only the experts without tokens need zeros
        d_gate_up = torch.empty_like(gate_up) if need_w1 else None
        d_down = torch.empty_like(down) if need_w2 else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (d_gate_up, d_down):
                    if grad is not None:
                        grad[e].zero_()
                continue
            g, u, s, a = ctx.hidden[e]
            dy_e = dy[start : start + n]  # (n, D)
            if d_down is not None and dy_w is not None:  # need_w2
                torch.mm(dy_w[start : start + n].t(), a, out=d_down[e])  # (D, F)
            if need_x or need_w1:
                da = torch.mm(dy_e, down[e])  # (n, F)
                du = da * s
                dg = torch.ops.aten.silu_backward(da * u, g)
                if d_gate_up is not None and xs_w is not None:  # need_w1
                    xw = xs_w[start : start + n]  # (n, D)
                    torch.mm(dg.t(), xw, out=d_gate_up[e, :F_])  # (F, D)
                    torch.mm(du.t(), xw, out=d_gate_up[e, F_:])
                if dxs is not None:  # need_x
                    dxe = dxs[start : start + n]
                    torch.mm(dg, gate_up[e, :F_], out=dxe)  # (n, D)
                    torch.addmm(dxe, du, gate_up[e, F_:], out=dxe)
            start += n
        dx = torch.zeros_like(grad_out).index_add_(0, token, dxs) if dxs is not None else None
        return dx, d_gate_up, d_down, d_gates, None, None, None
