"""The experts of :class:`smar.moe.MoEBlock` on tokens grouped by expert, forward and backward
written by hand (``GroupedExperts``): the products of a loop of ``F.linear`` calls, without
autograd's copies and zero fills, and with an optional per-assignment mask on the weights'
gradients (:func:`smar.moe.weight_gradient_stop`).

Two contexts for inference on the CPU in bf16:

* oneDNN compiles a kernel for each new row count of a product, and each expert sees another
  row count at every call: inside :func:`bucketed_rows` each expert's rows are padded to one of
  a few sizes (:func:`bucket`), so that inference reuses the kernels (an evaluation of
  ``smar real`` runs 1.3x faster in bf16); the products then differ from the unpadded ones by
  rounding.
* oneDNN reorders a plain bf16 weight into its blocked layout at every product, about half the
  time of a product of a few rows: inside :func:`prepacked` the bf16 linear layers and experts
  of a model multiply with weights reordered once (an evaluation of ``smar real`` runs 1.1x
  faster, decoding small batches 1.2x); the products equal the plain ones up to rounding (oneDNN
  picks another kernel for some shapes).

Shape legend: T tokens, K experts per token, D model width, F expert hidden width, E experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupedExperts", "grouped_experts", "bucket", "bucketed_rows", "can_prepack",
           "prepacked"]

_BUCKETED: ContextVar[bool] = ContextVar("smar_bucketed_rows", default=False)
# inside prepacked(): each bf16 expert weight's (gate, up, down) per expert, by its data pointer
_PACKED: ContextVar[dict[int, tuple[torch.Size, list[tuple[Tensor, Tensor, Tensor]]]] | None] = (
    ContextVar("smar_prepacked", default=None)
)
_PACK_ROWS = 256  # the row count oneDNN lays the weights out for (any count runs with them)


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


def can_prepack() -> bool:
    """Whether this torch has oneDNN's reordered-weight linear ops (:func:`prepacked`)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))  # fmt: skip


def _pack(weight: Tensor) -> Tensor:
    """``weight (N, K)`` reordered into oneDNN's blocked layout for ``x @ weight.T``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_ROWS)


def _linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _PackedForward:
    """A bf16 linear layer's forward with its weight reordered once; the layer's own forward
    where a gradient is recorded or the input is neither bf16 nor under bf16 autocast."""

    def __init__(self, module: nn.Linear, original: Any):
        self.original = original
        self.weight = _pack(module.weight)
        self.bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return self.original(x)
        if x.dtype != torch.bfloat16:
            if not _bf16_autocast():
                return self.original(x)
            x = x.to(torch.bfloat16)  # as autocast casts a linear layer's input
        return _linear(x, self.weight, self.bias)


@contextlib.contextmanager
def prepacked(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s bf16 linear layers and MoE experts on the CPU multiply with weights
    reordered once into oneDNN's blocked layout, where a plain weight is reordered at every
    product (about half the time of a product of a few rows). For inference, under
    ``torch.no_grad``, with bf16 weights (a bf16 model, or float32 weights held in bf16 under
    bf16 autocast); the products equal the plain ones up to rounding. The weights must not
    change inside. Without oneDNN's ops (:func:`can_prepack`) nothing changes."""
    from smar.moe import MoEBlock

    if not can_prepack():
        yield
        return
    patched: list[tuple[nn.Module, Any]] = []
    packs: dict[int, tuple[torch.Size, list[tuple[Tensor, Tensor, Tensor]]]] = {}
    try:
        with torch.no_grad():
            for m in model.modules():
                if (isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16
                        and m.weight.device.type == "cpu"):  # fmt: skip
                    patched.append((m, m.__dict__.get("forward")))  # (a hook's own forward)
                    m.__dict__["forward"] = _PackedForward(m, m.forward)
                elif isinstance(m, MoEBlock) and m.gate_up_proj.dtype == torch.bfloat16:
                    w1, w2, f = m.gate_up_proj, m.down_proj, m.down_proj.shape[2]
                    packs[w1.data_ptr()] = (w1.shape, [(_pack(w1[e, :f]), _pack(w1[e, f:]),
                                                        _pack(w2[e])) for e in range(len(w1))])
        token = _PACKED.set(packs)
        try:
            yield
        finally:
            _PACKED.reset(token)
    finally:
        for m, own in reversed(patched):
            if own is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = own


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
        out, xs, y, saved = _forward(x, gate_up, down, gates, token, counts)
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


_Hidden = list[tuple[Tensor, Tensor, Tensor, Tensor] | None]  # each expert's (g, u, s, a)


def _forward(x: Tensor, gate_up: Tensor, down: Tensor, gates: Tensor, token: Tensor,
             counts: list[int], packs: list[tuple[Tensor, Tensor, Tensor]] | None = None,
             ) -> tuple[Tensor, Tensor, Tensor, _Hidden]:  # fmt: skip
    """``(out (T, D), xs, y, each expert's (g, u, s, a))``: :class:`GroupedExperts`' products,
    with each expert's reordered weights ``packs`` where given (:func:`prepacked`)."""
    F_ = down.shape[2]
    xs = x.index_select(0, token)  # (T*K, D)
    y = x.new_empty(xs.shape)  # (T*K, D) each assignment's expert output, before its gate
    saved: _Hidden = []
    padded = _BUCKETED.get()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            saved.append(None)
            continue
        xe = xs[start : start + n]  # (n, D)
        if padded and bucket(n) > n:
            xe = F.pad(xe, (0, 0, 0, bucket(n) - n))  # (m, D) zero rows after the n
        if packs is None:
            g = torch.mm(xe, gate_up[e, :F_].t())  # (n, F) or (m, F)
            u = torch.mm(xe, gate_up[e, F_:].t())  # (n, F) or (m, F)
        else:
            g, u = _linear(xe, packs[e][0]), _linear(xe, packs[e][1])
        s = F.silu(g)
        a = s * u  # (n, F) or (m, F)
        if packs is None and len(a) == n:
            torch.mm(a, down[e].t(), out=y[start : start + n])
        else:  # padded rows, or the reordered weights (no out=): the first n rows
            y[start : start + n] = (torch.mm(a, down[e].t()) if packs is None
                                    else _linear(a, packs[e][2]))[:n]  # fmt: skip
            g, u, s, a = g[:n], u[:n], s[:n], a[:n]
        saved.append((g, u, s, a))
        start += n
    out = torch.zeros_like(x).index_add_(0, token, y * gates[:, None])  # (T, D)
    return out, xs, y, saved


def grouped_experts(x: Tensor, gate_up: Tensor, down: Tensor, gates: Tensor, token: Tensor,
                    counts: list[int], keep: Tensor | None = None) -> Tensor:  # fmt: skip
    """``GroupedExperts.apply(...)``; inside :func:`prepacked`, where no gradient is recorded, the
    same products with the experts' reordered weights (no autograd)."""
    packs = None if torch.is_grad_enabled() else _packs(gate_up)
    if packs is not None:
        return _forward(x, gate_up, down, gates, token, counts, packs)[0]
    return GroupedExperts.apply(x, gate_up, down, gates, token, counts, keep)


def _packs(gate_up: Tensor) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """The experts' reordered weights inside :func:`prepacked` (None outside, or for weights
    other than those packed)."""
    packs = _PACKED.get()
    if not packs or gate_up.device.type != "cpu":
        return None
    shape, per_expert = packs.get(gate_up.data_ptr(), (None, None))
    return per_expert if shape == gate_up.shape and gate_up.dtype == torch.bfloat16 else None
