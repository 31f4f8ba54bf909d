"""SMARTrainer on the engines users train with, two CPU processes over gloo: torchrun (DDP),
accelerate, DeepSpeed ZeRO-2 and ZeRO-3; and the regularizer in a plain FSDP2 loop. With global
statistics each gives the loss curve, the logged ``smar/*`` values and the router updates of one
process on the concatenated batch; the trained bias is saved and loads into a fresh model.

The DDP cases run in the default suite; the other engines are ``slow`` (DeepSpeed compiles a
communication op on first use).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

HERE = Path(__file__).parent
SCRIPT = str(HERE / "helpers" / "dist_trainer.py")
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 10**9,
}


def launch(prefix: list[str], out: Path, *args: str, env: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [*prefix, *args, "--out", str(out)], capture_output=True, text=True, env=full_env,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = {"dir": out}
    if (out / "log.json").exists():
        result.update(json.loads((out / "log.json").read_text()))
        result["routers"] = torch.load(out / "routers.pt")
        result["reload"] = torch.load(out / "reload.pt")
    return result


def torchrun(n: int = 2) -> list[str]:
    # --standalone: a free port of its own, so that tests can run beside other jobs
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(n)]  # fmt: skip


def one_process(tmp: Path, name: str, *args: str) -> dict:
    return launch([sys.executable, SCRIPT], tmp / name, *args)


def assert_same_run(run: dict, ref: dict, rtol: float = 1e-5) -> None:
    assert run["world"] == 2 and ref["world"] == 1
    assert len(run["history"]) == len(ref["history"]) == 3
    for got, want in zip(run["history"], ref["history"], strict=True):
        for key in ("loss", "smar/total", "smar/band", "smar/lb", "smar/mrd"):
            assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-7), key
    for name, want in ref["routers"]["update"].items():
        got = run["routers"]["update"][name]
        assert float((got - want).norm()) <= 1e-4 * float(want.norm()), name
    # the bias trained, was saved with the model, and loads into a fresh one
    for name, bias in run["reload"].items():
        assert float(bias.norm()) > 0
        torch.testing.assert_close(bias, run["routers"]["final"][name].float())


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return one_process(tmp_path_factory.mktemp("ref"), "one", "--per-device", "4")


def test_torchrun_ddp_equals_one_process(ref, tmp_path):
    assert_same_run(launch([*torchrun(), SCRIPT], tmp_path / "ddp"), ref)


def test_torchrun_ddp_with_local_statistics_differs(ref, tmp_path):
    run = launch([*torchrun(), SCRIPT], tmp_path / "ddp", "--stats", "local")
    gaps = [
        float((run["routers"]["update"][n] - want).norm() / want.norm())
        for n, want in ref["routers"]["update"].items()
        if n.endswith("weight")
    ]
    assert max(gaps) > 1e-2


def test_torchrun_ddp_with_accumulation_equals_one_process(tmp_path):
    ref = one_process(tmp_path, "one", "--per-device", "2", "--ga", "2", "--accumulate")
    run = launch([*torchrun(), SCRIPT], tmp_path / "ddp", "--per-device", "1", "--ga", "2",
                 "--accumulate")  # fmt: skip
    assert_same_run(run, ref)


@pytest.mark.slow
def test_accelerate_launch_equals_one_process(ref, tmp_path):
    pytest.importorskip("accelerate")
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    run = launch([*prefix, SCRIPT], tmp_path / "acc")
    assert run["wrapped"] == "DistributedDataParallel"
    assert_same_run(run, ref)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_one_process(ref, tmp_path, stage):
    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("DeepSpeed on CPU compiles a communication op: no C++ compiler")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({**DS_CONFIG, "zero_optimization": {"stage": stage}}))
    run = launch([*torchrun(), SCRIPT], tmp_path / "ds", "--deepspeed", str(config),
                 env={"DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert run["wrapped"] == "DeepSpeedEngine"
    assert_same_run(run, ref)


@pytest.mark.slow
def test_fsdp2_loop_equals_one_process(tmp_path):
    script = str(HERE / "helpers" / "dist_fsdp.py")
    one = launch([sys.executable, script], tmp_path / "one", "--per-device", "4")
    two = launch([*torchrun(), script], tmp_path / "two")
    a, b = torch.load(one["dir"] / "fsdp.pt"), torch.load(two["dir"] / "fsdp.pt")
    for (lm_a, r_a), (lm_b, r_b) in zip(a["losses"], b["losses"], strict=True):
        assert lm_b == pytest.approx(lm_a, rel=1e-5) and r_b == pytest.approx(r_a, rel=1e-5)
    for name, want in a["update"].items():
        assert float((b["update"][name] - want).norm()) <= 1e-4 * float(want.norm()), name
