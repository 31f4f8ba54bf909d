"""``smar real run`` end to end on a tiny random Llama (no download): every stage, arm and
report section, the stage cache and a resumed run; the real model's run is the slow test."""

from __future__ import annotations

import json

import pytest
import torch

from smar.testbed.real.report import aggregate, retention


def _tiny_base():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from smar.testbed.real.model import CHAT_TEMPLATE

    words = [
        "<unk>",
        "<pad>",
        "<|im_start|>",
        "<|im_end|>",
        *(
            "system user assistant what is the capital of a an in picture image digit shape colour "
            "red blue green square circle triangle it number one two three four five six seven eight "
            "nine zero def return write sentence about describe tell me you see . ? ,"
        ).split(),
    ]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                               pad_token="<pad>", eos_token="<|im_end|>")  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval(), tok


def test_retention_is_stage1_over_tuned_for_bits_and_tuned_over_stage1_for_accuracy():
    ret = retention({"chat_bpb": 2.0, "knowledge": 0.5}, {"chat_bpb": 1.0, "knowledge": 1.0})
    assert ret == {"chat_bpb": 0.5, "knowledge": 0.5}


def test_controls_share_is_paired_by_seed():
    stage1 = {"language": {"chat_bpb": 1.0}}
    runs = {}
    for seed, (none, stop) in enumerate([(1.25, 1.1), (1.25, 1.0)]):
        for arm, bpb in (("none", none), ("stop", stop)):
            runs[f"{arm}{seed}"] = {"arm": arm, "seed": seed, "language": {"chat_bpb": bpb},
                                    "multimodal": {"digit": 1.0}, "log": []}  # fmt: skip
    agg = aggregate(stage1, runs)
    assert agg["none"]["R"][0] == pytest.approx(0.8)
    # seed 0: R_stop = 1/1.1; share (0.909 - 0.8) / 0.2; seed 1: R_stop = 1, share 1
    want = ((1 / 1.1 - 0.8) / 0.2 + 1.0) / 2
    assert agg["stop"]["share"][0] == pytest.approx(want)
    assert agg["stop"]["vs_none"]["chat_bpb"][0] == pytest.approx((1 / 1.1 + 1) / 2 - 0.8)


def test_smoke_run_every_arm_then_cached(tmp_path):
    from smar.testbed.real.run import RealConfig, run

    cfg = RealConfig.smoke(arms=("none", "smar", "hard", "stop", "noimage"))
    base = _tiny_base()
    res = run(cfg, tmp_path / "out", base=base, model_id="tiny", stages=tmp_path / "stages",
              progress=False, workers=1)  # fmt: skip
    arms = res["arms"]
    assert set(arms) == {"none", "smar", "hard", "stop", "noimage"}
    assert {"share", "vs_none"} <= set(arms["stop"]) and "share" in arms["noimage"]
    for arm in arms.values():
        assert set(arm["retention"]) >= {"chat_bpb", "code_bpb", "prose_bpb"}
        assert set(arm["multimodal"]) == {"digit", "shape", "colour", "count", "position"}
        assert arm["mrd"], "per-layer MRD logged"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "image-gradient stop control's share" in report and "| hard |" in report
    assert "## Format and fact apart" in report
    probed = json.loads((tmp_path / "out" / "runs" / "none-seed0" / "scores.json").read_text())
    assert {"first_token_kl", "code_defines", "code_length"} <= set(probed["probes"])
    assert probed["probes"]["first_token_kl"] >= 0
    folder = tmp_path / "out" / "runs" / "smar-seed0"
    import smar.hf

    assert "modality bias loaded" in smar.hf.load_model_folder(folder).note
    hard = smar.hf.load_model_folder(tmp_path / "out" / "runs" / "hard-seed1")
    bias = hard.regularizer.bias_parameters()[0].detach()
    assert float(bias[0, 2:].max()) == float(bias[1, :2].max()) == -30.0  # never trained
    # cached: stages and finished runs are read back, an unfinished run is redone
    (tmp_path / "out" / "runs" / "none-seed1" / "scores.json").unlink()
    before = json.loads((tmp_path / "out" / "runs" / "none-seed0" / "scores.json").read_text())
    again = run(cfg, tmp_path / "out", base=base, model_id="tiny", stages=tmp_path / "stages",
                progress=False, workers=1)  # fmt: skip
    assert again["timing"]["vision_align"] < 5
    assert again["stage1"] == res["stage1"]
    after = json.loads((tmp_path / "out" / "runs" / "none-seed0" / "scores.json").read_text())
    assert after == before
    assert again["runs"]["none-seed1"]["language"] == res["runs"]["none-seed1"]["language"]


