"""The layers of the testbed model: RMSNorm, rotary position embeddings, attention, the decoder
layer (dense SwiGLU or MoE FFN), the patch-based vision encoder, and the LM head's cross-entropy
fused with its matrix product.

Shape legend: B batch, S sequence, D model width, V vision width, N images, P image tokens per
image, H heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from smar.errors import UsageError
from smar.moe import MoEBlock, SwiGLU

if TYPE_CHECKING:
    from smar.testbed.config import TinyConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, as one fused kernel (the same values)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv)  # (S, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs ``(x[2i], x[2i+1])`` of ``x (B, H, S, hd)`` by ``rotation (S, hd/2)``
    (complex ``cos + i sin``): ``(x1 cos - x2 sin, x1 sin + x2 cos)`` as one complex product."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (B, H, S, hd/2)
    return torch.view_as_real(pairs * rotation).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, *, causal: bool):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rope``: the complex rotations of the tokens' positions, ``(S, hd/2)`` or
        ``(B, 1, S, hd/2)``. ``mask``: ``(B, S, S)`` bool, true where query ``i`` may attend to
        key ``j``, in place of the causal mask (packed sequences)."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B,H,S,hd)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, S, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.n_heads, causal=True)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn: nn.Module = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        modality_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rows``: a ``(B, S)`` bool mask; the FFN then runs at those positions alone and the
        layer returns ``(N, D)`` (the last layer, when only those positions are read)."""
        x = x + self.attn(self.attn_norm(x), rope, mask)
        if rows is not None:
            x, modality_ids = x[rows], modality_ids[rows.reshape(-1)]
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEBlock):
            return x + self.ffn(h, modality_ids)
        return x + self.ffn(h)


class VisionEncoder(nn.Module):
    """Patch embedding (after an optional 3x3 convolution: a hybrid ViT's stem, which gives the
    few-layer tower the locality a small data set cannot teach it), learned positions and a few
    bidirectional pre-LN transformer layers."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        V = cfg.vision_dim
        self.pool = cfg.vision_pool
        patch: nn.Module = nn.Conv2d(
            cfg.vision_stem or cfg.channels, V, cfg.patch_size, stride=cfg.patch_size
        )
        if cfg.vision_stem:
            stem = nn.Conv2d(cfg.channels, cfg.vision_stem, 3, padding=1)
            patch = nn.Sequential(stem, nn.GELU(), patch)
        self.patch = patch
        self.pos = nn.Parameter(torch.randn(cfg.image_tokens, V) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(cfg.vision_layers):
            self.layers.append(
                nn.ModuleDict(
                    {
                        "norm1": nn.LayerNorm(V),
                        "attn": Attention(V, cfg.vision_heads, causal=False),
                        "norm2": nn.LayerNorm(V),
                        "mlp": nn.Sequential(nn.Linear(V, 4 * V), nn.GELU(), nn.Linear(4 * V, V)),
                    }
                )
            )
        self.norm = nn.LayerNorm(V)
        self.head = nn.Linear(V, cfg.vision_classes) if cfg.vision_classes else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos  # (N, P, V)
        for module in self.layers:
            layer = cast(nn.ModuleDict, module)
            x = x + layer["attn"](layer["norm1"](x))
            x = x + layer["mlp"](layer["norm2"](x))
        return self.norm(x)  # (N, P, V)

    def summary(self, feats: torch.Tensor) -> torch.Tensor:
        """``(N, P, V) -> (N, 1, V)``: the patch features pooled as the pretraining head reads
        them (``TinyConfig.vision_pool``; max keeps a small object's features that a mean over
        the mostly empty background would dilute)."""
        return feats.amax(1, keepdim=True) if self.pool == "max" else feats.mean(1, keepdim=True)

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise UsageError("this vision encoder has no head: set TinyConfig.vision_classes > 0")
        return self.head(self.summary(self(pixels))[:, 0])  # (N, classes)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, a chunk of rows at a time.

    Each chunk's logits ``(chunk, vocab)`` stay in cache while the forward takes their
    log-sum-exp and turns them in place into the gradient ``softmax - onehot``; the input and
    weight gradients are then two matrix products of that chunk. The backward only scales them:
    no ``(N, vocab)`` logits, log-softmax or zero-filled gradient are ever written to memory.
    """

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        N = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        acc = torch.promote_types(h.dtype, torch.float32)  # at least float32, as the loss was
        total = h.new_zeros((), dtype=acc)
        for i in range(0, N, chunk):
            hc, tc = h[i : i + chunk], targets[i : i + chunk]
            z = torch.mm(hc, weight.t()).to(acc)  # (c, vocab)
            picked = z.gather(1, tc[:, None])  # (c, 1) the targets' logits
            top = z.amax(1, keepdim=True)  # (c, 1)
            e = z.sub_(top).exp_()  # (c, vocab), in place: one exp for the loss and the gradient
            norm = e.sum(1, keepdim=True)  # (c, 1)
            total += (top + norm.log() - picked).sum()
            if need_h or need_w:
                g = e.mul_((norm * N).reciprocal_())  # softmax / N
                g[torch.arange(len(tc)), tc] -= 1.0 / N  # d mean loss / d logits
                g = g.to(h.dtype)
                if dh is not None:  # need_h
                    torch.mm(g, weight, out=dh[i : i + chunk])
                if dw is not None:  # need_w
                    torch.addmm(dw, g.t(), hc, out=dw)  # dw += g.T @ hc
        ctx.save_for_backward(dh, dw)
        return total / N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dw = ctx.saved_tensors
        return (
            None if dh is None else dh * grad,
            None if dw is None else dw * grad,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), targets)`` (mean, every target valid, in at
    least float32), computed chunk by chunk with its gradients when a gradient is wanted.

    Shapes: ``h (N, D)``, ``weight (vocab, D)``, ``targets (N,)`` -> scalar.
    """
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        acc = torch.promote_types(h.dtype, torch.float32)
        return F.cross_entropy(F.linear(h, weight).to(acc), targets)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)
