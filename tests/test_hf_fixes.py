"""One test per defect of issue 11 that the old code failed: generation with left padding and the
KV cache, generation after set_modality, a second attach, a "visual" modality, upcycling on
ZeRO-3 partitioned weights, ``smar inspect --adapter``, an LM-only eval metric, and no graph
break from the modality check. (TRL's double balancing: tests/test_hf.py; saving, PEFT and
resume: tests/test_saving.py.)"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import smar  # noqa: E402
import smar.hf  # noqa: E402
import smar.moe  # noqa: E402
from smar import cli  # noqa: E402
from smar.bias import ModalityBiasRouter  # noqa: E402
from smar.modality import group_modalities  # noqa: E402

IMG = 120
CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
           max_position_embeddings=64, num_experts=4, num_experts_per_tok=2)  # fmt: skip


def moe(**extra):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**CFG, pad_token_id=0, eos_token_id=1, **extra)
    cfg.image_token_id = IMG
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def left_padded():
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 3:6] = IMG
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def test_generate_with_left_padding_and_kv_cache():
    model = moe()
    ids, mask = left_padded()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    reg = smar.attach(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain)  # zero bias: the same tokens
    # The last decode step saw one new token per row, all text, padding still ignored.
    assert torch.equal(reg.modality_ids, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        for b in reg.bias_parameters():
            b[0, 1] = 5.0  # text tokens lean to expert 1: generation changes, and runs
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    reg.detach()


def test_generate_after_set_modality():
    model = moe()
    ids, mask = left_padded()
    reg = smar.attach(model)
    explicit = (ids == IMG).long().masked_fill(mask == 0, -1)
    reg.set_modality(explicit)
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append(reg.modality_ids.clone()))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    h.remove()
    assert torch.equal(seen[0], explicit.reshape(-1))  # the prompt: the caller's ids
    assert all(torch.equal(s, torch.zeros(2, dtype=torch.long)) for s in seen[1:])
    reg.detach()


def test_a_second_attach_is_refused_and_detach_restores():
    model = moe()
    reg = smar.attach(model)
    with pytest.raises(ValueError, match="already attached.*detach"):
        smar.attach(model)
    assert sum(isinstance(m, ModalityBiasRouter) for m in model.modules()) == 2  # not nested
    reg.detach()
    assert not any(isinstance(m, ModalityBiasRouter) for m in model.modules())
    smar.attach(model).detach()  # attaching again after detach is fine


def test_visual_grouping_counts_image_and_video_together():
    ids = torch.tensor([[0, 1, 1, 2, 2, 3, -1]])
    assert group_modalities(ids, "visual").tolist() == [[0, 1, 1, 1, 1, 3, -1]]
    assert group_modalities(ids, {2: 1, 3: 1}).tolist() == [[0, 1, 1, 1, 1, 1, -1]]
    with pytest.raises(ValueError, match="unknown modality grouping"):
        group_modalities(ids, "vision")
    model = moe()
    model.config.video_token_id = IMG + 1
    tokens = torch.randint(3, 100, (1, 10))
    tokens[0, 1:4], tokens[0, 5:8] = IMG, IMG + 1
    reg = smar.attach(model, smar.SMARConfig(groups="visual"))
    model(input_ids=tokens)
    assert reg.modality_ids.tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    assert torch.isfinite(reg.loss())  # video ids no longer exceed num_modalities=2
    reg.detach()


def test_upcycle_gathers_zero3_partitioned_weights(monkeypatch):
    """A stand-in for ``deepspeed.zero.GatheredParameters``: partitioned parameters are empty
    until gathered (what ZeRO-3's zero.Init leaves); upcycle_hf must gather them."""
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    full = {}
    for p in model.model.layers[0].mlp.parameters():
        full[id(p)] = p.data
        p.ds_id = id(p)
        p.data = torch.empty(0)
    gathered = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        for p in params:
            p.data = full[p.ds_id]
        gathered.append(len(params))
        yield
        for p in params:
            p.data = torch.empty(0)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    smar.upcycle_hf(model, num_experts=2, top_k=1)
    assert gathered == [3]
    block = model.model.layers[0].mlp
    assert isinstance(block, smar.moe.MoEBlock)
    assert all(p.numel() > 0 for p in block.parameters())  # the experts copied the full MLP


MY_ADAPTERS = [smar.adapters.Adapter("mine", classes=("Qwen3MoeTopKRouter",), index=0)]


def test_inspect_takes_an_adapter(tmp_path, capsys):
    moe().save_pretrained(tmp_path)
    assert cli.main(["inspect", str(tmp_path), "--adapter", f"{__name__}:MY_ADAPTERS"]) == 0
    out = capsys.readouterr().out
    assert "  mine  " in out
    # a bad spec is one line and exit code 2 (tests/test_cli_errors.py)
    assert cli.main(["inspect", str(tmp_path), "--adapter", "nonsense"]) == 2
    assert "package.module:NAME" in capsys.readouterr().err


def test_eval_reports_the_lm_loss_beside_eval_loss(tmp_path):
    samples = []
    for i in range(4):
        ids = torch.randint(3, 100, (10,), generator=torch.Generator().manual_seed(i))
        ids[2:6] = IMG
        samples.append(dict(input_ids=ids, labels=ids.masked_fill(ids == IMG, -100)))
    args = transformers.TrainingArguments(str(tmp_path), per_device_eval_batch_size=2,
                                          report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    model = moe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = smar.hf.SMARTrainer(model=model, args=args, eval_dataset=samples)
    metrics = t.evaluate()
    with torch.no_grad():
        batches = [t.data_collator(samples[:2]), t.data_collator(samples[2:])]
        lm = sum(float(model(**b).loss) for b in batches) / 2
    assert metrics["eval_lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert metrics["eval_loss"] > metrics["eval_lm_loss"]  # eval_loss holds the routing loss too


def test_modality_check_makes_no_graph_break():
    from smar.moe import Router

    router = Router(16, 4)
    reg = smar.attach(torch.nn.Sequential(router), smar.SMARConfig(smar_weight=0))
    wrapper = reg.wrappers[0]
    x = torch.randn(6, 16)
    reg.set_modality(torch.tensor([0, 1, 1, 0, -1, 0]))
    torch._dynamo.reset()
    bare = torch._dynamo.explain(router)(x)
    torch._dynamo.reset()
    wrapped = torch._dynamo.explain(wrapper)(x)
    assert wrapped.graph_break_count == bare.graph_break_count == 0
    reg.detach()


def test_jetmoe_mlp_and_attention_routers_are_told_apart():
    """JetMoE uses one gating class for its attention experts and its MLP experts: smar used to
    see two routers per layer. Now SMAR acts on the MLP routers unless told otherwise."""
    torch.manual_seed(0)
    cfg = transformers.JetMoeConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                    kv_channels=8, intermediate_size=32, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    model = transformers.JetMoeForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (2, 8))
    for routers, kinds in (
        ("mlp", {"mlp"}),
        ("attention", {"attention"}),
        ("all", {"mlp", "attention"}),
    ):
        reg = smar.attach(model, smar.SMARConfig(routers=routers))
        assert {s.kind for s in reg.sites} == kinds
        assert len(reg.sites) == 2 * len(kinds)
        assert all(("attention" in s.name) == (s.kind == "attention") for s in reg.sites)
        model(input_ids=ids)
        assert len(reg.logits()) == len(reg.sites)
        reg.detach()


ZERO3 = """
import os, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu")
import deepspeed, transformers, smar
deepspeed.init_distributed(dist_backend="gloo")
cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
dense = transformers.Qwen2ForCausalLM(cfg)
with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3},
                                              "train_batch_size": 1}):
    model = transformers.Qwen2ForCausalLM(cfg)
mlp = model.model.layers[0].mlp
assert mlp.gate_proj.weight.numel() == 0 and hasattr(mlp.gate_proj.weight, "ds_id")
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
    model.load_state_dict(dense.state_dict())
smar.upcycle_hf(model, num_experts=2, top_k=1)
block = model.model.layers[0].mlp
gate = dense.model.layers[0].mlp.gate_proj.weight
assert torch.equal(block.gate_up_proj[1][: gate.shape[0]], gate)
print("ok")
"""


def test_upcycle_hf_under_a_real_zero3_init():
    """DeepSpeed ZeRO-3 ``zero.Init`` on CPU (one gloo process): the MLP weights are partitioned
    (empty) when upcycle_hf reads them; it gathers them and the experts copy the real MLP."""
    pytest.importorskip("deepspeed")
    import subprocess

    res = subprocess.run([sys.executable, "-c", ZERO3], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
