"""The testbed model, in one file: a small LLaVA-style multimodal language model whose FFNs can
be mixture-of-experts layers.

    image (N, C, H, W) -> VisionEncoder -> (N, P, V) -> Projector -> (N, P, D) --+
                                                                                 | placed at the
    input_ids (B, S) -> token embedding (B, S, D) <------------------------------+ <image> tokens
                     -> n_layers x [RMSNorm -> causal attention (RoPE) -> RMSNorm -> FFN or MoE]
                     -> RMSNorm -> tied LM head -> logits (B, S, vocab)

Shape legend: B batch, S sequence, D model width, V vision width, N images, P image tokens per
image, T = B*S tokens, E experts.

``forward`` returns the LM loss, the logits, the router logits of each MoE layer ``(T, E)`` and
the modality ids ``(T,)``: exactly the inputs of :mod:`smar.losses`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from smar.errors import UsageError
from smar.moe import MoEBlock, Router, SwiGLU
from smar.testbed.blocks import (
    DecoderLayer,
    RMSNorm,
    VisionEncoder,
    linear_cross_entropy,
    rope_tables,
)
from smar.testbed.config import TinyConfig
from smar.upcycle import upcycle

__all__ = ["TinyConfig", "TinyModel", "TinyOutput"]

TRAINABLE = ("all", "moe", "projector", "lm", "vision", "none")


@dataclass
class TinyOutput:
    """What :meth:`TinyModel.forward` returns.

    Attributes:
        loss: mean next-token cross-entropy over labelled positions (None without labels).
        logits: ``(B, S, vocab)``, ``(N, vocab)`` at the positions asked for, or None.
        router_logits: one ``(T, E)`` tensor per MoE layer, raw logits after bias and mask.
        modality_ids: ``(T,)``: 0 text, 1 image, -1 padding (or the ids the caller passed).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    router_logits: list[torch.Tensor]
    modality_ids: torch.Tensor


