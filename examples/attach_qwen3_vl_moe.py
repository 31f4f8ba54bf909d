"""SMAR on a native multimodal MoE: a tiny random Qwen3-VL-MoE, CPU, a few seconds.

attach() finds the 2 routers, derives modality ids from mm_token_type_ids, adds a zero modality
bias, and gives the routing loss of each forward; a few optimizer steps move the MRD up.
"""

import logging

import torch
import transformers

import smar

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("example")
torch.manual_seed(0)
IMG = 120
vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
              spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
              num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 3, 3], "mrope_interleaved": True})  # fmt: skip
config = transformers.Qwen3VLMoeConfig(
    vision_config=vision, text_config=text, image_token_id=IMG, vision_start_token_id=IMG + 1,
    vision_end_token_id=IMG + 2, video_token_id=IMG + 3,
)  # fmt: skip
model = transformers.Qwen3VLMoeForConditionalGeneration(config)

B, S = 4, 16
ids = torch.randint(1, 100, (B, S))
ids[:, 1], ids[:, 2:6], ids[:, 6] = IMG + 1, IMG, IMG + 2  # 4 image tokens per sample
batch = dict(
    input_ids=ids,
    attention_mask=torch.ones_like(ids),
    pixel_values=torch.randn(B * 16, 3 * 2 * 8 * 8),  # 16 patches per image -> 4 tokens
    image_grid_thw=torch.tensor([[1, 4, 4]] * B),
    mm_token_type_ids=(ids == IMG).long(),  # what the processor returns
    labels=ids.masked_fill(ids == IMG, -100),
)

reg = smar.attach(model, smar.SMARConfig(smar_weight=1.0, band=(1.5, 2.0)))
log.info("%s", reg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
for step in range(6):
    out = model(**batch)
    loss = out.loss + reg.loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    t = reg.terms()
    log.info("step %d  lm %.3f  band %.3f  lb %.3f  mrd %.3f", step, out.loss.item(),
             t["smar/band"], t["smar/lb"], t["smar/mrd"])  # fmt: skip
reg.detach()
