"""Model folders that are broken in the ways users break them, through `smar analyze` and `smar
retention`: each is one line with exit code 2 (was a traceback, a misleading fix, or a
half-random model), and nothing in the folder changes. Bias files trained on another model are
warned about; `save_bias` overwrites atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_analyze import _jsonl, _llava_dir  # noqa: E402

import smar  # noqa: E402
import smar.hf  # noqa: E402
from smar.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    _llava_dir(root / "good")
    return root / "good", _jsonl(root)


def _hashes(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _edit_config(**text):
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        c["text_config"].update(text)
        (d / "config.json").write_text(json.dumps(c))

    return edit


def _edit_top(d, **top):
    c = json.loads((d / "config.json").read_text())
    c.update(top)
    (d / "config.json").write_text(json.dumps(c))


def _shard(d):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(d)
    os.remove(d / "model.safetensors")
    model.save_pretrained(d, max_shard_size="50KB")
    os.remove(sorted(d.glob("model-*.safetensors"))[0])


def _dir_config(d):
    os.remove(d / "config.json")
    (d / "config.json").mkdir()


CASES = [
    ("missing_weights", lambda d: os.remove(d / "model.safetensors"),
     r"has no weights \(model\.safetensors\); fix: write them with save_pretrained"),
    ("missing_tokenizer", lambda d: [os.remove(d / f) for f in ("tokenizer.json",
                                                                "tokenizer_config.json")],
     r"has no tokenizer .*; fix: save it into the folder"),
    ("missing_shard", _shard, r"names shards that are not there: .*; fix: copy every shard"),
    ("config_json_a_folder", _dir_config,
     r"has a folder where config\.json should be; fix: pass a folder written by save_pretrained"),
    ("config_more_layers", _edit_config(num_hidden_layers=3),
     r"config\.json does not match its weights \(11 missing, e\.g\. .*layers\.2.*\); fix: restore "
     r"the config\.json saved with these weights"),
    ("config_other_width", _edit_config(moe_intermediate_size=48),
     r"config\.json does not match its weights \(shapes differ\); fix: restore"),
    ("image_token_on_a_text_token", lambda d: _edit_top(d, image_token_index=3),
     r"config\.json's image token id 3 is not the processor's image token '<image>' \(id 2\).*"
     r"fix: set image_token_index \(image_token_id\) to 2"),
    ("processor_config_garbled", lambda d: (d / "processor_config.json").write_text("{not json"),
     r"processor_config\.json is not readable JSON \(.*\); fix: restore it"),
]  # fmt: skip


@pytest.mark.parametrize("name,damage,pattern", CASES, ids=[c[0] for c in CASES])
def test_smar_analyze_on_a_broken_folder_is_one_line_exit_2(good, tmp_path, capsys, name, damage,
                                                            pattern):  # fmt: skip
    import re

    folder, data = good
    d = tmp_path / name
    shutil.copytree(folder, d)
    damage(d)
    before = _hashes(d)
    code = main(["analyze", str(d), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--quiet"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smar:")]
    assert code == 2 and len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]
    assert _hashes(d) == before


def test_testbed_tasks_given_to_hugging_face_folders_say_so(good, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    folder, _ = good
    code = main(["retention", "--base", str(folder), "--tuned", str(folder), "--tasks",
                 "testbed_text", "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'testbed_text' is a task of the testbed's own models" in err
    assert "fix: name lm-eval tasks for them" in err


def _qwen3_moe(seed):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      moe_intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      num_experts=4, num_experts_per_tok=2, head_dim=16)  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def test_a_bias_file_of_another_model_is_warned_about(tmp_path):
    trained = _qwen3_moe(0)
    reg = smar.attach(trained, smar.SMARConfig())
    with torch.no_grad():
        for b in reg.bias_parameters():
            b.normal_()
    smar.hf.save_bias(reg, tmp_path)
    saved = [b.detach().clone() for b in reg.bias_parameters()]
    reg.detach()
    with warnings.catch_warnings():  # the model it was trained with: no warning
        warnings.simplefilter("error")
        smar.hf.load_bias(trained, tmp_path).detach()
        bf16 = _qwen3_moe(0).to(torch.bfloat16)  # the same weights in another dtype
        smar.hf.load_bias(bf16, tmp_path).detach()
    other = _qwen3_moe(1)  # same router names, other weights
    with pytest.warns(UserWarning, match=r"smar_bias\.safetensors was trained with other router "
                      r"weights than this model's .*load it into the model saved beside it"):  # fmt: skip
        reg = smar.hf.load_bias(other, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(saved, reg.bias_parameters(), strict=True))


def test_save_bias_overwrites_atomically_and_says_so(tmp_path, caplog):
    model = _qwen3_moe(0)
    reg = smar.attach(model, smar.SMARConfig())
    first = smar.hf.save_bias(reg, tmp_path)
    old = (tmp_path / "smar_bias.safetensors").read_bytes()
    with torch.no_grad():
        reg.bias_parameters()[0].fill_(1.0)
    with caplog.at_level(logging.INFO, logger="smar.hf.saving"):
        assert smar.hf.save_bias(reg, tmp_path) == first
    assert "overwriting" in caplog.text
    assert (tmp_path / "smar_bias.safetensors").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smar_bias.safetensors"]  # no temp
    again = _qwen3_moe(0)
    loaded = smar.hf.load_bias(again, tmp_path)
    assert float(loaded.bias_parameters()[0].min()) == 1.0
