"""Every bad input to ``smar`` is answered before any work in one line naming the problem and the
fix, with exit code 2; ``--debug`` adds the traceback (issue 12's table, one row per case)."""

from __future__ import annotations

import json

import pytest

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
