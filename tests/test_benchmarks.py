"""The benchmarks' own machinery (what they count and replay), on tiny sizes: the figures they
print are measurements, but the FLOP counts and the recorded products they rest on are checked."""

import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_testbed  # noqa: E402

from smar.testbed.config import smoke_config  # noqa: E402


def test_recorded_products_replay_with_the_same_flops():
    a, b = torch.randn(32, 16, requires_grad=True), torch.randn(24, 16)
    rec = bench_testbed.RecordMatmuls()
    with rec:
        (a @ b.t()).sum().backward()  # forward (32x16 @ 16x24) and the gradient of a
    assert len(rec.calls) == 2
    with FlopCounterMode(display=False) as counted:
        bench_testbed.replay(rec.calls)()
    assert counted.get_total_flops() == 2 * 32 * 16 * 24 * 2


def test_products_written_into_out_tensors_are_recorded_and_replayed():
    # the MoE experts and the fused head write their products with out= (mm.out, addmm.out)
    a, b, acc = torch.randn(8, 5), torch.randn(5, 7), torch.zeros(8, 7)
    rec = bench_testbed.RecordMatmuls()
    with rec:
        torch.mm(a, b, out=torch.empty(8, 7))
        torch.addmm(acc, a, b, out=acc)
    assert [c[0].overloadpacket for c in rec.calls] == [torch.ops.aten.mm, torch.ops.aten.addmm]
    assert all("out" in c[2] for c in rec.calls)
    with FlopCounterMode(display=False) as counted:
        bench_testbed.replay(rec.calls)()
    assert counted.get_total_flops() == 2 * (2 * 8 * 5 * 7)


def test_causal_attention_counts_half():
    q = torch.randn(2, 4, 8, 6)
    with FlopCounterMode(display=False, custom_mapping=bench_testbed.ATTENTION_FLOPS) as full:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with FlopCounterMode(display=False, custom_mapping=bench_testbed.ATTENTION_FLOPS) as causal:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert full.get_total_flops() == 2 * (2 * 2 * 4 * 8 * 8 * 6)  # QK^T and PV
    assert causal.get_total_flops() == full.get_total_flops() // 2


@pytest.mark.parametrize("stage", ["stage1_step", "stage3_step"])
def test_testbed_steps_train_and_report_a_share(stage, capsys):
    step, tokens = getattr(bench_testbed, stage)(smoke_config())
    bench_testbed.measure(stage, step, tokens, threads=1, reps=1)
    out = capsys.readouterr().out
    flops = float(re.search(r"([\d.]+) GFLOP/step", out).group(1))
    share = float(re.search(r"share of sgemm FLOP/s: (\d+)%", out).group(1))
    assert flops > 0 and share > 0  # a step that trained counted FLOPs and took time
