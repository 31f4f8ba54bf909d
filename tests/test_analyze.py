"""``smar analyze``: streamed statistics equal one-shot statistics, files for any number of layers
and experts, tiny random Qwen3-VL-MoE and LLaVA-Qwen3-MoE folders analysed from a JSONL file with
PNG images of several sizes (written here, no downloads), and a testbed run folder."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from smar.analyze import Source, analyze, hf_source, stream_stats, write_analysis
from smar.commands.analyze import add_parser, main
from smar.metrics import RoutingStats

pytest.importorskip("matplotlib")


def _batches(L, E, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ([torch.randn(T, E, generator=g) * 2 for _ in range(L)], torch.randint(-1, 2, (T,), generator=g))
        for T in sizes
    ]  # fmt: skip


def _source(name, L, E, k, sizes=(7, 30, 1, 12), seed=0, history=None):
    data = _batches(L, E, sizes, seed)
    return Source(name, lambda: iter(data), top_k=k, total=len(data), history=history)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_streamed_statistics_equal_one_shot_on_the_concatenated_data(router):
    data = _batches(3, 6, (5, 17, 1, 40, 9))
    streamed = stream_stats(iter(data), top_k=2, router=router, progress=False)
    cat = (
        [torch.cat([b[0][layer] for b in data]) for layer in range(3)],  # L x (T, E)
        torch.cat([b[1] for b in data]),  # (T,)
    )
    once = RoutingStats(router=router).update(*cat, top_k=2)
    # counts exactly; sums of probabilities and entropies up to float32 rounding (each batch's
    # sums are float32 matmuls before they are added in float64)
    assert streamed.select_count.equal(once.select_count) and streamed.tokens.equal(once.tokens)
    for name in ("prob_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(streamed, name), getattr(once, name), rtol=1e-6, atol=0)
    torch.testing.assert_close(streamed.mrd(), once.mrd())


@pytest.mark.parametrize("L, E, k", [(1, 2, 1), (5, 16, 4)])
def test_files_for_any_number_of_layers_and_experts(tmp_path, L, E, k):
    hist = [{"step": s, "mrd": [0.1 * s] * L} for s in (0, 25, 50)]
    runs = [analyze(_source("a", L, E, k, history=hist), progress=False)]
    if L == 1:  # two runs compared (once: plots cost time)
        runs.append(analyze(_source("b", L, E, k, seed=1), progress=False))
    paths = write_analysis(runs, tmp_path)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0, p
    assert {"mrd", "entropy", "usage_a", "composition_a", "history_a"} <= set(paths)
    assert ("comparison" in paths) == (len(runs) == 2)
    rec = json.loads((tmp_path / "routing.json").read_text())["runs"][0]
    assert rec["num_layers"] == L and rec["num_experts"] == E and len(rec["mrd"]) == L
    assert len(rec["load"]["image"]) == L and len(rec["load"]["image"][0]) == E
    # the raw sums rebuild the statistics exactly
    assert torch.tensor(rec["sums"]["select_count"]).double().equal(runs[0].stats.select_count)
    html = (tmp_path / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(paths) - 2
    assert "http" not in html.replace('lang="en"', "")  # no network reference


def test_exclusive_experts_are_flagged(tmp_path):
    E = 4
    z = torch.full((8, E), -9.0)
    z[:4, 0] = z[:4, 1] = 9.0  # text tokens always choose experts 0 and 1
    z[4:, 2] = z[4:, 3] = 9.0  # image tokens 2 and 3
    ids = torch.tensor([0] * 4 + [1] * 4)
    src = Source("x", lambda: iter([([z], ids)]), top_k=2)
    write_analysis([analyze(src, progress=False)], tmp_path)
    rec = json.loads((tmp_path / "routing.json").read_text())["runs"][0]
    assert [(x["expert"], x["modality"]) for x in rec["exclusive"]] == [
        (0, "text"), (1, "text"), (2, "image"), (3, "image")]  # fmt: skip


# ----------------------------------------------------------------------- tiny HF model folders
WORDS = "what is in the picture a red square blue circle small big the user assistant".split()
SPECIAL = ["<unk>", "<pad>", "<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == "
    "'image' %}IMAGE{% else %}{{ c['text'] }} {% endif %}{% endfor %}\n{% endfor %}"
)
TXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
           moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)  # fmt: skip


def _tokenizer(image_markup: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + [":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = TEMPLATE.replace("IMAGE", image_markup)
    return fast, vocab


def _llava_dir(path):
    import transformers

    tok, vocab = _tokenizer("<image>")
    vis = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vis, text_config=dict(model_type="qwen3_moe", **TXT),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=4, pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    ip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size=16)
    transformers.LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=tok.chat_template,
    ).save_pretrained(path)  # fmt: skip


def _qwen3_vl_moe_dir(path):
    """Tokenizer and image processor saved apart: Qwen3VLProcessor needs a video processor, and
    that needs torchvision (analyze then expands the image tokens as the processor would)."""
    import transformers

    tok, vocab = _tokenizer("<|vision_start|><|image_pad|><|vision_end|>")
    vis = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
               num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
            "mrope_interleaved": True}  # fmt: skip
    cfg = transformers.Qwen3VLMoeConfig(
        vision_config=vis, text_config=dict(rope_parameters=rope, **TXT),
        image_token_id=vocab["<|image_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"], video_token_id=63,
    )  # fmt: skip
    transformers.Qwen3VLMoeForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=8,
        temporal_patch_size=2, merge_size=2,
    ).save_pretrained(path)  # fmt: skip


def _jsonl(tmp_path, sizes=((16, 16), (40, 72), (23, 17), (64, 48))):
    """LLaVA-format samples with PNG images of several sizes, and plain text samples."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    lines = []
    for i, (h, w) in enumerate(sizes):
        img = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        lines.append({"id": i, "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture"},
            {"from": "gpt", "value": "a red square" if i % 2 else "a big blue circle"}]})  # fmt: skip
        lines.append({"text": "the small circle is blue " * (i + 1)})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _args(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["analyze", *argv])


