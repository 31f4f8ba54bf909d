"""``smar retention``: lm-evaluation-harness on two models, retention per task. The testbed's text
benchmarks exported as lm-eval tasks and served by :class:`ServedLM` score what the testbed's own
evaluation scores; a model against itself retains 1.0; a missing task or model is one clear line.

The fast tests use a small random testbed model and a tokenizer trained here (no pipeline, no
download); the slow one runs ``smar demo --smoke`` and compares with its results.json.
"""

import argparse
import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from smar import retention  # noqa: E402
from smar.commands import retention as retention_command  # noqa: E402
from smar.testbed.config import smoke_config  # noqa: E402
from smar.testbed.data import skills  # noqa: E402
from smar.testbed.data.bundle import Bundle  # noqa: E402
from smar.testbed.data.tokenizer import Tokenizer  # noqa: E402
from smar.testbed.evaluate import eval_sets, evaluate_model  # noqa: E402
from smar.testbed.lm_eval_tasks import (  # noqa: E402
    GROUP,
    TASKS,
    export_tasks,
    load_model,
    open_pair,
    recorded_config,
    text_scores,
)
from smar.testbed.lm_eval_tasks import (
    TestbedLM as ServedLM,  # (not Test*: pytest would collect it)
)
from smar.testbed.model import TinyModel  # noqa: E402
from smar.testbed.scoring import choice_correct  # noqa: E402
from smar.testbed.stages import model_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random smoke-sized testbed model, its tokenizer and bundle, the tasks exported, and a
    TaskManager over them alone (indexing lm-eval's own tasks takes many seconds)."""
    root = tmp_path_factory.mktemp("retention")
    cfg = smoke_config()
    cfg.data.eval_text, cfg.data.eval_mm, cfg.data.prose_bytes = 60, 4, 3000
    prose = skills.skill_text(300, 7)  # any text will do as held-out prose
    tok = Tokenizer.train([skills.skill_text(600, 1), prose], 512, root / "tok.json")
    bundle = Bundle(tok, torch.zeros(1, dtype=torch.long), prose)
    mcfg = model_config(cfg, tok)  # the stage-1 model's config
    torch.manual_seed(0)
    model = TinyModel(mcfg).eval()
    tasks = export_tasks(cfg, root / "tasks", bundle)
    tm = retention.make_task_manager(tasks, local_only=True)
    return dict(root=root, cfg=cfg, tok=tok, bundle=bundle, model=model, tasks=tasks, tm=tm)


def test_lm_eval_path_gives_the_testbeds_own_scores(tiny):
    scores, extra = evaluate_model(
        tiny["model"], tiny["cfg"], tiny["bundle"], eval_sets(tiny["cfg"], tiny["bundle"])
    )
    lm = ServedLM(tiny["model"], tiny["tok"])
    got = retention.evaluate_tasks(lm, [GROUP], task_manager=tiny["tm"])
    assert set(got) == set(TASKS)
    mine = text_scores(got)
    for name, value in mine.items():
        assert value == pytest.approx(scores[name], rel=1e-6, abs=1e-9), name
    assert got["testbed_prose"]["value"] == pytest.approx(extra["prose_bpb"], rel=1e-6)
    # accuracies are counts over the same examples: exactly equal
    assert all(mine[k] == scores[k] for k in mine if k != "text/prose")


def test_a_model_against_itself_retains_everything(tiny):
    lm = ServedLM(tiny["model"], tiny["tok"])
    out = retention.measure_retention(lm, lm, [GROUP], task_manager=tiny["tm"])
    assert set(out["tasks"]) == set(TASKS)
    assert all(t["retention"] == 1.0 for t in out["tasks"].values())
    assert out["mean"] == 1.0 and out["mean_wo_outlier"] == 1.0
    json.dumps(out)  # JSON-ready


def test_ties_count_wrong_in_the_exported_tasks(tiny):
    spec = importlib.util.spec_from_file_location("utils", tiny["tasks"] / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for lls, answer in [([-1, -1, -2], 0), ([-1, -2, -3], 0), ([-3, -1, -1], 2), ([-2, -1], 0)]:
        acc = utils.process_results({"answer": answer}, [(v, False) for v in lls])["acc"]
        assert acc == float(choice_correct([lls], [answer])[0])


def test_loglikelihood_and_greedy_match_a_plain_forward(tiny):
    """ServedLM against the obvious reference: one forward over [bos] + context + continuation
    per request (requests with shared contexts and multi-token continuations, as lm-eval sends
    them for loglikelihood and multiple-choice tasks)."""
    model, tok = tiny["model"], tiny["tok"]
    ctx = ["The opposite of hot is", "Letters: a b", "", "One cat, two"]
    conts = [" cold", " cold and wet", " c", " cats", " dog", ""]
    reqs = [
        Instance("loglikelihood", {}, (c, x), idx=j, metadata=("t", i, 1))
        for i, c in enumerate(ctx)
        for j, x in enumerate(conts)
    ]
    got = ServedLM(model, tok).loglikelihood(reqs)
    with torch.no_grad():  # the reference
        for r, (ll, greedy) in zip(reqs, got, strict=True):
            c, x = tok.encode(r.args[0]), tok.encode(r.args[1])
            if not x:
                assert (ll, greedy) == (0.0, True)
                continue
            ids = torch.tensor([[tok.bos_id] + c + x])
            logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]  # (S, V)
            pos = torch.arange(len(c), len(c) + len(x))
            assert ll == pytest.approx(float(logp[pos, torch.tensor(x)].sum()), abs=1e-4)
            assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(x)).all())


