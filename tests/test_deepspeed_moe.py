"""DeepSpeed-MoE's router (``deepspeed.moe.layer.MoE`` with ``TopKGate``), built as MoE-LLaVA
builds it: experts copied from a dense MLP, top-2. Its gate calls ``F.linear`` with its weight
directly and returns only dispatch tensors, so smar reads the logits from that call. One gloo
process on CPU."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")
if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip(
        "DeepSpeed on CPU compiles a communication op: no C++ compiler", allow_module_level=True
    )

import smar  # noqa: E402

IMG = 30
D = 16


class Block(nn.Module):
    """A decoder layer's MLP slot holding DeepSpeed's MoE (MoE-LLaVA patches the layer's forward
    to take the MoE's ``(out, l_aux, exp_counts)``)."""

    def __init__(self, moe):
        super().__init__()
        self.mlp = moe

    def forward(self, h):
        out, l_aux, _ = self.mlp(h)
        return h + out, l_aux


class Toy(nn.Module):
    def __init__(self, sampling: bool, num_layers: int = 2):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.config = SimpleNamespace(image_token_id=IMG)
        self.embed = nn.Embedding(32, D)
        layers = []
        for _ in range(num_layers):
            dense = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))
            # MoE-LLaVA: MoE(hidden, expert=the layer's dense MLP, ...) copies it into each expert
            moe = MoE(D, expert=dense, num_experts=4, ep_size=1, k=2, capacity_factor=8.0,
                      eval_capacity_factor=8.0, min_capacity=0,
                      top2_2nd_expert_sampling=sampling)  # fmt: skip
            layers.append(Block(moe))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(D, 32)

    def forward(self, input_ids):
        h = self.embed(input_ids)  # (B, S, D)
        aux = 0.0
        for layer in self.layers:
            h, l_aux = layer(h)
            aux = aux + l_aux
        return self.head(h), aux


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_initialized():
        init = tmp_path_factory.mktemp("pg") / "init"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 29, (2, 10), generator=g)
    ids[:, 2:6] = IMG
    return ids


def gate_choice(model, ids) -> list[torch.Tensor]:
    """The experts each gate dispatched each token to: ``(T, E)`` booleans per layer."""
    seen = []

    def hook(module, args, output):
        if len(output) == 7:  # sparse routes: (l_aux, capacity, E, indices (K, T), ...)
            idx = output[3].long().T  # (T, K); -1 where the capacity evicted a route
            assert (idx >= 0).all(), "raise the capacity factor: a route was dropped"
            mask = torch.zeros(idx.shape[0], output[2], dtype=torch.bool)
            seen.append(mask.scatter_(1, idx, True))
        else:  # dense: (l_aux, combine weights (T, E, C), dispatch mask, counts)
            seen.append(output[1].sum(dim=-1) > 0)

    handles = [layer.mlp.deepspeed_moe.gate.register_forward_hook(hook) for layer in model.layers]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_adapter_finds_the_gates():
    model = Toy(sampling=False)
    sites = smar.adapters.find_routers(model)
    assert [s.adapter.name for s in sites] == ["deepspeed-moe"] * 2
    assert [s.layer for s in sites] == [0, 1]
    assert sites[0].top_k == 2 and sites[0].num_experts == 4


@pytest.mark.parametrize("bias", [False, True])
def test_captured_logits_choose_the_gates_own_experts(bias):
    torch.manual_seed(0)
    model = Toy(sampling=False).eval()
    ids = batch()
    reg = smar.attach(model, smar.SMARConfig(modality_bias=bias))
    with torch.no_grad():
        if bias:  # a bias that changes the routing: the gate must route on the biased logits
            for p in reg.bias_parameters():
                p.copy_(torch.randn_like(p) * 3)
        chosen = gate_choice(model, ids)
        logits = reg.logits()
    assert len(logits) == 2
    for z, mask in zip(logits, chosen, strict=True):
        mine = torch.zeros_like(mask)
        mine.scatter_(1, z.topk(2, dim=-1).indices, True)
        assert torch.equal(mine, mask)
    reg.detach()


def test_capture_is_not_changed_by_the_gates_in_place_noise():
    """DeepSpeed's default top-2 gating adds Gumbel noise to its logits in place."""
    torch.manual_seed(0)
    model = Toy(sampling=True).eval()
    ids = batch()
    rec = smar.record(model)
    with torch.no_grad():
        model(ids)
        first = [z.clone() for z in rec.logits()]
        model(ids)
        second = rec.logits()
        wg = model.layers[0].mlp.deepspeed_moe.gate.wg.weight
        h = model.embed(ids).reshape(-1, D)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(first[0], h @ wg.T)  # exactly the first gate's linear
    rec.detach()


def test_zero_bias_changes_nothing():
    torch.manual_seed(0)
    model = Toy(sampling=False).eval()
    ids = batch()
    with torch.no_grad():
        before, aux_before = model(ids)
        reg = smar.attach(model, smar.SMARConfig())
        after, aux_after = model(ids)
    assert torch.equal(before, after) and torch.equal(aux_before, aux_after)
    reg.detach()


def test_trains_a_few_steps_with_smar():
    torch.manual_seed(0)
    model = Toy(sampling=True).train()
    reg = smar.attach(model, smar.SMARConfig(lb_weight=0.0))  # DeepSpeed's own l_aux balances
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = batch()
    first = None
    for _ in range(6):
        logits, aux = model(ids)
        lm = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
        band = reg.loss()
        first = float(band.detach()) if first is None else first
        (lm + 0.01 * aux + band).backward()
        opt.step()
        opt.zero_grad()
    reg.check()
    assert all(float(b.abs().sum()) > 0 for b in reg.bias_parameters())  # the bias trained
    assert float(reg.terms()["smar/band"]) < first  # and the band loss went down
