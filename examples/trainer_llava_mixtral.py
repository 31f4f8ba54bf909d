"""SMARTrainer on a LLaVA-style model around a text MoE (Mixtral), tiny random config, CPU.

The trainer adds the regularizer to the model's loss and logs smar/* terms and per-layer MRD.
"""

import logging
import tempfile

import torch
import transformers

import smar
from smar.hf import SMARTrainer

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("example")
torch.manual_seed(0)
IMG = 120
vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
              projection_dim=32)  # fmt: skip
text = dict(model_type="mixtral", vocab_size=128, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
config = transformers.LlavaConfig(
    vision_config=vision, text_config=text, image_token_index=IMG,
    vision_feature_select_strategy="default", image_seq_length=4,
)  # fmt: skip
model = transformers.LlavaForConditionalGeneration(config)


def sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(1, 100, (16,), generator=g)
    ids[1:5] = IMG  # the processor expands each image into image_seq_length placeholders
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(3, 16, 16, generator=g),
                labels=ids.masked_fill(ids == IMG, -100))  # fmt: skip


with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=4, max_steps=4, logging_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = SMARTrainer(model=model, args=args, train_dataset=[sample(i) for i in range(16)],
                          smar_config=smar.SMARConfig())  # fmt: skip
    trainer.train()
for h in trainer.state.log_history:
    if "loss" in h:
        log.info("%s", {k: round(v, 4) for k, v in h.items() if k == "loss" or "smar/" in k})
