"""Round trips of a trained SMAR model: SMARTrainer's save_model() and checkpoints hold the original
router keys plus smar_bias.safetensors; a fresh process loads them with ``from_pretrained`` and
``smar.hf.load_bias`` and gets the trained model's outputs; the same through PEFT; and
``resume_from_checkpoint`` continues exactly as an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import smar  # noqa: E402
import smar.hf  # noqa: E402

IMG = 120
CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
           max_position_embeddings=64, num_experts=4, num_experts_per_tok=2)  # fmt: skip


def model():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**CFG)
    cfg.image_token_id = IMG  # image placeholder tokens: the modality ids come from input_ids
    return transformers.Qwen3MoeForCausalLM(cfg)


def samples(n=8):
    out = []
    for i in range(n):
        ids = torch.randint(1, 100, (12,), generator=torch.Generator().manual_seed(i))
        ids[2:8] = IMG
        out.append(dict(input_ids=ids, labels=ids.masked_fill(ids == IMG, -100)))
    return out


def probe():
    return torch.stack([s["input_ids"] for s in samples(2)])


def args(out, **kw):
    base = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=5e-2, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0)  # fmt: skip
    return transformers.TrainingArguments(str(out), **{**base, **kw})


def trainer(m, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smar.hf.SMARTrainer(
            model=m, args=args(out, **kw), train_dataset=samples(),
            smar_config=smar.SMARConfig(smar_weight=10.0),
        )  # fmt: skip


def fresh_process(code: str) -> dict:
    """Runs ``code`` in a new interpreter; it prints one JSON line."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


LOAD = """
import json, torch, transformers, smar.hf
ids = torch.tensor({ids})
model, info = transformers.AutoModelForCausalLM.from_pretrained({path!r}, output_loading_info=True)
before = model(input_ids=ids).logits
reg = smar.hf.load_bias(model.eval(), {path!r})
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps(dict(missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]),
    logits=logits.tolist(), changed=bool((before - logits).abs().max() > 0),
    bias=[float(b.abs().sum()) for b in reg.bias_parameters()])))
"""


def test_save_model_round_trips_in_a_fresh_process(tmp_path):
    m = model()
    t = trainer(m, tmp_path / "run")
    t.train()
    biases = [float(b.detach().abs().sum()) for b in t.smar.bias_parameters()]
    assert all(b > 0 for b in biases)
    t.save_model(str(tmp_path / "saved"))
    m.eval()
    with torch.no_grad():
        trained = m(input_ids=probe()).logits
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.gate.weight" in keys
    assert not any(".router." in k or "modality_bias" in k for k in keys)
    got = fresh_process(LOAD.format(ids=probe().tolist(), path=str(tmp_path / "saved")))
    assert got["missing"] == [] and got["unexpected"] == []
    assert got["changed"]  # the bias matters: without it the outputs differ
    assert got["bias"] == pytest.approx(biases)
    assert torch.allclose(torch.tensor(got["logits"]), trained, atol=1e-5, rtol=0)


PEFT_LOAD = """
import json, torch, transformers, peft, smar.hf
ids = torch.tensor({ids})
base = transformers.AutoModelForCausalLM.from_pretrained({base!r})
model = peft.PeftModel.from_pretrained(base, {path!r}).eval()
reg = smar.hf.load_bias(model, {path!r})
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps(dict(logits=logits.tolist(), bias=[float(b.abs().sum()) for b in reg.bias_parameters()])))
"""


