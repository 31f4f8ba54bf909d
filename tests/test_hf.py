"""smar.hf: SMARTrainer on every supported family, TRL's SFTTrainer, upcycling, inspect."""

import copy
import math
import statistics
import warnings
from math import nan

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_adapters import CASES, IMG, build  # noqa: E402

import smar  # noqa: E402
import smar.hf  # noqa: E402
from smar import cli  # noqa: E402
from smar.moe import MoEBlock  # noqa: E402

QWEN2 = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip


def qwen2():
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2)).eval()


def qwen3_moe():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**QWEN2, moe_intermediate_size=32, num_experts=4,
                                      num_experts_per_tok=2)  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(cfg)


def args(tmp_path, **kw):
    return transformers.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        **kw,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_steps_and_logs(name, tmp_path):
    case = build(name)
    case.model.train()
    config = smar.SMARConfig(modality_bias=case.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = smar.hf.SMARTrainer(
            model=case.model, args=args(tmp_path), train_dataset=case.samples * 2,
            data_collator=case.collate, smar_config=config,
        )  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    layers = trainer.smar.layers
    for h in logs:
        assert {"smar/total", "smar/band", "smar/lb", "smar/mrd"} <= set(h)
        assert {f"smar/layer{la:02d}/mrd" for la in layers} <= set(h)
    if case.bias:
        assert any(b.abs().sum() > 0 for b in trainer.smar.bias_parameters())


def _eval_terms_by_hand(model, batches, config: smar.SMARConfig) -> dict[str, float]:
    """The routing terms of each batch from smar.record and the loss functions (not the
    trainer's path), averaged over the batches where each is defined (MRD: both modalities)."""
    per_batch: list[dict[str, float]] = []
    with smar.record(model) as rec, torch.no_grad():
        for batch in batches:
            model(**batch)
            logits = rec.logits()
            ids = (batch["input_ids"] == IMG).long().reshape(-1)  # token-level: image 1, text 0
            D = smar.mrd(logits, ids) if bool(ids.any()) else torch.full((len(logits),), nan)
            band = smar.smar_loss(logits, ids, band=config.band)  # 0 without image tokens
            lb = smar.load_balancing_loss(logits, top_k=rec.top_k)
            z = smar.z_loss(logits)
            terms = {"smar/band": band, "smar/lb": lb, "smar/z": z, "smar/mrd": D.nanmean()}
            c = config
            terms["smar/total"] = c.smar_weight * band + c.lb_weight * lb + c.z_weight * z
            layers = zip(rec.captured_layers, D, strict=True)
            terms.update({f"smar/layer{la:02d}/mrd": d for la, d in layers})
            per_batch.append({k: float(v) for k, v in terms.items()})
    return {
        k: statistics.fmean(v for b in per_batch if math.isfinite(v := b[k])) for k in per_batch[0]
    }


def test_evaluate_reports_the_routing_terms_on_the_eval_set(tmp_path):
    case = build("qwen3_moe_llava")
    # a batch without image tokens: its MRD is undefined (left out of the mean), its band 0
    text_only = [{k: v for k, v in s.items() if k != "pixel_values"} for s in case.samples]
    for s in text_only:
        s["input_ids"] = s["input_ids"].masked_fill(s["input_ids"] == IMG, 7)
        s["labels"] = s["input_ids"].clone()
    eval_set = case.samples + text_only  # batches of 2: multimodal, then text only
    config = smar.SMARConfig(z_weight=1e-3)
    reference = copy.deepcopy(case.model)  # no bias wrappers; a zero bias changes no output bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = smar.hf.SMARTrainer(
            model=case.model, args=args(tmp_path, per_device_eval_batch_size=2),
            eval_dataset=eval_set, data_collator=case.collate, smar_config=config,
        )  # fmt: skip
    metrics = trainer.evaluate()
    expected = _eval_terms_by_hand(reference, [case.batch, case.collate(text_only)], config)
    got = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_smar/")}
    assert set(got) == set(expected)
    assert len([k for k in got if k.startswith("smar/layer")]) == len(trainer.smar.layers) == 2
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert 0 < got["smar/band"] < 1.5  # the text-only batch's 0 counts in the mean
    # evaluation keeps its terms apart from training's logging window
    assert trainer._smar_sums is None and trainer._smar_eval_sums is None


def test_trainer_warns_when_the_model_adds_its_own_balancing_loss(tmp_path):
    model = qwen3_moe()
    model.config.output_router_logits = True
    with pytest.warns(UserWarning, match="output_router_logits=False"):
        smar.hf.SMARTrainer(model=model, args=args(tmp_path), train_dataset=[{}])
    model = qwen3_moe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smar.hf.SMARTrainer(model=model, args=args(tmp_path), train_dataset=[{}])


def test_trl_sft_trainer_mixin(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", eos_token="w1", unk_token="w2"
    )

    class SMARSFTTrainer(smar.hf.SMARTrainerMixin, trl.SFTTrainer):
        pass

    g = torch.Generator().manual_seed(0)
    rows = [
        " ".join(f"w{int(i)}" for i in torch.randint(3, 128, (10,), generator=g)) for _ in range(4)
    ]
    ds = datasets.Dataset.from_dict({"text": rows})
    sft = trl.SFTConfig(
        str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=16,
    )  # fmt: skip
    # SFTTrainer turns the model's own balancing loss on inside its __init__: the mixin says so
    # once the trainer is built (it used to check before, and balancing counted twice silently).
    with pytest.warns(UserWarning, match="load balancing would count twice"):
        trainer = SMARSFTTrainer(
            model=qwen3_moe(), args=sft, train_dataset=ds, processing_class=tokenizer,
            smar_config=smar.SMARConfig(modality_bias=False),
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SMAR's routing loss")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("smar/lb" in h for h in logs)


def test_upcycle_hf_copies_the_mlp_and_round_trips(tmp_path):
    model = qwen2()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        smar.upcycle_hf(model, num_experts=4, top_k=2, layers="alternate")
        moe = model(input_ids=ids).logits
    assert [isinstance(la.mlp, MoEBlock) for la in model.model.layers] == [True, False, True]
    assert torch.allclose(dense, moe, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = smar.hf.from_pretrained_upcycled(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, moe)
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="already a MoE block"):
        smar.upcycle_hf(loaded, layers=[0])


def test_inspect_lists_routers(tmp_path, capsys):
    qwen3_moe().save_pretrained(tmp_path / "moe")
    table = smar.hf.inspect_model_dir(str(tmp_path / "moe"))
    assert "Qwen3MoeForCausalLM" in table and "Qwen3MoeTopKRouter" in table
    assert "model.layers.2.mlp.gate" in table
    qwen2().save_pretrained(tmp_path / "dense")
    assert "no router found" in smar.hf.inspect_model_dir(str(tmp_path / "dense"))
    assert cli.main(["inspect", str(tmp_path / "moe")]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeTopKRouter" in out and "mlp" in out and "yes" in out


def test_dense_model_error_names_class_and_adapter():
    with pytest.raises(ValueError, match=r"no router found in Qwen2ForCausalLM.*adapter="):
        smar.attach(qwen2())
