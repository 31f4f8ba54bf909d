"""Every multimodal MoE family with its own multimodal forward: an image through its image
processor and vision tower, its placeholders in the text (tests/helpers/multimodal.py).

For each: the modality ids smar derives equal the ones the config's image token id (and, where
the family takes them, the processor's ``mm_token_type_ids``) give; the router output smar captures
is what the model records itself (the logits whose softmax a probability-recording router records);
and one band-loss step changes the modality bias of text and of image. A family whose multimodal
forward cannot run here is skipped with the reason; docs/huggingface.md lists them.
"""

import pathlib
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import families  # noqa: E402
import multimodal  # noqa: E402
from test_families import PROBABILITY_RECORDERS, own_router_logits  # noqa: E402

import smar  # noqa: E402

MULTIMODAL = """aria deepseek_ocr2 dots3_note ernie4_5_vl_moe gemma4 glm4v_moe glm5_next hy_v4_vl
inkling inkling2 llama4 minimax_m3_vl mistral_large4 muse_spark nemotron_h_omni qwen3_5_moe
qwen3_omni_moe qwen3_vl_moe qwen4_exp step3p7 unlimited_ocr""".split()


def _built(family):
    if family not in families.families():
        pytest.skip(f"{family}: not in the installed transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = families.build(family)
        try:
            batch, ids = multimodal.multimodal_batch(family, model)
        except multimodal.CannotRun as e:
            pytest.skip(f"{family}: multimodal forward cannot run here: {e}")
    return model, batch, ids


@pytest.mark.parametrize("family", MULTIMODAL)
def test_multimodal_forward_ids_capture_and_bias(family):
    model, batch, ids = _built(family)
    bias = families.status(family) == "full"
    with torch.no_grad():
        own = own_router_logits(model, batch)
    reg = smar.attach(model, smar.SMARConfig(modality_bias=bias, band=(5.0, 6.0)))
    try:
        out = model(**batch)
        assert torch.equal(reg.modality_ids.reshape(ids.shape), ids), family
        assert (ids == 1).sum() > 0 and (ids == 0).sum() > 0
        mine = reg.logits()
        assert len(mine) == len(own) > 0
        for a, theirs in zip(mine, own, strict=True):
            theirs = theirs.reshape(a.shape)
            if family in PROBABILITY_RECORDERS:
                torch.testing.assert_close(torch.softmax(a.float(), -1), theirs.float())
            else:
                assert torch.equal(a.detach(), theirs), family
        if not bias:
            return
        before = [b.detach().clone() for b in reg.bias_parameters()]
        params = reg.bias_parameters()
        opt = torch.optim.SGD(params, lr=1.0)
        loss = reg.loss()
        assert loss > 0  # the band (5, 6) is above any tiny model's MRD: the loss pulls
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved = torch.stack([(b.detach() - o).abs().sum(dim=1) for b, o in zip(params, before,
                                                                                  strict=True)])  # fmt: skip
        assert (moved[:, :2] > 0).all(), moved  # (layers, modalities): text and image rows
        del out
    finally:
        reg.detach()
