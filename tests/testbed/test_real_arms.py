"""The sample-level arms and controls of `smar real run` (docs/real.md): their stop mask, their
configs, `--freeze-dense`, and the sample-level stop checked against a by-hand gradient."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def test_stop_mask_is_the_image_tokens_or_every_token_of_an_image_row():
    from smar.testbed.real.train import stop_mask

    ids = torch.tensor([[5, 9, 9, 6, 0], [5, 6, 7, 8, 0]])
    assert stop_mask(ids, 9, "token").tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert stop_mask(ids, 9, "sample").tolist() == [[1] * 5, [0] * 5]


def test_sample_arms_configs():
    from smar.testbed.real.train import ARMS, arm_config

    assert {"stop_sample", "smar_sample", "hard_sample"} <= set(ARMS)
    smar_s, hard_s = arm_config("smar_sample"), arm_config("hard_sample")
    assert smar_s.modality == "sample" and smar_s.carry and smar_s.smar_weight > 0
    assert hard_s.modality == "sample" and hard_s.modality_bias and hard_s.smar_weight == 0
    assert arm_config("stop_sample") == arm_config("none")


@pytest.fixture(scope="module")
def vlm():
    from test_real_run import _tiny_base

    from smar.testbed.real.model import build_run_vlm
    from smar.testbed.real.run import RealConfig

    cfg = RealConfig.smoke()
    lm, tok = _tiny_base()
    model, proc = build_run_vlm(lm, tok, cfg.vision, cfg.layers)
    return model, proc


def test_freeze_dense_leaves_the_dense_mlps_out(vlm):
    from smar.moe import MoEBlock
    from smar.testbed.real.train import trainable_for_instruct

    model, _ = vlm
    every = set(trainable_for_instruct(model))
    moe_only = set(trainable_for_instruct(model, freeze_dense=True))
    dense = every - moe_only
    moe = {f"{n}." for n, m in model.named_modules() if isinstance(m, MoEBlock)}
    assert dense and all(".mlp." in n and not n.startswith(tuple(moe)) for n in dense)
    assert moe_only and all(n.startswith(tuple(moe)) or "projector" in n for n in moe_only)
    assert all(p.requires_grad == (n in moe_only) for n, p in model.named_parameters())


def test_stop_sample_keeps_the_forward_and_leaves_the_text_rows_gradient(vlm):
    """With every token of the image row stopped, the MoE weights' gradient is the one the text
    row alone gives (its loss counted over the whole batch's answer tokens)."""
    from smar.moe import MoEBlock, weight_gradient_stop
    from smar.testbed.real.data import collate, qa_chat
    from smar.testbed.real.train import stop_mask

    model, proc = vlm
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is two"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "it is two"}]}],
            "images": []}  # fmt: skip
    batch = collate(proc, [qa_chat(1, 0, "train")[0], text])
    image_row = stop_mask(batch["input_ids"], model.config.image_token_index, "sample")
    assert image_row[0].all() and not image_row[1].any()
    experts = [p for m in model.modules() if isinstance(m, MoEBlock) for p in m.parameters()]
    model.train()

    def grads(inputs, stop=None):
        model.zero_grad(set_to_none=True)
        with weight_gradient_stop(model, stop):
            out = model(**inputs)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in experts]

    plain_loss, _ = grads(batch)
    stop_loss, stopped = grads(batch, image_row)
    assert torch.equal(stop_loss, plain_loss)  # the forward is the same bits
    labels = batch["labels"].clone()
    n_all = int((labels != -100).sum())
    labels[0] = -100  # the text row's answer alone
    n_text = int((labels != -100).sum())
    _, text_only = grads({**batch, "labels": labels})
    for a, b in zip(stopped, text_only, strict=True):
        torch.testing.assert_close(a, b * n_text / n_all, rtol=1e-4, atol=1e-7)
    model.eval()
