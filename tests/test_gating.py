"""smar.gating: the MRD smar reports for the families whose router output it once misread equals
one computed by hand from each router's own pre-activation scores and its own activation."""

import pathlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import smar
from smar.gating import recorded_activation

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import families  # noqa: E402


def _softmax(z):
    return torch.softmax(z, -1)


def _sigmoid(z):
    s = torch.sigmoid(z)
    return s / s.sum(-1, keepdim=True)


def _sqrtsoftplus(z):
    s = F.softplus(z).sqrt()
    return s / s.sum(-1, keepdim=True)


# family -> (the submodule of the router whose output is the pre-activation score, or None for
# the router's output 0; the activation the family scores experts with). Before smar.gating:
# Gemma 4 and diffusion_gemma were soft-maxed twice, MuseSpark and DeepSeek-V4 read as softmax.
CASES = {
    "gemma4": ("proj", _softmax),
    "diffusion_gemma": ("proj", _softmax),
    "muse_spark": (None, _sigmoid),
    "deepseek_v4": (None, _sqrtsoftplus),
}


def _by_hand(scores: torch.Tensor, ids: torch.Tensor, act) -> float:
    p = act(scores.double())  # (T, E)
    P0, P1 = p[ids == 0].mean(0), p[ids == 1].mean(0)
    return float(((P0 - P1) * (P0.log() - P1.log())).sum())


@pytest.mark.parametrize("family", sorted(CASES))
def test_reported_mrd_equals_the_mrd_of_the_routers_own_scores(family):
    part, act = CASES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = families.build(family).eval()
    batch = families.inputs(model, batch=2, seq=16)
    T = batch["input_ids"].numel()
    ids = torch.zeros(T, dtype=torch.long)
    ids[T // 2 :] = 1
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False, lb_weight=0.0))
    scores = {}
    hooks = []
    for site in reg.sites:
        with torch.no_grad():  # routing far from uniform, so that the MRD is worth comparing
            smar.bias.logit_weight(site.module).mul_(40.0)
        target = site.module.get_submodule(part) if part else site.module

        def keep(module, args, out, layer=site.layer):
            scores[layer] = (out if part else out[0]).detach().reshape(T, -1)

        hooks.append(target.register_forward_hook(keep))
    reg.set_modality(ids)
    with torch.no_grad():
        model(**batch)
    terms = reg.terms()
    for h in hooks:
        h.remove()
    assert scores
    for layer, z in scores.items():
        want = _by_hand(z, ids, act)
        assert want > 0.01  # a divergence a misreading would change
        assert terms[f"smar/layer{layer:02d}/mrd"] == pytest.approx(want, rel=1e-4), layer


def test_recorded_activation_reads_the_returned_expression():
    class Probs(torch.nn.Module):
        def forward(self, x):
            scores = self.proj(x)
            probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
            return probs, scores

    class Logits(torch.nn.Module):
        def forward(self, x):
            logits = x @ x.T
            return logits, logits.sigmoid()

    assert recorded_activation(Probs, 0) == "softmax"
    assert recorded_activation(Probs, 1) is None
    assert recorded_activation(Logits, 0) is None
    assert recorded_activation(Logits, 1) == "sigmoid"