@torch.no_grad()
def test_rolling_windows_cover_every_token_once(tiny):
    model, tok = tiny["model"], tiny["tok"]
    text = tiny["bundle"].held_out[:1500]
    (got,) = ServedLM(model, tok).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)]
    )
    ids, S, total = [tok.bos_id] + tok.encode(text), model.cfg.max_seq_len, 0.0
    for s in range(0, len(ids) - 1, S):  # each window: the token before it, then its own
        lo = max(0, min(s, len(ids) - 1 - S))
        w = torch.tensor([ids[lo : s + S + 1][: S + 1]])
        logp = torch.log_softmax(model(w[:, :-1]).logits.float(), -1)[0]
        k = s - lo  # predictions before k were scored by the previous window
        total += float(logp[torch.arange(k, w.shape[1] - 1), w[0, k + 1 :]].sum())
    assert got == pytest.approx(total, rel=1e-5)


def test_generate_until_says_it_is_not_supported(tiny):
    with pytest.raises(NotImplementedError, match="log-likelihood only"):
        ServedLM(tiny["model"], tiny["tok"]).generate_until([])


def test_unknown_task_is_one_clear_error(tiny):
    lm = ServedLM(tiny["model"], tiny["tok"])
    with pytest.raises(
        ValueError, match=r"unknown lm-eval task 'testbed_alfabet'.*testbed_alphabet"
    ):
        retention.evaluate_tasks(lm, ["testbed_alfabet"], task_manager=tiny["tm"])
    with pytest.raises(ValueError, match="no task given"):
        retention.check_tasks([], tiny["tm"])


def test_missing_or_invalid_model_folder_is_one_clear_error(tiny, tmp_path):
    lm = ServedLM(tiny["model"], tiny["tok"])
    kw = dict(task_manager=tiny["tm"])
    with pytest.raises(ValueError, match="does not exist; fix"):
        retention.measure_retention(tmp_path / "nope", lm, [GROUP], **kw)
    with pytest.raises(ValueError, match="no readable config.json.*fix"):
        retention.measure_retention(lm, tmp_path, [GROUP], **kw)
    tiny["model"].save(tmp_path / "tb")
    with pytest.raises(ValueError, match="not a Hugging Face model folder.*testbed"):
        retention.measure_retention(lm, tmp_path / "tb", [GROUP], **kw)
    with pytest.raises(ValueError, match="holds no testbed model"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="no testbed run config.*run folder"):
        recorded_config(tmp_path / "tb")
    with pytest.raises(ValueError, match="tokenizer"):
        ServedLM(tiny["model"], Tokenizer.train(["abc " * 50], 300, tmp_path / "t.json"))


