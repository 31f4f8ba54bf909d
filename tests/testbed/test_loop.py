"""The testbed's one training loop (:func:`smar.testbed.loop.train`) against the loop every stage
wrote out before it (the same bits), and its divergence checks."""

import math
from types import SimpleNamespace

import pytest
import torch

from smar.errors import Diverged
from smar.testbed.loop import lr_at, make_optimizer, train

STEPS, WARMUP, LR = 7, 2, 3e-2


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.randn(16, 4), 10 * torch.randn(16, 3)  # large targets: clipping acts


def _forward(model, x, y, step):
    """The model output a stage returns: its loss and (standing in) router logits (4, 3)."""
    rows = slice(step % 4 * 4, step % 4 * 4 + 4)
    z = model(x[rows])  # (4, 3)
    return SimpleNamespace(loss=torch.nn.functional.mse_loss(z, y[rows]), router_logits=[z])


def _aux(out):
    z = out.router_logits[0]
    return 0.1 * z.pow(2).mean(), {"z": z.detach()}


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("routed", [False, True])
def test_train_is_the_written_out_loop(clip, routed):
    ref, x, y = _setup()
    opt = make_optimizer(ref, LR)
    for step in range(STEPS):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, STEPS, WARMUP, LR)
        out = _forward(ref, x, y, step)
        loss = out.loss + _aux(out)[0] if routed else out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()

    model, x, y = _setup()
    seen = []
    last = train(model, lambda step: _forward(model, x, y, step), steps=STEPS, warmup=WARMUP,
                 lr=LR, stage="stage t", field="t.lr", routing_loss=_aux if routed else None,
                 clip=clip, on_step=lambda step, out, aux, terms: seen.append((step, aux, terms)))  # fmt: skip
    assert torch.equal(last, loss)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [s for s, _, _ in seen] == list(range(STEPS))
    assert all((aux is None) == (not routed) and (terms is None) == (not routed)
               for _, aux, terms in seen)  # fmt: skip


def test_clipping_changes_the_weights_here():
    """The reference above compares something: with these targets the clip acts."""
    one, x, y = _setup()
    train(one, lambda s: _forward(one, x, y, s), steps=STEPS, warmup=WARMUP, lr=LR,
          stage="stage t", field="t.lr")  # fmt: skip
    two, x, y = _setup()
    train(two, lambda s: _forward(two, x, y, s), steps=STEPS, warmup=WARMUP, lr=LR,
          stage="stage t", field="t.lr", clip=True)  # fmt: skip
    assert not torch.equal(one[0].weight, two[0].weight)


def test_a_nan_loss_names_the_stage_step_rate_and_fix():
    model, x, y = _setup()

    def forward(step):  # a bare loss: NaN at the third step
        loss = _forward(model, x, y, step).loss
        return loss * math.nan if step == 2 else loss

    with pytest.raises(Diverged) as e:
        train(model, forward, steps=5, warmup=1, lr=LR, stage="stage t (test)", field="t.lr")
    assert str(e.value) == (
        f"stage t (test) diverged: the loss is nan at step 3 of 5 (learning rate "
        f"{lr_at(2, 5, 1, LR):.3g} at that step); nothing of it was cached; fix: lower t.lr or "
        "raise its warmup"
    )


def test_router_logits_are_checked_before_the_routing_loss_reads_them():
    model, x, y = _setup()
    read = []

    def forward(step):
        out = _forward(model, x, y, step)
        if step == 1:  # a finite loss over an overflowed router
            out.router_logits = [out.router_logits[0].detach() + math.inf]
        return out

    def aux(out):
        read.append(out)
        return _aux(out)

    with pytest.raises(Diverged) as e:
        train(model, forward, steps=5, warmup=1, lr=LR, stage="stage t", field="t.lr",
              fix="lower t.noise", routing_loss=aux)  # fmt: skip
    said = str(e.value)
    assert "router logits of MoE layer 0 are NaN or +inf at step 2 of 5" in said
    assert said.endswith("; fix: lower t.noise")
    assert len(read) == 1  # step 1's routing loss never ran