@pytest.mark.parametrize(
    "build", [_llava_dir, _qwen3_vl_moe_dir], ids=["llava_qwen3_moe", "qwen3_vl_moe"]
)
def test_tiny_hf_models_analysed_from_a_jsonl_with_png_images(tmp_path, build):
    pytest.importorskip("transformers")
    model_dir = tmp_path / "model"
    build(model_dir)
    data = _jsonl(tmp_path)
    out = tmp_path / "out"
    assert main(_args([str(model_dir), "--data", str(data), "--out", str(out), "--batch-size",
                       "3", "--quiet"])) == 0  # fmt: skip
    rec = json.loads((out / "routing.json").read_text())["runs"][0]
    assert rec["num_layers"] == 2 and rec["num_experts"] == 4 and rec["top_k"] == 2
    assert rec["tokens"]["image"] >= 4 * 4 and rec["tokens"]["text"] > 0
    assert all(v is not None and v >= 0 for v in rec["mrd"])
    assert (out / "index.html").exists() and (out / "usage_model.png").exists()
    # batches only group samples: one sample per forward gives the same statistics (padding
    # is ignored); --max-samples stops early
    one = analyze(hf_source(model_dir, data, batch_size=1), progress=False).stats
    assert one.tokens.tolist() == [rec["tokens"]["text"], rec["tokens"]["image"]]
    for key in ("prob_sum", "select_count"):
        torch.testing.assert_close(getattr(one, key), torch.tensor(rec["sums"][key]).double(),
                                   rtol=1e-4, atol=1e-3)  # fmt: skip
    few = analyze(hf_source(model_dir, data, max_samples=1), progress=False).stats
    assert 0 < few.tokens[0] < one.tokens[0]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(_args([str(tmp_path / "nope"), "--quiet"])) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(_args([str(tmp_path), "--quiet"])) == 2
    assert "--data" in capsys.readouterr().err


# --------------------------------------------------------------------------------- testbed run
def test_testbed_run_folders_analysed_with_history(tmp_path, monkeypatch, slow_too=False):
    from smar.testbed import analyze_run
    from smar.testbed.config import smoke_config
    from smar.testbed.data.bundle import Bundle
    from smar.testbed.data.tokenizer import Tokenizer
    from smar.testbed.model import TinyModel
    from smar.testbed.overrides import to_dict

    cfg = smoke_config()
    text = "the red square is left of the blue circle. " * 40
    tok = Tokenizer.train([text], 200, tmp_path / "tok.json")
    bundle = Bundle(tok, torch.tensor(tok.encode(text * 4)), "")
    monkeypatch.setattr(analyze_run, "load_bundle", lambda c: bundle)
    out = tmp_path / "demo"
    runs = {}
    for k, arm in enumerate(("none", "smar")):
        torch.manual_seed(k)
        model = TinyModel(smoke_config().model)  # a fresh config: make_moe_ writes into it
        model.make_moe_(layers="all")
        name = f"{arm}_seed0"
        model.save(out / name)
        history = [{"step": s, "lm": 1.0, "aux": 0.0, "mrd": [0.5 * k + s / 100] * 2}
                   for s in (0, 25, 50)]  # fmt: skip
        (out / name / "run_config.json").write_text(json.dumps(
            {"run": to_dict(cfg), "job": {"name": name, "arm": arm, "seed": 0, "band": None}}))  # fmt: skip
        (out / name / "results.json").write_text(json.dumps({"history": history}))
        runs[name] = {}
    (out / "results.json").write_text(json.dumps({"runs": runs}))
    args = _args([str(out), "--max-samples", "24", "--quiet"])
    assert main(args) == 2  # the library alone does not read testbed runs
    assert main(args, run_loader=analyze_run.load_runs) == 0
    rec = json.loads((out / "analysis" / "routing.json").read_text())["runs"]
    assert [r["name"] for r in rec] == ["none_seed0", "smar_seed0"]
    assert rec[0]["tokens"]["image"] > 0 and rec[1]["history"][-1]["step"] == 50
    html = (out / "analysis" / "index.html").read_text()
    assert (
        "history_smar_seed0" not in html and (out / "analysis" / "history_smar_seed0.png").exists()
    )
    if slow_too:  # what `smar demo` calls beside report.md
        (out / "analysis" / "index.html").unlink()
        assert analyze_run.write_run_html(out)["html"] == out / "analysis" / "index.html"


@pytest.mark.slow
def test_write_run_html_for_a_pipeline_folder(tmp_path, monkeypatch):
    test_testbed_run_folders_analysed_with_history(tmp_path, monkeypatch, slow_too=True)
