"""smar.megatron: SMARRouter in Megatron-Core (0.16.1, on CPU with gloo; the shims are in
tests/helpers/megatron_cpu.py, never in the library).

- two processes under torchrun (tests/helpers/dist_megatron.py) for DP2, TP2 with sequence parallelism,
  EP2 and CP2 give the band loss, the MRD and the router and bias gradients of one process on the
  whole micro-batch (relative gaps printed); with local statistics they differ;
- with a zero bias and band weight 0 the router's outputs and gradients are Megatron's own, bit
  for bit; the band loss and MRD equal smar's functions on the biased logits;
- a small Megatron-Core GPT with MoE layers trains on CPU: the loss falls, the MRD enters the band;
- missing or mismatched modality ids fail naming the fix; specs; import without megatron-core.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import megatron_cpu as mc  # noqa: E402

import smar  # noqa: E402
from smar.megatron import SMARRouterConfig, modality_ids  # noqa: E402

HERE = Path(__file__).parent
SCRIPT = str(HERE / "helpers" / "dist_megatron.py")
MODES = ("dp", "tp", "ep", "cp")


# ----------------------------------------------------------------------------------------------
# two processes against one


def _launch(prefix: list[str], out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([*prefix, SCRIPT, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (one process, whole micro-batch) and the two-process runs, side by side."""
    tmp = tmp_path_factory.mktemp("megatron")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]  # fmt: skip
    procs = {"one": _launch([sys.executable], tmp / "one"), "two": _launch(torchrun, tmp / "two")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-5000:]}"
    ref = torch.load(tmp / "one" / "rank0.pt")["one"]
    return ref, [torch.load(tmp / "two" / f"rank{r}.pt") for r in range(2)]


def _gaps(got: dict, ref: dict) -> dict[str, float]:
    """Relative gap of each quantity: max |got - ref| / max |ref|."""
    return {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref}


def _fmt(gaps: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in gaps.items())


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_equal_one_process_on_the_whole_batch(runs, mode):
    ref, ranks = runs
    assert ref["band"] > 0, "the band must be active for the gradients to mean anything"
    for rank, res in enumerate(ranks):
        gaps = _gaps(res[mode], ref)
        print(f"{mode} rank {rank}: relative gap {_fmt(gaps)}")
        assert max(gaps.values()) < 1e-5, (mode, rank, gaps)


@pytest.mark.parametrize("mode", MODES)
def test_local_statistics_differ(runs, mode):
    ref, ranks = runs
    worst = {k: max(_gaps(res[f"{mode}-local"], ref)[k] for res in ranks) for k in ref}
    print(f"{mode}-local: largest relative gap {_fmt(worst)}")
    assert min(worst.values()) > 1e-2, worst


# ----------------------------------------------------------------------------------------------
# one process


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    with mc.cpu_shims():
        mc.init_dist(str(tmp_path_factory.mktemp("megatron") / "init"))
        mc.init_parallel()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        try:
            yield
        finally:
            mc.clear_logged()
            mc.destroy()


