"""MoE-LLaVA on current transformers: upcycle the Qwen2 MLPs of a LLaVA model into 4 experts, top-2.

The experts copy the MLP, so the upcycled model computes what the dense one did; SMAR then trains
its routers; save_pretrained / from_pretrained_upcycled round-trip bit-exactly.
"""

import logging
import tempfile

import torch
import transformers

import smar
from smar.hf import from_pretrained_upcycled, inspect_model_dir

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("example")
torch.manual_seed(0)
IMG = 120
vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
              projection_dim=32)  # fmt: skip
text = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)  # fmt: skip
config = transformers.LlavaConfig(
    vision_config=vision, text_config=text, image_token_index=IMG,
    vision_feature_select_strategy="default", image_seq_length=4,
)  # fmt: skip
model = transformers.LlavaForConditionalGeneration(config).eval()
ids = torch.randint(1, 100, (2, 12))
ids[:, 1:5] = IMG
batch = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16))

with torch.no_grad():
    dense = model(**batch).logits
    smar.upcycle_hf(model, num_experts=4, top_k=2, layers="all")
    moe = model(**batch).logits
log.info("upcycled: max |moe - dense| = %.2e", (moe - dense).abs().max().item())

reg = smar.attach(model)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
labels = ids.masked_fill(ids == IMG, -100)
for step in range(3):
    out = model(**batch, labels=labels)
    loss = out.loss + reg.loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    log.info("step %d  %s", step, {k: round(v, 4) for k, v in reg.terms().items()})
reg.detach()  # the bias wrappers go; the upcycled MoE blocks stay

model.eval()
with tempfile.TemporaryDirectory() as d, torch.no_grad():
    model.save_pretrained(d)
    log.info("%s", inspect_model_dir(d))
    loaded = from_pretrained_upcycled(d)
    same = torch.equal(loaded(**batch).logits, model(**batch).logits)
log.info("round trip bit-exact: %s", same)
assert same
