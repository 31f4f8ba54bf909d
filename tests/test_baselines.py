"""smar.baselines with smar.capture: load balancing counts the experts the routers chose (read
from their outputs) instead of a second top-k; the from-logits path stays for callers that have
only logits."""

from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from dist_common import samples, tiny_moe  # noqa: E402

import smar  # noqa: E402


def test_capture_reads_the_routers_choice_and_the_loss_is_unchanged():
    model = tiny_moe().eval()
    ids = torch.stack([s["input_ids"] for s in samples(4)])
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False))
    own = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out: own.append(out[2]))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
        chosen = reg.chosen()
        logits = reg.logits()
        with_choice = reg.loss()
    for h in hooks:
        h.remove()
    assert chosen is not None and len(chosen) == len(own) == 2
    for mine, theirs in zip(chosen, own, strict=True):
        assert torch.equal(mine, theirs)
    # a softmax top-k router chooses the top-k of its probabilities: the same loss either way
    total, _ = smar.routing_objective(logits, reg.modality_ids, top_k=2, smar_weight=1.0)
    torch.testing.assert_close(with_choice, total)


def test_balancing_counts_the_given_choice():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 12, 4, generator=g)
    everyone_on_0 = torch.zeros(2, 12, 1, dtype=torch.long)
    lb = smar.routing_objective(z, top_k=1, lb_weight=1.0, chosen=everyone_on_0)[1]["lb"]
    # f = (1, 0, 0, 0): L_LB = E * P_0 averaged over layers
    want = (4 * torch.softmax(z, -1)[..., 0].mean(-1)).mean()
    torch.testing.assert_close(lb, want)
    with pytest.raises(ValueError, match="chosen must have shape"):
        smar.routing_objective(z, top_k=2, chosen=everyone_on_0)


def test_a_router_that_does_not_return_its_choice_falls_back_to_top_k():
    """smar's own router returns its logits only: no choice is read, and the loss is the
    from-logits one (a top-k of the probabilities)."""
    from smar.moe import MoEBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(MoEBlock(16, 32, num_experts=4, top_k=2))
    reg = smar.attach(model, smar.SMARConfig(smar_weight=0.0, modality_bias=False))
    reg.set_modality(torch.zeros(10, dtype=torch.long))
    with torch.no_grad():
        model(torch.randn(1, 10, 16))  # (B, S, D)
        assert reg.chosen() is None
        total, _ = smar.routing_objective(reg.logits(), reg.modality_ids, top_k=2)
        torch.testing.assert_close(reg.loss(), total)
    # outputs without one integer (T, K) tensor hold no choice
    z = torch.randn(6, 4)
    assert smar.capture._choice_in((z, z.softmax(-1)), 6, 2) is None
    assert smar.capture._choice_in((z, torch.zeros(6, 3, dtype=torch.long)), 6, 2) is None
