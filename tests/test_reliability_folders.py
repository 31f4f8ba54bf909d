"""Model folders that are broken in the ways users break them, through `smar analyze`, `smar
retention`, `smar inspect` and `load_model_folder`: each is one line with exit code 2 (was a
traceback, a misleading fix, or a half-random model), and nothing in the folder changes. Bias
files trained on another model are warned about in one line, older ones without a record of
their routers load and say so, a bias file for routers the model lacks names the right fix;
`save_bias` overwrites atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
    tok = transformers.AutoTokenizer.from_pretrained(root / "good")
    tok.eos_token = "<unk>"  # lm-eval puts an end-of-text token before each document
    tok.save_pretrained(root / "good")
    (root / "tasks").mkdir()  # a local lm-eval task (never run: every case stops before)
    (root / "tasks" / "tiny_text.yaml").write_text(
        "task: tiny_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{root / 'rows.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
    )
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


def _garble(name):
    return lambda d: (d / name).write_text("{not json")


def _dir_for(name):
    def damage(d):
        if (d / name).exists():
            os.remove(d / name)
        (d / name).mkdir()

    return damage


def _no_eos(d):
    c = json.loads((d / "tokenizer_config.json").read_text())
    c.pop("eos_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(c))


_RESTORE = r"; fix: restore the config\.json saved with these weights"
CASES = [
    ("missing_weights", lambda d: os.remove(d / "model.safetensors"),
     r"has no weights \(model\.safetensors\); fix: write them with save_pretrained"),
    ("weights_a_folder", _dir_for("model.safetensors"),
     r"has no weights \(model\.safetensors\); fix: write them with save_pretrained"),
    ("missing_tokenizer", lambda d: [os.remove(d / f) for f in ("tokenizer.json",
                                                                "tokenizer_config.json")],
     r"has no tokenizer .*; fix: save it into the folder"),
    ("tokenizer_json_garbled", _garble("tokenizer.json"),
     r"tokenizer\.json is not readable JSON \(.*\); fix: restore it: save the tokenizer again"),
    ("missing_shard", _shard, r"names shards that are not there: .*; fix: copy every shard"),
    ("config_json_a_folder", _dir_config,
     r"has a folder where config\.json should be; fix: pass a folder written by save_pretrained"),
    ("config_garbled", _garble("config.json"),
     r"config\.json is not readable JSON \(.*\)" + _RESTORE),
    ("config_more_layers", _edit_config(num_hidden_layers=3),
     r"config\.json does not match its weights \(11 missing, e\.g\. .*layers\.2.*\)" + _RESTORE),
    ("config_fewer_layers", _edit_config(num_hidden_layers=1),
     r"config\.json does not match its weights \(11 unexpected, e\.g\. .*layers\.1.*\)"
     + _RESTORE),
    ("config_other_width", _edit_config(moe_intermediate_size=48),
     r"does not match its weights \(4 of another shape, e\.g\. .*experts\.down_proj saved "
     r"\[4, 32, 32\], config\.json makes \[4, 32, 48\]\)" + _RESTORE),
    ("config_num_experts", _edit_config(num_local_experts=8),
     r"does not match its weights \(6 of another shape, e\.g\. .* saved \[4, .*\], "
     r"config\.json makes \[8, .*\]\)" + _RESTORE),
    ("config_hidden_size", _edit_config(hidden_size=64),
     r"does not match its weights \(25 of another shape, e\.g\. lm_head\.weight saved "
     r"\[64, 32\], config\.json makes \[64, 64\]\)" + _RESTORE),
    ("config_top_k_above_experts", _edit_config(num_experts_per_tok=6),
     r"config\.json makes .*mlp\.gate choose top_k=6 of its 4 experts; fix: set "
     r"num_experts_per_tok to at most 4"),
    ("bias_a_folder", _dir_for("smar_bias.safetensors"),
     r"has a folder where smar_bias\.safetensors should be; fix: remove it, or pass .*--no-bias"),
    ("image_token_on_a_text_token", lambda d: _edit_top(d, image_token_index=3),
     r"config\.json's image token id 3 is not the processor's image token '<image>' \(id 2\).*"
     r"fix: set image_token_index \(image_token_id\) to 2"),
    ("processor_config_garbled", _garble("processor_config.json"),
     r"processor_config\.json is not readable JSON \(.*\); fix: restore it"),
]  # fmt: skip
# the cases smar retention (text only: no processor, no image token) refuses as analyze does
RETENTION = [c for c in CASES if not c[0].startswith(("image_", "processor_"))] + [
    ("tokenizer_without_bos_or_eos", _no_eos,
     r"its tokenizer has neither a bos nor an eos token.*; fix: set eos_token .* in "
     r"tokenizer_config\.json"),
]  # fmt: skip


def _refused(tmp_path, capsys, folder, name, damage, pattern, argv) -> None:
    """A damaged copy of ``folder``, a command on it (``argv(copy)``): exit 2, one ``smar:`` line
    matching ``pattern``, and the copy unchanged."""
    d = tmp_path / name
    shutil.copytree(folder, d)
    damage(d)
    before = _hashes(d)
    code = main(argv(d))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smar:")]
    assert code == 2 and len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]
    assert _hashes(d) == before


@pytest.mark.parametrize("name,damage,pattern", CASES, ids=[c[0] for c in CASES])
def test_smar_analyze_on_a_broken_folder_is_one_line_exit_2(good, tmp_path, capsys, name, damage,
                                                            pattern):  # fmt: skip
    folder, data = good
    _refused(tmp_path, capsys, folder, name, damage, pattern, lambda d: [
        "analyze", str(d), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"])


@pytest.mark.parametrize("name,damage,pattern", RETENTION, ids=[c[0] for c in RETENTION])
def test_smar_retention_on_a_broken_folder_is_one_line_exit_2(good, tmp_path, capsys, name,
                                                              damage, pattern):  # fmt: skip
    pytest.importorskip("lm_eval")
    folder, _ = good
    _refused(tmp_path, capsys, folder, name, damage, pattern, lambda d: [
        "retention", "--base", str(d), "--tuned", str(folder), "--tasks", "tiny_text",
        "--include-path", str(folder.parent / "tasks"), "--local-only",
        "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert not (tmp_path / "r.json").exists()


INSPECT = [c for c in CASES if c[0] == "config_json_a_folder"] + [
    ("config_garbled", _garble("config.json"), r"config\.json is not valid JSON \(.*\)" + _RESTORE),
]  # fmt: skip


@pytest.mark.parametrize("name,damage,pattern", INSPECT, ids=[c[0] for c in INSPECT])
def test_smar_inspect_on_a_broken_config_is_one_line_exit_2(good, tmp_path, capsys, name, damage,
                                                            pattern):  # fmt: skip
    _refused(tmp_path, capsys, good[0], name, damage, pattern, lambda d: ["inspect", str(d)])


def test_a_missing_file_is_still_a_file_not_found_error(good, tmp_path):
    from smar.hf.loading import load_model_folder

    folder, _ = good
    shutil.copytree(folder, tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has no weights"):
        load_model_folder(tmp_path / "m")
    with pytest.raises(smar.UsageError, match=r"has no weights"):
        load_model_folder(tmp_path / "m")


def test_testbed_tasks_given_to_hugging_face_folders_say_so(good, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    folder, _ = good
    code = main(["retention", "--base", str(folder), "--tuned", str(folder), "--tasks",
                 "testbed_text", "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'testbed_text' is a task of the testbed's own models" in err
    assert "fix: name lm-eval tasks for them" in err


def _with_bias(folder, dst, *, other_routers: bool = False):
    """``folder`` copied to ``dst`` with a random modality bias saved beside it, trained (here:
    drawn) on the folder's model, or on one whose router weights differ (another checkpoint of it
    with the same router names)."""
    shutil.copytree(folder, dst)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(dst)
    if other_routers:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.add_(torch.randn_like(p) * p.std())
    reg = smar.attach(model, smar.SMARConfig())
    with torch.no_grad():
        for b in reg.bias_parameters():
            b.normal_()
    smar.hf.save_bias(reg, dst)
    saved = [b.detach().clone() for b in reg.bias_parameters()]
    reg.detach()
    return dst, saved


def _rewrite_bias(d, edit):
    """The bias file with its metadata edited (the tensors and their checksum kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(d / "smar_bias.safetensors"), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(d / "smar_bias.safetensors"), metadata=meta)