def _routers(config, smar_config, layers=(1, 2)):
    """Megatron's TopKRouter and a SMARRouter with the same weight."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from smar.megatron import SMARRouter

    pg = get_default_pg_collection()
    ref = TopKRouter(config, pg_collection=pg)
    ours = SMARRouter(config, pg, smar=smar_config)
    ours.weight.data.copy_(ref.weight.data)
    ref.set_layer_number(layers[0])
    ours.set_layer_number(layers[1])
    return ref, ours


def test_zero_bias_and_band_weight_zero_give_megatrons_router_bit_for_bit(megatron):
    config = mc.transformer_config(moe_z_loss_coeff=1e-3)  # Megatron's own losses stay on
    ref, ours = _routers(config, SMARRouterConfig(smar_weight=0.0))
    hidden, ids = mc.batch()
    padding = torch.zeros(mc.SEQ, mc.BATCH, dtype=torch.bool)
    padding[-1, -1] = True  # Megatron's padding mask: True at padding, (S, B)
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(mc.SEQ * mc.BATCH, mc.EXPERTS, generator=g)
    mc.clear_logged()
    outs = []
    for router in (ref, ours):
        h = hidden.clone().requires_grad_(True)
        with modality_ids(ids):
            probs, routing_map = router(h, padding_mask=padding)
        (probs * upstream).sum().backward()
        outs.append((probs.detach(), routing_map, h.grad, router.weight.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    logs = mc.logged()
    for name in ("load_balancing_loss", "z_loss"):  # Megatron's own terms, logged the same
        assert torch.equal(logs[name][0], logs[name][1]), name
    assert torch.count_nonzero(ours.modality_bias) == 0
    assert ours.modality_bias.grad is not None  # trainable though zero


def test_band_loss_mrd_and_gradients_equal_smars_functions(megatron):
    """One process: the logged band loss and MRD are smar_loss and mrd on the biased logits,
    and the router's gradients are those of the band loss alone (load balancing off)."""
    config = mc.transformer_config(moe_aux_loss_coeff=0.0)
    _, router = _routers(config, SMARRouterConfig(smar_weight=0.5, band=(2.0, 3.0)))
    g = torch.Generator().manual_seed(4)
    router.modality_bias.data.copy_(0.3 * torch.randn(2, mc.EXPERTS, generator=g))
    hidden, ids = mc.batch()
    mc.clear_logged()
    with modality_ids(ids):
        probs, _ = router(hidden)
    (0.0 * probs.sum()).backward()
    logs = mc.logged()
    # the reference: logits by hand, in the router's (S, B) token order
    W = router.weight.detach().clone().requires_grad_(True)
    b = router.modality_bias.detach().clone().requires_grad_(True)
    flat = ids.t().reshape(-1)  # (T,)
    z = hidden.reshape(-1, mc.HIDDEN) @ W.t() + b[flat.clamp(min=0)] * (flat >= 0)[:, None]
    band = smar.smar_loss([z], flat, band=(2.0, 3.0))
    (0.5 * band).backward()
    layer = router.layer_number - 1
    torch.testing.assert_close(logs["smar_band_loss"][layer], band.detach())
    torch.testing.assert_close(logs["smar_mrd"][layer], smar.mrd([z.detach()], flat)[0])
    torch.testing.assert_close(router.weight.grad, W.grad)
    torch.testing.assert_close(router.modality_bias.grad, b.grad)
    assert band > 0


def test_small_gpt_trains_and_mrd_enters_the_band(megatron):
    history = mc.train_gpt(SMARRouterConfig(smar_weight=1.0, band=(1.5, 2.0)), steps=30)
    control = mc.train_gpt(SMARRouterConfig(smar_weight=0.0), steps=30)
    for i, h in enumerate(history):
        print(f"step {i:2d} loss {h['loss']:.3f} mrd {[round(x, 3) for x in h['mrd'].tolist()]}")
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert float(history[0]["mrd"].max()) < 0.05  # the modalities start routed alike
    late = torch.stack([h["mrd"] for h in history[-10:]]).mean(0)  # per layer
    assert ((late > 1.4) & (late < 2.1)).all(), late
    assert float(torch.stack([h["band"] for h in history[-10:]]).mean()) < 0.15
    # without the band loss the MRD stays where it was: the band loss moved it
    control_mrd = float(torch.stack([h["mrd"] for h in control[-10:]]).max())
    print(f"loss {first:.3f} -> {last:.3f} (means of 5 steps); MRD of the last 10 steps per "
          f"layer {late.tolist()}; without the band loss at most {control_mrd:.4f}")  # fmt: skip
    assert control_mrd < 0.1


