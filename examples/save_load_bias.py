"""Train SMAR on a MoE family smar has no entry for (a tiny random DeepSeek-V3: sigmoid routing,
correction bias, group-limited top-k), save, and load it back with its trained modality bias.

The routers are found from transformers' own declaration; the bias goes into the output of the
router's linear layer, and DeepSeek-V3's own routing code runs on it. ``save_model()`` writes the
model with its original router keys plus ``smar_bias.safetensors``; ``from_pretrained`` and
``smar.hf.load_bias`` give back the trained model's outputs. CPU, a few seconds.
"""

import logging
import tempfile
import warnings

import torch
import transformers

import smar
import smar.hf

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("example")
torch.manual_seed(0)
IMG = 120
config = transformers.DeepseekV3Config(
    vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=16,
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
    max_position_embeddings=64,
)  # fmt: skip
config.image_token_id = IMG  # modality ids come from input_ids == image_token_id
model = transformers.DeepseekV3ForCausalLM(config)

samples = []
for i in range(8):
    ids = torch.randint(1, 100, (12,), generator=torch.Generator().manual_seed(i))
    ids[2:8] = IMG  # 6 image placeholder tokens, as a processor writes them
    samples.append(dict(input_ids=ids, labels=ids.masked_fill(ids == IMG, -100)))

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=2, max_steps=3, learning_rate=5e-2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = smar.hf.SMARTrainer(
            model=model, args=args, train_dataset=samples,
            smar_config=smar.SMARConfig(smar_weight=10.0),
        )  # fmt: skip
    trainer.train()
    trainer.save_model(out + "/model")
    probe = torch.stack([s["input_ids"] for s in samples[:2]])
    with torch.no_grad():
        trained = model.eval()(input_ids=probe).logits

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out + "/model").eval()
    reg = smar.hf.load_bias(loaded, out + "/model")  # attaches with the saved SMARConfig
    with torch.no_grad():
        again = loaded(input_ids=probe).logits
    assert torch.allclose(again, trained, atol=1e-5), (again - trained).abs().max()
    norms = [round(float(b.detach().norm()), 3) for b in reg.bias_parameters()]
    log.info("reloaded with %d trained biases (norms %s): outputs equal", len(norms), norms)