def _analyze(d, data, out, capsys):
    code = main(["analyze", str(d), "--data", str(data), "--out", str(out), "--quiet"])
    got = capsys.readouterr()
    return code, got.out, [line for line in got.err.splitlines() if line.startswith("smar:")]


def test_smar_analyze_warns_in_one_line_about_a_bias_of_other_router_weights(good, tmp_path,
                                                                             capsys):  # fmt: skip
    folder, data = good
    own, _ = _with_bias(folder, tmp_path / "own")
    code, out, err = _analyze(own, data, tmp_path / "a", capsys)
    assert code == 0 and err == [], err  # its own model: loaded without a word
    assert "modality bias loaded (smar_bias.safetensors, 2 routers)" in out
    foreign, _ = _with_bias(folder, tmp_path / "foreign", other_routers=True)
    before = _hashes(foreign)
    code, out, err = _analyze(foreign, data, tmp_path / "b", capsys)
    assert code == 0 and len(err) == 1, err
    assert re.fullmatch(r"smar: warning: .*foreign/smar_bias\.safetensors was trained with other "
                        r"router weights than this model's .*; fix: load it into the model saved "
                        r"beside it, or leave it out \(bias=False / --no-bias\)", err[0]), err[0]  # fmt: skip
    assert "2 routers, trained with other router weights than this model's" in out
    assert _hashes(foreign) == before