def _cli(argv, open_models=open_pair) -> int:
    parser = argparse.ArgumentParser(prog="smar")
    retention_command.add_parser(parser.add_subparsers(dest="command"))
    return retention_command.main(parser.parse_args(argv), open_models=open_models)


def test_cli_errors_are_one_line_with_exit_code_2(tiny, tmp_path, capsys):
    tiny["model"].save(tmp_path / "tb")
    cases = [
        (["--base", str(tmp_path / "nope"), "--tuned", str(tmp_path / "tb")], "does not exist"),
        (
            ["--base", str(tmp_path / "tb"), "--tuned", str(tmp_path / "tb")],
            "no testbed run config",
        ),
        (["--base", str(tmp_path), "--tuned", str(tmp_path)], "no readable config.json"),
    ]
    for argv, words in cases:
        assert _cli(["retention", *argv, "--tasks", GROUP, "--local-only"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1 and err.startswith("smar: error:")
    argv = ["--base", str(tmp_path), "--tuned", str(tmp_path), "--metric", "x"]
    assert _cli(["retention", *argv, "--tasks", GROUP]) == 2
    assert "TASK=METRIC" in capsys.readouterr().err


def test_summary_inverts_lower_is_better_and_drops_the_most_moved():
    def s(v, higher=True):
        return {
            "metric": "m,none",
            "value": v,
            "higher_is_better": higher,
            "score": v if higher else 1 / v,
        }

    base = {"a": s(0.8), "b": s(2.0, False), "c": s(0.5)}
    tuned = {"a": s(0.4), "b": s(2.5, False), "c": s(0.5)}
    out = retention.summarize(base, tuned)
    assert out["tasks"]["a"]["retention"] == pytest.approx(0.5)
    assert out["tasks"]["b"]["retention"] == pytest.approx(0.8)  # bpb 2.0 -> 2.5
    assert out["outlier"] == "a" and out["mean_wo_outlier"] == pytest.approx(0.9)
    assert out["mean"] == pytest.approx((0.5 + 0.8 + 1.0) / 3)


@pytest.mark.slow
def test_smoke_pipeline_retention_matches_its_results(tmp_path, monkeypatch):
    """`smar demo --smoke`, then the retention command on its stage-2 model and a tuned run: the
    lm-eval scores equal the pipeline's own (results.json, 1000 examples per task)."""
    from smar import cli
    from smar.testbed.stages import stage_dir

    monkeypatch.setenv("SMAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--smoke", "--quiet", "--out", "out", "arms=none"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    base = stage_dir(smoke_config(), "align")
    argv = ["--base", str(base), "--tuned", "out/none_seed0", "--tasks", GROUP, "--local-only"]
    assert _cli(["retention", *argv, "--out", "ret.json"]) == 0
    report = json.loads((tmp_path / "ret.json").read_text())
    for who, scores in (
        ("base", results["base"]["scores"]),
        ("tuned", results["runs"]["none_seed0"]["scores"]),
    ):
        for task, row in report["tasks"].items():
            mine = row[who] if row["higher_is_better"] else 1 / row[who]
            assert mine == pytest.approx(scores[TASKS[task]], rel=1e-6), (who, task)
    assert math.isfinite(report["mean"]) and report["outlier"] in TASKS


@pytest.mark.slow
def test_hf_folder_is_served_by_lm_evals_hf_model(tiny, tmp_path):
    """A local Hugging Face folder (a tiny random Llama with the testbed's tokenizer) goes
    through lm-eval's own "hf" model; against itself it retains 1.0."""
    transformers = pytest.importorskip("transformers")
    tok = tiny["tok"]
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok._tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(tmp_path)
    out = retention.measure_retention(
        tmp_path, tmp_path, [GROUP], task_manager=tiny["tm"], limit=20
    )
    assert set(out["tasks"]) == set(TASKS)
    assert all(t["retention"] == 1.0 for t in out["tasks"].values())
