"""Every bad input to ``smar`` is answered before any work in one line naming the problem and the
fix, with exit code 2; ``--debug`` adds the traceback (issue 12's table, one row per case)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from smar import cli
from smar.testbed.validate import MIN_TEXT_CHARS

# (override(s), what the one line must say)
OVERRIDES = [
    (["tune.steps=-5"], "tune.steps=-5 must be at least 1"),
    (["tune.batch_size=0"], "tune.batch_size=0 must be at least 1"),
    (["seeds="], "seeds= is empty; fix: give at least one seed"),
    (["tune=1"], "tune is a section; fix: set a field: tune.steps="),
    (["bands=2,1"], "write pairs as low:high, e.g. 1.5:2,0:0"),
    (["bands=2:1"], "bands=2:1: low is above high; fix: write 1:2"),
    (["tune.band=2,1"], "tune.band=2:1: low is above high"),
    (["tune.band=-1,1"], "low must be >= 0"),
    (["seeds=0,0"], "seeds=0,0: 0 appears twice; fix: give each value once"),
    (["arms=none,none"], "arms=none,none: none appears twice"),
    (["arms="], "arms= is empty"),
    (["arms=smr"], "unknown arm 'smr' in arms=; fix: did you mean smar?"),
    (["tune.stpes=3"], "unknown field 'stpes' in tune; fix: did you mean tune.steps?"),
    (["sedes=1"], "unknown field 'sedes'; fix: did you mean seeds?"),
    (["seeds.x=1"], "'seeds' is not a section"),
    (["tune.lr=abc"], "cannot parse 'abc': expected a number"),
    (["tune.steps=1.5"], "cannot parse '1.5': expected an integer"),
    (["controls=maybe"], "expected true or false"),
    (["tune.lr=nan"], "tune.lr=nan must be a finite number above 0"),
    (["pretrain.lr=0"], "pretrain.lr=0.0 must be a finite number above 0"),
    (["tune.text_ratio=1.5"], "tune.text_ratio=1.5 must be between 0 and 1"),
    (["tune.top_k=5"], "tune.top_k=5 must be in [1, tune.num_experts=4]"),
    (["tune.base=dense"], "tune.base must be one of"),
    (["tune.trainable=moee"], "fix: did you mean moe?"),
    (["tune.layers=odd"], "tune.layers='odd' is not one of all, alternate"),
    (["model.dim=33"], "dim=33 must split into n_heads=2 even heads"),
    (["data.vocab_size=100"], "data.vocab_size=100 must be at least 260"),
    (["workers=0"], "workers=0 must be at least 1"),
    (["tune.steps=3", "tune.steps=4"], "tune.steps is given twice"),
    (["text_ratios=0.1,0.1000001"], "two runs would both write"),
    (["lrs=0.1,0.1"], "lrs=0.1,0.1: 0.1 appears twice"),
    (["foo"], "must look like section.field=value"),
    (["data.text_files=/no/such/file.txt"], "data.text_files: /no/such/file.txt not found"),
    (["seeds=1000000000000000000000"], "seeds=1000000000000000000000 must be at most 2147483647"),
    (["seeds=18446744073709551616"], "seeds=18446744073709551616 must be at most 2147483647"),
    (["data.seed=4294967296"], "data.seed=4294967296 must be at most 2147483647"),
    (["out="], "the output folder is given twice"),  # the command passes --out too
]


def _one_line(capsys, argv, rc=2) -> str:
    assert cli.main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("overrides", "says"), OVERRIDES, ids=lambda x: " ".join(x))
def test_bad_override_is_one_line_exit_2(overrides, says, capsys, tmp_path):
    err = _one_line(
        capsys, ["demo", "--smoke", "--quiet", "--out", str(tmp_path / "o"), *overrides]
    )
    assert err.startswith("smar: error: ") and says in err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_sweep_reads_bands_as_demo_does(capsys):
    err = _one_line(capsys, ["sweep", "bands=2,1"])
    assert "write pairs as low:high" in err
    assert "low is above high" in _one_line(capsys, ["sweep", "bands=2:1"])


def _text(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"0123456789", f"hold 10 characters of text; the testbed needs at least {MIN_TEXT_CHARS}"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 50, "is binary, not text"),
        (b"caf\xe9 " * 50, "is not UTF-8 text"),
    ],
    ids=["empty", "blank", "10-bytes", "binary", "latin1"],
)
def test_bad_text_file_is_named(data, says, capsys, tmp_path):
    f = _text(tmp_path, "in.txt", data)
    err = _one_line(
        capsys, ["demo", "--smoke", "--out", str(tmp_path / "o"), f"data.text_files={f}"]
    )
    assert says in err and ("in.txt" in err or "characters" in err)


def test_same_text_file_twice_and_a_folder(capsys, tmp_path):
    f = _text(tmp_path, "a.txt", b"Some prose. " * 3000)
    err = _one_line(capsys, ["demo", "--smoke", f"data.text_files={f},{f}"])
    assert "appears twice" in err
    err = _one_line(capsys, ["demo", "--smoke", f"data.text_files={tmp_path}"])
    assert "is not a file" in err


def test_out_that_is_a_file(capsys, tmp_path):
    f = _text(tmp_path, "taken", b"x")
    assert "is a file" in _one_line(capsys, ["demo", "--smoke", "--out", f])


def test_argparse_errors_are_one_line(capsys):
    assert "unrecognized arguments: --bogus" in _one_line(capsys, ["demo", "--bogus"])
    assert "invalid choice" in _one_line(capsys, ["demoo"])


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["demo", "--smoke", "tune.steps=-5", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(
        "smar: error: tune.steps=-5 must be at least 1"
    )


def test_inspect_bad_paths(capsys, tmp_path):
    err = _one_line(capsys, ["inspect", str(tmp_path / "missing")])
    assert "missing: no such directory" in err and "hub" in err
    f = _text(tmp_path, "file.bin", b"x")
    assert "file.bin is a file" in _one_line(capsys, ["inspect", f])
    assert "has no config.json" in _one_line(capsys, ["inspect", str(tmp_path)])
    (tmp_path / "config.json").write_text('{"model_type": ')
    assert "config.json is not valid JSON" in _one_line(capsys, ["inspect", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nosuch"}))
    assert "nosuch" in _one_line(capsys, ["inspect", str(tmp_path)])
    err = _one_line(capsys, ["inspect", str(tmp_path), "--adapter", "nonsense"])
    assert "--adapter nonsense" in err and "package.module:NAME" in err


def test_inspect_adapter_module_that_raises_on_import(capsys, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    (tmp_path / "broken_adapter_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    err = _one_line(capsys, ["inspect", str(model), "--adapter", "broken_adapter_mod:A"])
    assert "importing its module raised RuntimeError: boom at import" in err and "fix: " in err


@pytest.mark.parametrize("size", ["0", "-3"])
def test_retention_batch_size_below_one(capsys, tmp_path, size):
    pytest.importorskip("lm_eval")
    err = _one_line(capsys, ["retention", "--base", str(tmp_path), "--tuned", str(tmp_path),
                             "--tasks", "x", "--batch-size", size])  # fmt: skip
    assert f"--batch-size {size}: must be >= 1" in err


def test_library_says_a_missing_local_folder():
    pytest.importorskip("transformers")
    from smar.hf.inspect import load_model_dir

    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model_dir("/no/such/model", weights=False)


@pytest.mark.parametrize("command", [["demo", "--smoke"], ["sweep"]])
def test_the_testbed_refuses_torchrun(command, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not under torchrun (WORLD_SIZE=2)" in err and "fix: run `smar" in err


def test_analyze_and_retention_answer_bad_input_in_one_line(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    code = cli.main(["retention", "--base", str(tmp_path / "a"), "--tuned", str(tmp_path / "b"),
                     "--tasks", "x"])  # fmt: skip
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ------------------------------------------------------------ issue 14: a hostile-but-fair tester
@pytest.fixture
def read_only(monkeypatch, request):
    """Makes a folder read-only as a user sees it (root writes anywhere: access() says no)."""

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        request.addfinalizer(lambda: path.chmod(0o755))
        real = os.access

        def access(p, mode, *a, **k):
            if mode & os.W_OK and Path(p).resolve() == path.resolve():
                return False
            return real(p, mode, *a, **k)

        monkeypatch.setattr(os, "access", access)
        return path

    return make


def _prose(path: Path) -> Path:
    words = "the king queen lord love night day sword crown heart fair death life hath".split()
    r = random.Random(0)
    path.write_text("\n".join(" ".join(r.choices(words, k=9)) + "." for _ in range(1500)))
    return path


def _loop(tmp_path):
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    return [f"data.text_files={tmp_path / 'l1'}"], "data.text_files: " + str(tmp_path / "l1")


# (name, setup(tmp_path, read_only, monkeypatch) -> (argv, what the line says))
DEMO_PATHS = [
    ("--out under a file", lambda t, ro, mp: (
        ["--out", _text(t, "f", b"x") + "/o"], "output folder " + str(t / "f/o") + " is under")),
    ("--out read-only", lambda t, ro, mp: (
        ["--out", str(ro(t / "ro") / "o")], "output folder " + str(t / "ro/o") + " cannot be "
        "written: " + str(t / "ro") + " is read-only for this user; fix: pass another --out")),
    ("SMAR_CACHE a file", lambda t, ro, mp: (
        mp.setenv("SMAR_CACHE", _text(t, "c", b"x")) or [], f"SMAR_CACHE={t / 'c'} is a file")),
    ("SMAR_CACHE read-only", lambda t, ro, mp: (
        mp.setenv("SMAR_CACHE", str(ro(t / "c"))) or [], f"SMAR_CACHE={t / 'c'} cannot be")),
    ("symlink loop in data.text_files", lambda t, ro, mp: _loop(t)),
    ("--out ''", lambda t, ro, mp: (["--out", ""], "the output folder is empty")),
    ("--out X out=Y", lambda t, ro, mp: (
        ["--out", str(t / "x"), f"out={t / 'y'}"], "given twice")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "setup"), DEMO_PATHS, ids=lambda x: x if isinstance(x, str) else ""
)
def test_demo_paths_checked_before_work(name, setup, tmp_path, read_only, monkeypatch, capsys):
    from smar.testbed import pipeline
    from smar.testbed.validate import validate_config

    def refuse_or_fail(cfg, **kw):  # no pipeline here: a case not refused fails at once
        validate_config(cfg)
        raise AssertionError(f"not refused: the demo would write {cfg.out!r}")

    monkeypatch.setattr(pipeline, "run_pipeline", refuse_or_fail)
    monkeypatch.chdir(tmp_path)
    argv, says = setup(tmp_path, read_only, monkeypatch)
    if not any(a == "--out" for a in argv):
        argv = ["--out", str(tmp_path / "o"), *argv]
    err = _one_line(capsys, ["demo", "--smoke", "--quiet", *argv])
    assert err.startswith("smar: error: ") and says in err and "fix: " in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


# a whole pipeline in seconds; each case diverges in its own stage (the earlier ones are cached)
TINY = ["vision.steps=2", "pretrain.steps=3", "align.steps=2", "data.skill_examples=300",
        "data.descriptions=0", "data.eval_text=40", "data.eval_mm=4", "data.prose_bytes=1000",
        "controls=false", "workers=1", "arms=none"]  # fmt: skip
DIVERGED = [
    (["vision.lr=1e30"], "stage 0 (vision) diverged", "fix: lower vision.lr"),
    (["pretrain.lr=1e30"], "stage 1 (language) diverged", "fix: lower pretrain.lr"),
    (["tune.base=native", "pretrain.lr=1e30"], "stage 1 (language) diverged", "pretrain.lr"),
    (["align.lr=1e30"], "stage 2 (alignment) diverged", "fix: lower align.lr"),
    (["instruct.steps=3", "instruct.lr=1e30"], "stage 2b (instruction) diverged", "instruct.lr"),
    (["tune.lr=1e3"], "stage 3 (run none_seed0) diverged", "fix: lower tune.lr"),
    (["tune.noise=1e30"], "stage 3 (run none_seed0) diverged", "or lower tune.noise=1e+30"),
]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root / "cache", _prose(root / "a.txt")


@pytest.mark.parametrize(("overrides", "says", "fix"), DIVERGED, ids=lambda x: " ".join(x))
def test_every_stage_diverging_is_one_line(overrides, says, fix, tiny_cache, tmp_path,
                                           monkeypatch, capsys):  # fmt: skip
    cache, text = tiny_cache
    monkeypatch.setenv("SMAR_CACHE", str(cache))
    threads = torch.get_num_threads()
    more = [] if any(o.startswith("instruct.steps") for o in overrides) else ["instruct.steps=0"]
    argv = ["demo", "--smoke", "--quiet", "--out", str(tmp_path / "o"), *TINY, *more,
            f"data.text_files={text}", *overrides]  # fmt: skip
    err = _one_line(capsys, argv)
    assert err.startswith(f"smar: error: {says}") and "nothing of it was cached" in err, err
    assert fix in err
    assert not (tmp_path / "o" / "results.json").exists()
    assert torch.get_num_threads() == threads  # stage 3 ran here on one thread, then gave it back


def test_stage_cache_keys_hold_the_thread_count():
    """Scores differ in the 8th digit between 1 and 2 threads: their stages never mix."""
    from smar.testbed.config import smoke_config
    from smar.testbed.stages import stage_dir

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [stage_dir(smoke_config(), s) for s in ("vision", "pretrain", "align")]
        torch.set_num_threads(2)
        two = [stage_dir(smoke_config(), s) for s in ("vision", "pretrain", "align")]
    finally:
        torch.set_num_threads(threads)
    assert not set(one) & set(two)


def _conv(value, image="ok.png"):
    turns = [{"from": "human", "value": value}, {"from": "gpt", "value": "a cat"}]
    return json.dumps({"image": image, "conversations": turns}).encode()


# (a JSONL file's bytes, what the line says after "data.jsonl:1")
JSONL = [
    (b'{"text": "caf\xe9"}', " is not UTF-8 text (byte 13 of the line); fix: save the file as"),
    (b'{"conversations": "hi"}', ": 'conversations' must be a non-empty list of turns; fix:"),
    (json.dumps({"conversations": [{"from": "human"}]}).encode(), ": turn 0 of 'conversations' "
     "has no string 'value'; fix:"),
    (_conv("<image> x", 5), ": 'image' must be a path or a list of paths (got 5); fix:"),
    (_conv("<image> x", "fake.png"), "fake.png cannot be read (UnidentifiedImageError"),
    (_conv("<image> x", "dir.png"), "dir.png is a folder, not an image; fix:"),
    (b'{"id": 1}', ": a sample needs 'conversations' (LLaVA format) or 'text'; fix:"),
    (b'{"text": "  "}', ": the sample holds no text; fix:"),
    (b"[1, 2]", " is a JSON list, not an object; fix:"),
    (_conv("no mark"), ": 1 image(s) but 0 <image> mark(s) in the text; fix:"),
    (_conv("<image> <image> x"), ": 1 image(s) but 2 <image> mark(s) in the text; fix:"),
    (b"", " holds no sample to analyse (it is empty or blank); fix:"),
    (b"  \n\n", " holds no sample to analyse (it is empty or blank); fix:"),
]  # fmt: skip


@pytest.fixture
def hf_folder(tmp_path):
    """A model folder as far as the checks before loading see it, and images beside the data."""
    from PIL import Image

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "fake.png").write_text("a text file named .png")
    (tmp_path / "dir.png").mkdir()
    return tmp_path / "m"


@pytest.mark.parametrize(
    ("data", "says"),
    JSONL,
    ids=lambda x: x[:24].decode(errors="replace") if isinstance(x, bytes) else "",
)
def test_bad_jsonl_names_file_line_and_fix(data, says, hf_folder, tmp_path, capsys):
    f = _text(tmp_path, "data.jsonl", data)
    line = "" if "no sample" in says else ":1"
    err = _one_line(capsys, ["analyze", str(hf_folder), "--data", f, "--out", str(tmp_path / "o")])
    assert err.startswith(f"smar: error: {f}{line}") and says in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["read-only", "a file"])
def test_analyze_out_checked_before_any_model_loads(where, hf_folder, tmp_path, read_only, capsys):
    f = _text(tmp_path, "data.jsonl", b'{"text": "hi"}')
    out = (
        read_only(tmp_path / "ro") / "o"
        if where == "read-only"
        else Path(_text(tmp_path, "x", b""))
    )
    err = _one_line(capsys, ["analyze", str(hf_folder), "--data", f, "--out", str(out)])
    why = "cannot be written" if where == "read-only" else "is a file"
    assert err.startswith(f"smar: error: --out {out} {why}") and "fix: pass --out DIR" in err


# (name, extra arguments of `smar retention` from (tmp_path, read_only), what the line says)
RETENTION = [
    ("--limit 0", lambda t, ro: ["--limit", "0"], "--limit 0: must be above 0; fix:"),
    ("--limit -5", lambda t, ro: ["--limit", "-5"], "--limit -5: must be above 0; fix:"),
    ("--limit nan", lambda t, ro: ["--limit", "nan"], "--limit nan: must be above 0; fix:"),
    ("--limit 2.5", lambda t, ro: ["--limit", "2.5"], "from 1 on it counts documents; fix:"),
    ("--include-path missing", lambda t, ro: ["--include-path", "/nonexist"],
     "--include-path /nonexist does not exist; fix: pass the folder of the task YAMLs"),
    ("--out a folder", lambda t, ro: ["--out", str(t)], "is a folder; fix: pass a FILE.json"),
    ("--out read-only", lambda t, ro: ["--out", str(ro(t / "ro") / "r.json")], "cannot be written"),
    ("--tasks-dir read-only", lambda t, ro: ["--tasks-dir", str(ro(t / "ro"))], "cannot be writ"),
    ("--tasks-dir a file", lambda t, ro: ["--tasks-dir", _text(t, "f", b"")], "f is a file; fix:"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "extra", "says"), RETENTION, ids=[c[0] for c in RETENTION])
def test_retention_checks_before_either_model_runs(name, extra, says, tmp_path, read_only, capsys):
    """--out was written after both models were evaluated (a traceback then)."""
    argv = ["retention", "--base", str(tmp_path / "a"), "--tuned", str(tmp_path / "b"), "--tasks",
            "testbed_text", "--local-only", *extra(tmp_path, read_only)]  # fmt: skip
    err = _one_line(capsys, argv)
    assert err.startswith("smar: error: ") and says in err, err


def test_retention_testbed_against_a_hugging_face_folder(tmp_path, capsys):
    """The testbed's loader claimed the pair and failed on the LLaVA folder ("not a
    TinyConfig"); two HF folders are left to smar's own loader."""
    from smar.testbed.lm_eval_tasks import open_pair

    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "config.json").write_text('{"n_layers": 2, "dim": 32}')
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    for base, tuned in (("tb", "llava"), ("llava", "tb")):
        argv = ["retention", "--base", str(tmp_path / base), "--tuned", str(tmp_path / tuned),
                "--tasks", "testbed_text", "--local-only"]  # fmt: skip
        err = _one_line(capsys, argv)
        assert f"{tmp_path / 'tb'} is a testbed model but {tmp_path / 'llava'} is not" in err
    assert open_pair(tmp_path / "llava", tmp_path / "llava", tmp_path / "w") is None