def test_an_older_bias_file_without_its_record_loads_and_says_so(good, tmp_path, caplog):
    from smar.hf.loading import load_model_folder

    folder, _ = good
    d, saved = _with_bias(folder, tmp_path / "old")
    _rewrite_bias(d, lambda meta: meta.pop("routers"))
    before = _hashes(d)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="smar.hf.saving"):
        warnings.simplefilter("error")  # not a warning: the file is valid, only unchecked
        loaded = load_model_folder(d)
    assert "an older file that does not record its routers, so not checked" in loaded.note
    assert "records no router weights (saved by an older smar)" in caplog.text
    got = loaded.regularizer.bias_parameters()
    assert all(torch.equal(a, b) for a, b in zip(saved, got, strict=True))
    assert _hashes(d) == before


def test_a_bias_file_for_routers_the_model_lacks_names_the_file_and_its_fix(good, tmp_path,
                                                                           capsys):  # fmt: skip
    folder, data = good
    d, _ = _with_bias(folder, tmp_path / "attn")

    def attention(meta):
        config = json.loads(meta["smar_config"])
        meta["smar_config"] = json.dumps({**config, "routers": "attention"})

    _rewrite_bias(d, attention)
    before = _hashes(d)
    code, _, err = _analyze(d, data, tmp_path / "a", capsys)
    assert code == 2 and len(err) == 1, err
    assert re.search(r"attn/smar_bias\.safetensors was trained on attention routers \(its "
                     r"smar_config routers='attention'\), which LlavaForConditionalGeneration "
                     r"does not have \(it has mlp routers\); fix: load it into the model it was "
                     r"trained with, or leave it out", err[0]), err[0]  # fmt: skip
    assert _hashes(d) == before
    # a config the caller passes is the caller's to change: attach's own fix, no wrapper left
    model = transformers.LlavaForConditionalGeneration.from_pretrained(d)
    with pytest.raises(smar.UsageError, match=r"fix: pass SMARConfig\(routers='mlp'\)"):
        smar.hf.load_bias(model, d, config=smar.SMARConfig(routers="attention"))
    assert not any("modality_bias" in n for n, _ in model.named_parameters())


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
    assert float(loaded.bias_parameters()[0].detach().min()) == 1.0
