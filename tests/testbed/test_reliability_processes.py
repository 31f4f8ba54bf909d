"""Ctrl-C that stops, parents whose death ends their workers, and two commands on one cache
(issue 12): ``smar demo --smoke`` at tiny sizes in real processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smar.testbed.io import load_tensors

TINY = [
    "vision.steps=2",
    "pretrain.steps=3",
    "align.steps=2",
    "instruct.steps=0",
    "data.skill_examples=300",
    "data.descriptions=0",
    "data.eval_text=40",
    "data.eval_mm=4",
    "data.prose_bytes=1000",
]
# stage 3 long enough to be interrupted: four runs on two workers
STAGE3 = ["tune.steps=40", "arms=none,smar,hard", "workers=2"]
WORDS = (
    "the king queen lord love night day sword crown heart fair death life speak hath thou".split()
)


def _prose(path: Path) -> Path:
    r = random.Random(0)
    lines = [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 12))) + "." for _ in range(1500)]
    path.write_text("\n".join(lines))
    return path


def _demo(tmp: Path, out: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SMAR_CACHE": str(tmp / "cache")}
    text = _prose(tmp / "a.txt") if not (tmp / "a.txt").exists() else tmp / "a.txt"
    cmd = [sys.executable, "-m", "smar.cli", "demo", "--smoke", "--quiet", "--out", str(tmp / out)]
    cmd += [*TINY, *extra, f"data.text_files={text}"]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)


def _wait_for_stage3(tmp: Path, out: str, p: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not list((tmp / out).glob(".*.lock")):
        assert p.poll() is None, p.stderr.read()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def _group(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded)."""
    out = subprocess.run(["ps", "-eo", "pid,pgid,stat"], capture_output=True, text=True).stdout
    rows = [r.split() for r in out.splitlines()[1:]]
    return [int(r[0]) for r in rows if int(r[1]) == pgid and not r[2].startswith("Z")]


def _runs(out: Path) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {k: (v["scores"], v["routing"], v["history"]) for k, v in runs.items()}


@pytest.mark.slow
def test_ctrl_c_in_stage_3_stops_every_worker_and_resumes_identically(tmp_path):
    ref = _demo(tmp_path, "ref", *STAGE3)  # uninterrupted; also warms the cache
    assert ref.wait(600) == 0, ref.stderr.read()
    p = _demo(tmp_path, "out", *STAGE3)
    _wait_for_stage3(tmp_path, "out", p)
    time.sleep(5)  # runs in flight
    assert len(_group(p.pid)) >= 3  # the command and its two workers
    t0 = time.time()
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    assert p.wait(30) == 130
    while _group(p.pid) and time.time() - t0 < 30:
        time.sleep(0.1)
    stopped = time.time() - t0
    assert not _group(p.pid) and stopped < 15, stopped
    err = p.stderr.read()
    assert "smar: interrupted: Ctrl-C during stage 3" in err and "resume with: " in err
    assert not list((tmp_path / "out").rglob("*.tmp"))  # no half-written file
    again = _demo(tmp_path, "out", *STAGE3)
    assert again.wait(600) == 0, again.stderr.read()
    assert _runs(tmp_path / "out") == _runs(tmp_path / "ref")
    for run in _runs(tmp_path / "ref"):  # the same weights (safetensors orders its header freely)
        a, meta_a = load_tensors(tmp_path / "out" / run / "model.safetensors")
        b, meta_b = load_tensors(tmp_path / "ref" / run / "model.safetensors")
        assert meta_a == meta_b and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killing_the_parent_leaves_no_worker(tmp_path):
    p = _demo(tmp_path, "out", *STAGE3)
    _wait_for_stage3(tmp_path, "out", p)
    time.sleep(3)
    workers = [pid for pid in _group(p.pid) if pid != p.pid]
    assert workers
    os.kill(p.pid, signal.SIGKILL)  # the parent only
    p.wait(10)
    t0 = time.time()
    while any(pid in _group(p.pid) for pid in workers) and time.time() - t0 < 20:
        time.sleep(0.2)
    left = [pid for pid in workers if pid in _group(p.pid)]
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


@pytest.mark.slow
def test_two_commands_on_one_fresh_cache_both_finish(tmp_path):
    """Fixed temporary names made two demos on one fresh cache crash (FileNotFoundError)."""
    a = _demo(tmp_path, "a", "arms=none,smar")
    b = _demo(tmp_path, "b", "arms=none,smar")
    assert a.wait(600) == 0, a.stderr.read()
    assert b.wait(600) == 0, b.stderr.read()
    assert _runs(tmp_path / "a") == _runs(tmp_path / "b")
    assert len(list((tmp_path / "cache" / "stages").glob("align-*/model.safetensors"))) == 1