def test_activation_recomputation_gives_the_gradients_without_it(megatron):
    """Megatron's recomputation of the MoE layer re-runs the router in the backward pass, outside
    ``modality_ids``: it takes the ids of its checkpointed forward, micro-batch by micro-batch
    (two forwards, then their backwards, as a pipeline schedule interleaves them)."""
    import dist_megatron

    hidden, ids = dist_megatron.whole_batch()
    got = []
    for recompute in ({}, {"recompute_granularity": "selective", "recompute_modules": ["moe"]}):
        config = mc.transformer_config(**recompute)
        layer = dist_megatron.moe_layer(config, SMARRouterConfig(band=(2.0, 3.0)))
        mc.clear_logged()
        outs = []
        for h, i in ((hidden, ids), (hidden.flip(1), ids.flip(0))):
            with modality_ids(i):
                outs.append(layer(h.clone().requires_grad_(True))[0])
        for out in outs:
            out.square().mean().backward()
        assert not layer.router._replay
        got.append((layer.router.weight.grad, layer.router.modality_bias.grad,
                    mc.logged()["smar_band_loss"][0]))  # fmt: skip
    assert got[0][2] > 0
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# errors, specs, import


def test_missing_and_mismatched_modality_ids_fail_naming_the_fix(megatron):
    _, router = _routers(mc.transformer_config(), SMARRouterConfig())
    hidden, ids = mc.batch()
    with pytest.raises(ValueError, match=r"no modality ids.*smar\.megatron\.modality_ids"):
        router(hidden)
    for bad in (ids[:, :-1], ids[:1], ids.t()):
        with pytest.raises(ValueError, match=r"routes S=8 x B=2 tokens.*shaped like the input_ids"):
            with modality_ids(bad):
                router(hidden)
    with pytest.raises(ValueError, match="must be integers"), modality_ids(ids.float()):
        router(hidden)
    with pytest.raises(ValueError, match=r"-1\.\.1; got .*num_modalities"):
        with modality_ids(ids.clamp(min=0) * 2):
            router(hidden)
    with pytest.raises(ValueError, match=r"\(B, S\) tensor"):
        smar.megatron.set_modality_ids(ids.reshape(-1))
    assert smar.megatron.ids.current() is None  # cleared after every failed forward


def test_use_smar_router_puts_the_router_in_every_moe_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from smar.megatron import SMARRouter, use_smar_router

    layers = [get_gpt_layer_local_spec(num_experts=4) for _ in range(2)]
    block = TransformerBlockSubmodules(layer_specs=[*layers, get_gpt_layer_local_spec()])
    assert use_smar_router(block, SMARRouterConfig(band=(1.0, 1.5))) == 2
    router = layers[0].submodules.mlp.submodules.router
    assert router.func is SMARRouter and router.keywords["smar"].band == (1.0, 1.5)
    as_019 = partial(MoELayer, submodules=MoESubmodules())  # megatron-core 0.19's form
    assert use_smar_router(as_019) == 1 and as_019.keywords["submodules"].router.func is SMARRouter
    with pytest.raises(ValueError, match="no MoE layer.*num_experts"):
        use_smar_router(get_gpt_layer_local_spec())


def test_config_validation():
    with pytest.raises(ValueError, match="hinge"):
        SMARRouterConfig(hinge="cubic")
    with pytest.raises(ValueError, match="smar_weight"):
        SMARRouterConfig(smar_weight=-1.0)
    with pytest.raises(ValueError, match="stats"):
        SMARRouterConfig(stats="world")
    with pytest.raises(ValueError, match="num_modalities"):
        SMARRouterConfig(image=2)
    assert SMARRouterConfig(band=[[0.5, 1.0], [1.0, 2.0]]).layer_band(2, 2) == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="band"):
        SMARRouterConfig(band=[[0.5, 1.0], [1.0, 2.0]]).layer_band(1, 3)


def test_smar_imports_without_megatron_and_the_router_names_the_extra():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import smar, smar.megatron
from smar.megatron import SMARRouterConfig, modality_ids
assert not [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]
try:
    smar.megatron.SMARRouter
except ImportError as e:
    print(e)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(HERE.parent)})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "pip install 'smar[megatron]'" in res.stdout


def test_the_docs_python_blocks_run():
    """docs/megatron.md's ```python blocks run (the others need a Megatron training setup)."""
    text = (HERE.parent / "docs" / "megatron.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/megatron.md", "exec"), {"__name__": "docs"})
