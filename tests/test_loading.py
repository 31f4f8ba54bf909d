"""Model folders through the tools, with and without their trained modality bias.

A tiny LLaVA (CLIP tower, Qwen3-MoE language model) is saved with its processor, its modality
bias trained here on PNG images and text (``smar_bias.safetensors``), then read by
``smar analyze`` and ``smar retention``. Each tool's answer is compared with an independent
computation on the model loaded by transformers: with the bias (``smar.hf.load_bias``) by
default, without it under ``--no-bias``, and the bias changes each answer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_analyze import _args, _jsonl, _llava_dir  # noqa: E402

import smar  # noqa: E402
import smar.hf  # noqa: E402
from smar.commands.analyze import main as analyze_main  # noqa: E402
from smar.hf.loading import load_model_folder  # noqa: E402
from smar.hf.source import HFEncoder, read_jsonl  # noqa: E402

DOCS = ["the small blue circle", "a big red square", "what is in the picture a red circle",
        "the big blue square the small red circle"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LLaVA folder whose modality bias was trained (band loss, 12 steps) on the samples."""
    root = tmp_path_factory.mktemp("trained")
    folder = root / "model"
    torch.manual_seed(0)
    _llava_dir(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "<unk>"  # lm-eval reads a document after an end-of-text token
    tok.save_pretrained(folder)
    data = _jsonl(root)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder)
    reg = smar.attach(model, smar.SMARConfig(band=(6.0, 8.0), lb_weight=0.0))
    encoder = HFEncoder(str(folder), model.config)
    batch = encoder(list(read_jsonl(data)))
    opt = torch.optim.Adam(reg.bias_parameters(), lr=1.0)
    for _ in range(12):
        model(**batch)
        opt.zero_grad()
        reg.loss().backward()
        opt.step()
    smar.hf.save_bias(reg, folder)
    reg.detach()
    return folder, data


def _plain(folder, bias: bool):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    if bias:
        smar.hf.load_bias(model, folder)
    return model


def _mrd_by_hand(folder, data, bias: bool) -> list[float]:
    """MRD per layer as docs/method.md#mrd defines it, from the router logits the language model
    records itself (``output_router_logits``), over every sample of ``data``."""
    model = _plain(folder, bias)
    image_id = model.config.image_token_index
    encoder = HFEncoder(str(folder), model.config)
    sums, got = None, {}
    h = model.model.language_model.register_forward_hook(lambda m, a, o: got.update(o=o))
    for i in range(0, 8, 3):
        batch = encoder(list(read_jsonl(data))[i : i + 3])
        try:
            with torch.no_grad():
                model(**batch, output_router_logits=True)
        except TypeError:  # transformers >= 5.24: the LLaVA wrapper cannot return them
            pass
        ids = batch["input_ids"].reshape(-1)
        valid = batch["attention_mask"].reshape(-1).bool()
        masks = [valid & (ids != image_id), valid & (ids == image_id)]  # text, image
        probs = [z.float().softmax(-1) for z in got["o"].router_logits]  # L x (T, E)
        part = torch.stack([torch.stack([p[m].sum(0) for m in masks]) for p in probs])
        count = torch.stack([m.sum() for m in masks]).float()
        sums = (part, count) if sums is None else (sums[0] + part, sums[1] + count)
    h.remove()
    P = (sums[0] / sums[1][None, :, None]).clamp_min(1e-9)  # (L, 2, E)
    return ((P[:, 0] - P[:, 1]) * (P[:, 0].log() - P[:, 1].log())).sum(-1).tolist()


@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "no_bias"])
def test_analyze_reports_the_model_with_its_trained_bias(trained, tmp_path, capsys, bias):
    folder, data = trained
    out = tmp_path / "out"
    argv = [str(folder), "--data", str(data), "--out", str(out), "--batch-size", "3", "--quiet"]
    assert analyze_main(_args(argv + ([] if bias else ["--no-bias"]))) == 0
    said = capsys.readouterr().out
    assert ("modality bias loaded" in said) == bias and ("not loaded (--no-bias)" in said) != bias
    mrd = json.loads((out / "routing.json").read_text())["runs"][0]["mrd"]
    torch.testing.assert_close(torch.tensor(mrd), torch.tensor(_mrd_by_hand(folder, data, bias)),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    other = _mrd_by_hand(folder, data, not bias)
    assert max(abs(a - b) for a, b in zip(mrd, other, strict=True)) > 0.1  # the bias matters


def test_loader_says_what_it_loaded_and_routes_as_trained(trained):
    folder, data = trained
    loaded = load_model_folder(folder)
    assert "modality bias loaded" in loaded.note and "LlavaForConditionalGeneration" in loaded.note
    batch = HFEncoder(str(folder), loaded.model.config)(list(read_jsonl(data))[:3])
    with torch.no_grad():
        mine = loaded.model(**batch).logits
        theirs = _plain(folder, bias=True)(**batch).logits
        without = _plain(folder, bias=False)(**batch).logits
    assert torch.equal(mine, theirs) and not torch.allclose(mine, without)
    bare = load_model_folder(folder, bias=False)
    assert bare.regularizer is None and "not loaded" in bare.note
    assert "trained modality bias for 2 routers" in smar.hf.inspect_model_dir(str(folder))


def _bits_per_byte(model, tok, docs) -> float:
    """Bits per byte of ``docs`` read as lm-eval's rolling log-likelihood reads them: each
    document after one end-of-text token, in one window (the documents are short)."""
    nll, nbytes = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[tok.eos_token_id, *tok(doc, add_special_tokens=False).input_ids]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        nbytes += len(doc.encode())
    return nll / nbytes / math.log(2)


def test_retention_reads_the_vlm_on_text_with_its_bias(trained, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from smar import retention

    folder, _ = trained
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_prose.yaml").write_text(
        f"task: toy_prose\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: text\nmetric_list:\n  - metric: bits_per_byte\n"
        "    aggregation: bits_per_byte\n    higher_is_better: false\n"
    )  # fmt: skip
    tm = retention.make_task_manager(tasks, local_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for bias in (True, False):
        got = retention.evaluate_tasks(folder, ["toy_prose"], task_manager=tm, bias=bias)
        want = _bits_per_byte(_plain(folder, bias), tok, DOCS)
        assert got["toy_prose"]["value"] == pytest.approx(want, rel=1e-7, abs=0), (bias, got, want)
    said = capsys.readouterr().err
    assert "modality bias loaded" in said and "not loaded (--no-bias)" in said
    with_bias = _bits_per_byte(_plain(folder, True), tok, DOCS)
    without = _bits_per_byte(_plain(folder, False), tok, DOCS)
    # The bias moves the score (4e-5 here) by far more than the agreement asked above (1e-7
    # relative): a tool that ignored it would fail.
    assert abs(with_bias - without) > 100 * 1e-7 * with_bias


def test_a_missing_image_is_one_line_or_skipped_and_counted(trained, tmp_path, capsys):
    folder, data = trained
    lines = data.read_text().splitlines()
    lines[2] = lines[2].replace("img1.png", "gone.png")
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("img0.png", "img1.png", "img2.png", "img3.png"):
        (tmp_path / name).write_bytes((data.parent / name).read_bytes())
    argv = [str(folder), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
            "--quiet"]  # fmt: skip
    assert analyze_main(_args(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:3" in err and "gone.png" in err
    assert "--skip-bad-images" in err
    assert analyze_main(_args(argv + ["--skip-bad-images"])) == 0
    assert "skipped 1 samples" in capsys.readouterr().out
