"""A tiny Qwen3-MoE and its data, shared by the data-parallel tests and the script that
``torchrun`` starts (tests/helpers/dist_trainer.py). Every rank builds the same model from the seed."""

from __future__ import annotations

import torch

IMG = 120
CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
           max_position_embeddings=64, num_experts=4, num_experts_per_tok=2)  # fmt: skip


def tiny_moe():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**CFG, pad_token_id=0, eos_token_id=1)
    cfg.image_token_id = IMG
    return transformers.Qwen3MoeForCausalLM(cfg)


def samples(n: int, seq: int = 12) -> list[dict]:
    """``n`` samples of equal length; image tokens in a varying span, some samples text only."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(3, 100, (seq,), generator=g)
        if i % 3:
            start = int(torch.randint(0, seq - 5, (1,), generator=g))
            ids[start : start + 1 + i % 5] = IMG
        out.append({"input_ids": ids, "labels": ids.masked_fill(ids == IMG, -100)})
    return out


def router_weights(model) -> dict[str, torch.Tensor]:
    """Every router's weight and modality bias, by name (the wrapper's name stripped)."""
    return {
        n.replace(".router.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if ".gate." in n or n.endswith("modality_bias")
    }