class TinyModel(nn.Module):
    """The testbed's multimodal LM (see the module docstring for the data flow)."""

    rope_cos: torch.Tensor  # (max_seq_len, hd/2) buffers
    rope_sin: torch.Tensor

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.vision = VisionEncoder(cfg)
        self.projector = nn.Sequential(
            nn.Linear(cfg.vision_dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim)
        )
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(
                ("attn.proj.weight", "ffn.down_proj.weight")
            ):  # scaled residual branches
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.moe_layers:
            moe_layers = list(cfg.moe_layers)
            cfg.moe_layers = []
            self.upcycle_(layers=moe_layers)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ----------------------------------------------------------------------------------- forward
    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the projected image features at the ``<image>`` positions."""
        x = self.embed(input_ids)  # (B, S, D)
        is_image = input_ids == self.cfg.image_token_id  # (B, S)
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise UsageError(
                    f"input_ids hold {n_slots} <image> tokens but no pixel_values were given"
                )
            return x
        feats = self.vision(pixel_values)  # (N, P, V)
        if self.cfg.vision_summary:
            feats = feats + self.vision.summary(feats)  # (N, P, V)
        feats = self.projector(feats)  # (N, P, D)
        if feats.shape[0] * feats.shape[1] != n_slots:
            raise UsageError(
                f"{feats.shape[0]} images x {feats.shape[1]} tokens = "
                f"{feats.shape[0] * feats.shape[1]} image features, but input_ids hold {n_slots} "
                f"<image> tokens (id {self.cfg.image_token_id}); put {self.cfg.image_tokens} "
                "placeholders per image"
            )
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))  # (B, S, D)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        logits: str | torch.Tensor = "all",
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> TinyOutput:
        """Runs the model.

        Args:
            input_ids: ``(B, S)`` token ids with ``image_tokens`` ``<image>`` ids per image.
            pixel_values: ``(N, C, H, W)`` images, in the order of their placeholders.
            labels: ``(B, S)`` targets aligned with ``input_ids`` (shifted inside, HF style);
                ``-100`` is ignored.
            attention_mask: ``(B, S)``, 0 at padding (right padding; padding becomes modality -1).
            modality_ids: ``(B, S)`` or ``(T,)`` ids for routing and losses; by default image
                positions 1, text 0, padding -1 (token level).
            logits: which positions get next-token logits (the tied head is a 2048-way product
                per position, and most positions of a question are never read): ``"all"``
                ``(B, S, vocab)``; ``"none"`` (the loss alone, from the labelled positions
                only); or a ``(B, S)`` bool mask: ``(N, vocab)`` at its true positions,
                row-major. With a mask and no ``labels``, the last layer's FFN runs at those
                positions alone (no later layer reads the others), and a last MoE layer's router
                logits are those ``N`` positions'.
            position_ids: ``(B, S)`` RoPE positions (default ``0..S-1``), and
            attn_mask: ``(B, S, S)`` bool, true where token ``i`` may attend to token ``j``
                (default causal): several continuations of one prefix packed in one sequence,
                each at the positions it would have alone and seeing the prefix and itself.
        """
        B, S = input_ids.shape
        if S > self.cfg.max_seq_len:
            raise UsageError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        if modality_ids is None:
            modality_ids = (input_ids == self.cfg.image_token_id).long()  # (B, S)
            if attention_mask is not None:
                modality_ids = modality_ids.masked_fill(attention_mask == 0, -1)
        modality_ids = modality_ids.reshape(-1)  # (T,)
        if modality_ids.numel() != B * S:
            raise UsageError(f"modality_ids has {modality_ids.numel()} entries, expected {B * S}")
        x = self.embed_inputs(input_ids, pixel_values)
        if position_ids is None:
            rope = torch.complex(self.rope_cos[:S], self.rope_sin[:S])  # (S, hd/2)
        else:
            if position_ids.shape != (B, S) or int(position_ids.max()) >= self.cfg.max_seq_len:
                raise UsageError(
                    f"position_ids must be (B, S) = {(B, S)} below max_seq_len="
                    f"{self.cfg.max_seq_len}; got {tuple(position_ids.shape)}"
                )
            rope = torch.complex(self.rope_cos[position_ids], self.rope_sin[position_ids])
            rope = rope[:, None]  # (B, 1, S, hd/2)
        if attn_mask is not None and attn_mask.shape != (B, S, S):
            raise UsageError(f"attn_mask must be (B, S, S) = {(B, S, S)} bool")
        mask = logits if isinstance(logits, torch.Tensor) else None  # (B, S) positions read
        if mask is not None and (mask.shape != input_ids.shape or mask.dtype != torch.bool):
            raise UsageError(
                f"logits= takes a bool mask of shape {tuple(input_ids.shape)}; got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        if mask is None and logits not in ("all", "none"):
            raise UsageError(f"logits must be 'all', 'none' or a bool mask; got {logits!r}")
        # no loss: the last layer's FFN and the head run at the positions read alone
        rows = mask if labels is None else None
        router_logits: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, modality_ids, attn_mask, rows if i == len(self.layers) - 1 else None)
            if isinstance(layer.ffn, MoEBlock):
                z = layer.ffn.last_router_logits  # (T, E), set by the forward above
                assert z is not None
                router_logits.append(z)
        h = self.norm(x)  # (B, S, D), or (N, D) at the rows read
        loss = None
        if labels is not None:
            # the loss reads only the labelled positions: the head runs on those alone
            targets = labels[:, 1:]  # (B, S-1): position s predicts token s+1
            keep = targets != -100  # (B, S-1)
            loss = linear_cross_entropy(h[:, :-1][keep], self.embed.weight, targets[keep])
        if mask is not None:
            out_logits = F.linear(h if rows is not None else h[mask], self.embed.weight)  # (N, V)
        elif logits == "all":
            out_logits = F.linear(h, self.embed.weight)  # (B, S, vocab), tied head
        else:
            out_logits = None
        return TinyOutput(loss, out_logits, router_logits, modality_ids)

    # --------------------------------------------------------------------------------- surgery
    @torch.no_grad()
    def upcycle_(
        self,
        *,
        layers: str | list[int] = "all",
        noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> TinyModel:
        """Replaces the FFNs of ``layers`` (``"all"``, ``"alternate"`` = odd layers, or indices)
        by MoE blocks whose experts copy the FFN (MoE-LLaVA), with the config's E, K, bias and
        hard-routing options. With ``noise=0`` the model computes the same function as before.
        """
        idx = self._layer_indices(layers)
        for i in idx:
            layer = cast(DecoderLayer, self.layers[i])
            if isinstance(layer.ffn, MoEBlock):
                raise UsageError(f"layer {i} is already a MoE layer")
            layer.ffn = upcycle(
                layer.ffn,
                num_experts=self.cfg.num_experts,
                top_k=self.cfg.top_k,
                noise=noise,
                generator=generator,
                modality_bias=self.cfg.modality_bias,
                hard=self.cfg.hard,
                partition=self.cfg.partition,
            )
        self.cfg.moe_layers = sorted(set(self.cfg.moe_layers) | set(idx))
        return self

    @torch.no_grad()
    def make_moe_(
        self, *, layers: str | list[int] = "all", generator: torch.Generator | None = None
    ) -> TinyModel:
        """Replaces the FFNs of ``layers`` by MoE blocks with independent random experts (a
        natively-MoE LM, pretrained as MoE: experts differ from the start), with the config's E,
        K, bias and hard-routing options."""
        for i in self._layer_indices(layers):
            ffn = self.layers[i].ffn
            if isinstance(ffn, MoEBlock):
                raise UsageError(f"layer {i} is already a MoE layer")
            hidden = cast(SwiGLU, ffn).down_proj.weight.shape[1]  # a dense layer's SwiGLU
            block = MoEBlock(self.cfg.dim, hidden, self.cfg.num_experts, self.cfg.top_k)
            block.router.weight.copy_(
                torch.randn(block.router.weight.shape, generator=generator) * self.cfg.dim**-0.5
            )
            block.gate_up_proj.copy_(torch.randn(block.gate_up_proj.shape, generator=generator))
            block.gate_up_proj.mul_(0.02)
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers)  # scaled residual branch, as the FFN
            block.down_proj.copy_(torch.randn(block.down_proj.shape, generator=generator) * std)
            self.layers[i].ffn = block
            self.cfg.moe_layers = sorted(set(self.cfg.moe_layers) | {i})
        return self.set_routing_()

    @torch.no_grad()
    def set_routing_(self) -> TinyModel:
        """Gives every MoE layer a router with the config's modality-bias and hard-routing options,
        keeping its learned weight (a new bias starts at zero: the routing is unchanged)."""
        for i in self.cfg.moe_layers:
            block = cast(MoEBlock, self.layers[i].ffn)  # the config's MoE layers
            old = block.router
            block.router = Router(
                self.cfg.dim,
                self.cfg.num_experts,
                modality_bias=self.cfg.modality_bias,
                hard=self.cfg.hard,
                partition=self.cfg.partition,
            ).to(old.weight)
            block.router.weight.copy_(old.weight)
        return self

    def _layer_indices(self, layers: str | list[int]) -> list[int]:
        n = self.cfg.n_layers
        if layers == "all":
            return list(range(n))
        if layers == "alternate":
            return list(range(1, n, 2))
        if isinstance(layers, str):
            raise UsageError(f"layers must be 'all', 'alternate' or a list of ints, got {layers!r}")
        return sorted(set(int(i) for i in layers))

    def set_trainable(self, part: str) -> list[str]:
        """Freezes everything except ``part`` and returns the names of the trainable parameters.

        ``"all"``; ``"moe"``: the MoE layers (experts, routers, modality bias) and the projector
        (MoE-LLaVA stage 3); ``"projector"`` (LLaVA alignment); ``"lm"``: the language model
        without vision encoder and projector; ``"vision"``; ``"none"``.
        """
        if part not in TRAINABLE:
            raise UsageError(f"trainable must be one of {TRAINABLE}, got {part!r}")
        moe_prefixes = tuple(f"layers.{i}.ffn." for i in self.cfg.moe_layers)
        names = []
        for name, p in self.named_parameters():
            on = {
                "all": True,
                "none": False,
                "moe": name.startswith(moe_prefixes) or name.startswith("projector."),
                "projector": name.startswith("projector."),
                "lm": not name.startswith(("vision.", "projector.")),
                "vision": name.startswith("vision."),
            }[part]
            p.requires_grad_(on)
            if on:
                names.append(name)
        if part == "moe" and not self.cfg.moe_layers:
            raise UsageError("trainable='moe' on a model without MoE layers: upcycle it first")
        return names

    # ------------------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> Path:
        """Writes ``model.safetensors`` (with the sha256 of its data in the header) and
        ``config.json`` into ``directory``, each atomically."""
        from smar.testbed.io import save_tensors, write_json

        d = Path(directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_tensors(d / "model.safetensors", state)
        write_json(d / "config.json", asdict(self.cfg))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> TinyModel:
        """Rebuilds a model written by :meth:`save` after checking both files.

        Raises:
            FileNotFoundError: a file is missing.
            smar.errors.CorruptFile: a file fails its check (named).
        """
        from smar.errors import CorruptFile
        from smar.testbed.io import load_tensors, read_json

        d = Path(directory)
        if not (d / "config.json").exists() or not (d / "model.safetensors").exists():
            raise FileNotFoundError(f"{d} has no config.json + model.safetensors (see save())")
        try:
            cfg = TinyConfig.from_dict(read_json(d / "config.json"))
        except (TypeError, ValueError, AttributeError) as e:
            raise CorruptFile(d / "config.json", f"not a TinyConfig: {e}") from e
        model = cls(cfg)
        state, _ = load_tensors(d / "model.safetensors")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CorruptFile(d / "model.safetensors", str(e).splitlines()[0][:120]) from e
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