def test_peft_adapter_round_trips_with_the_bias(tmp_path):
    peft = pytest.importorskip("peft")
    m = model()
    m.save_pretrained(tmp_path / "base")
    m.name_or_path = str(tmp_path / "base")  # as from_pretrained(folder) sets it
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    t = trainer(pm, tmp_path / "run")
    t.train()
    biases = [float(b.detach().abs().sum()) for b in t.smar.bias_parameters()]
    assert all(b > 0 for b in biases)
    t.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / smar.hf.BIAS_FILE).is_file()
    pm.eval()
    with torch.no_grad():
        trained = pm(input_ids=probe()).logits
    got = fresh_process(
        PEFT_LOAD.format(ids=probe().tolist(), base=str(tmp_path / "base"),
                         path=str(tmp_path / "adapter"))
    )  # fmt: skip
    assert got["bias"] == pytest.approx(biases)
    assert torch.allclose(torch.tensor(got["logits"]), trained, atol=1e-5, rtol=0)
    # the one loader the commands use: base from adapter_config.json, adapter, bias
    loaded = smar.hf.load_model_folder(tmp_path / "adapter")
    assert "PEFT adapter" in loaded.note and "modality bias loaded" in loaded.note
    with torch.no_grad():
        mine = loaded.model(input_ids=probe()).logits
    assert torch.allclose(mine, trained, atol=1e-5, rtol=0)


def test_bias_trains_when_peft_wraps_after_the_attach(tmp_path):
    """TRL's SFTTrainer(peft_config=...) wraps the model in PEFT inside its __init__, after the
    mixin attached SMAR; PEFT then freezes every non-adapter parameter, the bias included. The
    mixin turns the bias back on once the trainer is built (it used to stay frozen silently)."""
    peft = pytest.importorskip("peft")

    class PeftInside(transformers.Trainer):  # what SFTTrainer does with peft_config
        def __init__(self, *a, **kw):
            kw["model"] = peft.get_peft_model(
                kw["model"], peft.LoraConfig(r=4, target_modules=["q_proj"])
            )
            super().__init__(*a, **kw)

    class SMARPeftTrainer(smar.hf.SMARTrainerMixin, PeftInside):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = SMARPeftTrainer(model=model(), args=args(tmp_path), train_dataset=samples(),
                            smar_config=smar.SMARConfig(smar_weight=10.0))  # fmt: skip
    assert isinstance(t.model, peft.PeftModel)
    assert all(b.requires_grad for b in t.smar.bias_parameters())
    t.train()
    assert all(float(b.detach().abs().sum()) > 0 for b in t.smar.bias_parameters())


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    full = trainer(model(), tmp_path / "full", max_steps=6)
    full.train()
    reference = {k: v.clone() for k, v in full.model.state_dict().items()}

    first = trainer(model(), tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3)
    first.train()
    ckpt = tmp_path / "resumed" / "checkpoint-3"
    assert (ckpt / smar.hf.BIAS_FILE).is_file()
    again = trainer(model(), tmp_path / "resumed", max_steps=6)
    again.train(resume_from_checkpoint=str(ckpt))
    state = again.model.state_dict()
    assert set(state) == set(reference)
    for k, v in reference.items():
        assert torch.allclose(state[k], v, atol=1e-6, rtol=0), k
    assert any("modality_bias" in k for k in state)


@pytest.mark.parametrize("attach_first", [True, False])
def test_glm45v_with_lora_on_all_linear_layers(attach_first):
    """GLM-4.5V with LoRA on every linear layer, SMAR attached before or after PEFT: it runs,
    the bias trains, and a zero bias changes nothing (the wrapper used to lack ``weight``)."""
    peft = pytest.importorskip("peft")
    from test_adapters import build

    case = build("glm4v_moe")
    with torch.no_grad():
        before = case.model(**case.batch).logits
    lora = peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=True)
    if attach_first:
        reg = smar.attach(case.model)
        model = peft.get_peft_model(case.model, lora)
        for b in reg.bias_parameters():  # PEFT froze it; SMARTrainer does this itself
            b.requires_grad_(True)
    else:
        model = peft.get_peft_model(case.model, lora)
        reg = smar.attach(model)
    with torch.no_grad():
        assert torch.allclose(model(**case.batch).logits, before, atol=1e-6, rtol=0)
    out = model(**case.batch)
    (out.loss + reg.loss()).backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in reg.bias_parameters())
    reg.detach()