def test_command_runs_the_smoke_experiment(tmp_path, monkeypatch, capsys):
    """`smar real run --smoke` through the command line, the model loader replaced by the tiny
    Llama (the real model's run is the slow test)."""
    from smar.cli import main
    from smar.testbed.real import base as real_base
    from smar.testbed.real import run as real_run

    tiny = _tiny_base()
    monkeypatch.setattr(real_base, "load_base", lambda root=None: tiny)
    monkeypatch.setattr(real_run, "cache_dir", lambda: tmp_path / "cache")
    out = tmp_path / "out"
    code = main(["real", "run", "--smoke", "--arms", "none,stop", "--seeds", "0", "--quiet",
                 "--precision", "fp32", "--workers", "2", "--align-steps", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Language retention" in printed and "| stop |" in printed
    assert json.loads((out / "results.json").read_text())["arms"]["stop"]["seeds"] == [0]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["none-seed0", "stop-seed0"]
    assert "in 2 process(es) side by side" in printed
    assert json.loads((out / "config.json").read_text())["align_steps"] == 3
    assert main(["real", "run", "--smoke", "--align-steps", "0", "--out", str(out)]) == 2
    assert "--align-steps must be positive" in capsys.readouterr().err


def test_runs_side_by_side_give_the_runs_of_one_process(tmp_path, monkeypatch):
    """`workers=2`: each run in its own process from the stage-1 weights gives the scores, the
    training log and the saved model of the same run in this process (one thread in both)."""
    from safetensors.torch import load_file

    from smar.testbed.real.run import RealConfig, run

    base = _tiny_base()
    cfg = RealConfig.smoke(arms=("none", "smar"), seeds=(0,))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers get one thread each, this process one below
    try:
        two = run(cfg, tmp_path / "two", base=base, model_id="tiny", stages=tmp_path / "stages",
                  progress=False, workers=2)  # fmt: skip
        torch.set_num_threads(1)
        one = run(cfg, tmp_path / "one", base=base, model_id="tiny", stages=tmp_path / "stages",
                  progress=False, workers=1)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert two["timing"]["workers"] == 2 and one["timing"]["workers"] == 1
    for name in ("none-seed0", "smar-seed0"):
        a, b = two["runs"][name], one["runs"][name]
        assert a["language"] == b["language"] and a["multimodal"] == b["multimodal"], name
        wa = load_file(tmp_path / "two" / "runs" / name / "model.safetensors")
        wb = load_file(tmp_path / "one" / "runs" / name / "model.safetensors")
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)
    assert two["arms"]["smar"]["mrd"] == one["arms"]["smar"]["mrd"]


@pytest.mark.slow
def test_real_smoke_run_on_smollm2(tmp_path):
    """The real model (downloaded once), every arm at tiny sizes, from the command line."""
    import subprocess
    import sys

    pytest.importorskip("gguf")
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "smar.cli", "real", "run", "--smoke", "--quiet",
                    "--arms", "none,smar,hard,stop,noimage", "--out", str(out)],
                   check=True)  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["stage1"]["knowledge_asked"] > 0  # SmolLM2 answers some of them right
    assert set(res["arms"]) == {"none", "smar", "hard", "stop", "noimage"}


def test_smar_analyze_reads_the_runs_with_their_bias(tmp_path, monkeypatch):
    """The runs' folders and the analysis samples the run writes go through `smar analyze`."""
    from smar.cli import main
    from smar.testbed.real.run import RealConfig, run

    cfg = RealConfig.smoke(arms=("none", "smar"), seeds=(0,))
    run(cfg, tmp_path / "out", base=_tiny_base(), model_id="tiny", stages=tmp_path / "stages",
        progress=False, workers=1)  # fmt: skip
    runs = tmp_path / "out" / "runs"
    data = tmp_path / "out" / "analyze" / "samples.jsonl"
    assert sum(1 for line in data.read_text().splitlines() if '"image"' in line) == 10
    page = tmp_path / "page"
    code = main(["analyze", str(runs / "none-seed0"), str(runs / "smar-seed0"), "--data",
                 str(data), "--out", str(page), "--quiet"])  # fmt: skip
    assert code == 0
    results = json.loads((page / "routing.json").read_text())
    assert len(results["runs"]) == 2


def test_router_lr_puts_routers_and_biases_in_their_own_group(tmp_path):
    """`router_lr`: the routers and the modality bias train at their own learning rate, the
    rest at `lr`, for an arm with a bias."""
    from smar.testbed.real.data import qa_chat
    from smar.testbed.real.model import CHAT_TEMPLATE, VisionSpec, build_vlm
    from smar.testbed.real.train import instruct

    lm, tok = _tiny_base()
    spec = VisionSpec(hidden_size=32, layers=1, heads=2)
    model, _, proc = build_vlm(lm, tok, vision=spec, chat_template=CHAT_TEMPLATE)
    trainer = instruct(model, proc, qa_chat(4, 0, "train"), str(tmp_path / "r"), arm="smar",
                       steps=1, batch=2, lr=1e-4, router_lr=1e-2)  # fmt: skip
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-4, 1e-2]
    bias = trainer.smar.bias_parameters()[0]
    assert any(p is bias for p in groups[1]["params"])
    assert not any(p is bias for p in groups[0]["params"])
