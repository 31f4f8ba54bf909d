"""The training path waits for the device only where asked: after the first forward (checked at
once), a forward, ``Regularizer.loss()`` and the backward call no tensor-to-Python conversion
from smar's code (each is a host-device synchronisation on a GPU); ``check()`` does, at logging
steps."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from dist_common import samples, tiny_moe  # noqa: E402

import smar  # noqa: E402

SMAR_DIR = os.path.dirname(smar.__file__)
SYNCING = ("__bool__", "item", "tolist", "__float__", "__int__", "numpy")


@contextlib.contextmanager
def syncs_from_smar():
    """Records the conversions that smar's own frames make, while the block runs."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, fn):
        def spy(self, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            mine = [f for f in frames if f.filename.startswith(SMAR_DIR)]
            if mine:
                seen.append(f"{name} at {mine[-1].filename}:{mine[-1].lineno}")
            return fn(self, *args, **kwargs)

        return spy

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def step(model, reg, ids):
    out = model(input_ids=ids, labels=ids)
    (out.loss + reg.loss()).backward()
    reg.term_tensors()


@pytest.mark.parametrize("accumulate", [False, True])
def test_no_sync_after_the_first_forward(accumulate):
    model = tiny_moe().train()
    reg = smar.attach(model, smar.SMARConfig(accumulate=accumulate, z_weight=1e-3))
    ids = torch.stack([s["input_ids"] for s in samples(4)])
    with syncs_from_smar() as first:
        step(model, reg, ids)
    assert first, "the first forward is checked at once (so the spy can see a sync)"
    with syncs_from_smar() as later:
        for _ in range(2):
            step(model, reg, ids)
        reg.step()
    assert later == []
    with syncs_from_smar() as checked:
        reg.check()
    assert checked


def test_check_always_waits_every_forward():
    model = tiny_moe().train()
    reg = smar.attach(model, smar.SMARConfig(check="always"))
    ids = torch.stack([s["input_ids"] for s in samples(4)])
    step(model, reg, ids)
    with syncs_from_smar() as later:
        step(model, reg, ids)
    assert later


def test_a_deferred_problem_surfaces_at_check():
    model = tiny_moe().train()
    reg = smar.attach(model, smar.SMARConfig())
    ids = torch.stack([s["input_ids"] for s in samples(4)])
    step(model, reg, ids)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.router.weight[0, 0] = float("nan")
    model(input_ids=ids)
    reg.loss()  # no error yet: nothing waits for the device
    with pytest.raises(ValueError, match="not finite"):
        reg.check()
    reg.check()  # reported once
