"""Every MoE family of the installed transformers (enumerated from the library: tests/families.py),
as a tiny random model: smar finds the routers the model declares, captures exactly the logits the
model records itself, a zero bias changes no output bit, a large bias moves image tokens to the
expert it favours, and gradients reach router and bias.

Families whose shrunk default config does not build or run are skipped with the reason
(``pytest -rs``); the README's family table is this file's result. The sweep builds about 40
models (about 15 s on 2 idle cores) and runs in the default suite:
``python -m pytest -rs tests/test_families.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import families  # noqa: E402

import smar  # noqa: E402
from smar.adapters import find_routers  # noqa: E402
from smar.bias import ModalityBiasRouter  # noqa: E402

FAMILIES = families.families()
# Families smar finds and captures but cannot give a modality bias, and why (the README's table).
CAPTURE_ONLY = {
    "zaya": "ZayaRouter computes its logits through several linear layers (a small MLP)",
}
# Families whose declared router output is not (T, E) logits.
NOT_YET = {
    "doge": "DogeCDMoE records product-key scores (B, S, 2 x sqrt(E)), not (T, E) logits",
}
ALL = ("mlp", "attention")
_BUILT: dict = {}


def tiny(family: str, bias: bool = False):
    """The family's tiny model and inputs, or a skip naming why it does not build or run."""
    if family in NOT_YET:
        pytest.skip(f"{family}: not yet: {NOT_YET[family]}")
    if bias and family in CAPTURE_ONLY:
        pytest.skip(f"{family}: capture only: {CAPTURE_ONLY[family]}")
    if family not in _BUILT:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = families.build(family)
                batch = families.inputs(model)
                with torch.no_grad():
                    model(**batch)
            if not own_router_logits(model, batch):
                raise ValueError("the default config has no MoE layer")
            _BUILT[family] = (model, batch, None)
        except Exception as e:  # upstream defaults that do not shrink: reported, not hidden
            _BUILT[family] = (None, None, f"{type(e).__name__}: {str(e)[:160]}")
    model, batch, why = _BUILT[family]
    if why:
        pytest.skip(f"{family}: tiny default config does not build or run: {why}")
    return model, batch


def image_ids(batch: dict) -> torch.Tensor:
    """Modality ids ``(B, S)``: tokens 2..5 of each sample are image tokens."""
    ids = torch.zeros_like(batch["input_ids"])
    ids[:, 2:6] = 1
    return ids


def own_router_logits(model, batch) -> list[torch.Tensor]:
    """What the model records itself with ``output_router_logits=True``, each tensor once
    (JetMoE records its attention routers' logits twice: from the gating and from the block)."""
    out = model(**batch, output_router_logits=True)
    found = []
    for key in ("encoder_router_logits", "router_logits", "decoder_router_logits"):
        value = getattr(out, key, None)
        if value is None:
            continue
        for z in value:
            z = z[1] if isinstance(z, tuple) else z  # Switch/NLLB: (logits, expert index)
            if isinstance(z, torch.Tensor) and not any(z is seen for seen in found):
                found.append(z)
    return found


@pytest.fixture(autouse=True)
def _detach_all():
    yield
    for model, _, _ in _BUILT.values():
        reg = getattr(model, "_smar_regularizer", None) if model is not None else None
        if reg is not None and reg() is not None:
            reg().detach()


def test_families_are_enumerated_from_the_library():
    assert len(FAMILIES) >= 60
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "jetmoe", "gpt_oss"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_found_and_captured_as_the_model_records_them(family):
    model, batch = tiny(family)
    with torch.no_grad():
        own = own_router_logits(model, batch)
        sites = find_routers(model, kinds=ALL)
        assert len(sites) == len(own) > 0
        with smar.record(model, kinds=ALL) as rec:
            model(**batch)
            mine = rec.logits()
    assert len(mine) == len(own)
    # Each recorded tensor is one captured tensor (JetMoE's module order puts the MLP router
    # before the attention router that runs first).
    unmatched = list(mine)
    for theirs in own:
        hit = next(i for i, a in enumerate(unmatched) if torch.equal(a, theirs.reshape(a.shape)))
        unmatched.pop(hit)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_bias_is_bit_identical_and_a_large_bias_routes_image_tokens(family):
    model, batch = tiny(family, bias=True)
    with torch.no_grad():
        before = model(**batch)[0]
        reg = smar.attach(model, smar.SMARConfig(routers="all"))
        reg.set_modality(image_ids(batch))
        assert torch.equal(model(**batch)[0], before)
        unbiased = [z.clone() for z in reg.logits()]
        assert len(reg.bias_parameters()) == len(reg.sites)
        favoured = 3
        for b in reg.bias_parameters():
            b[1, favoured] = 100.0
        chosen = experts_chosen(model, reg, batch)
        biased = reg.logits()
    image = image_ids(batch).reshape(-1).bool()  # (T,)
    for experts in chosen:
        assert (experts[image] == favoured).any(dim=-1).all()
    # Text tokens get no bias: the first router to run sees their logits unchanged (later ones
    # see hidden states that attention mixed with the re-routed image tokens).
    assert any(torch.equal(a[~image], b[~image]) for a, b in zip(unbiased, biased, strict=True))
    reg.detach()
    assert not any(isinstance(m, ModalityBiasRouter) for m in model.modules())


def experts_chosen(model, reg, batch) -> list[torch.Tensor]:
    """The experts each router chose per token ``(T, K)``: the router's own index output where
    it returns one, else the top-k of its logits (which its MoE block takes)."""
    outputs = []
    handles = [
        w.register_forward_hook(lambda m, a, o: outputs.append(o))
        for w in model.modules()
        if isinstance(w, ModalityBiasRouter)
    ]
    model(**batch)
    for h in handles:
        h.remove()
    chosen = []
    for site, out, z in zip(reg.sites, outputs, reg.logits(), strict=True):
        outs = out if isinstance(out, tuple) else (out,)
        index = [t.reshape(z.shape[0], -1) for t in outs if isinstance(t, torch.Tensor)
                 and not t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == site.top_k
                 and t.numel() == z.shape[0] * site.top_k]  # fmt: skip
        experts = index[0] if index else torch.topk(z, site.top_k, dim=-1).indices  # (T, K)
        chosen.append(experts.sort(dim=-1).values)
    return chosen


@pytest.mark.parametrize("family", sorted(CAPTURE_ONLY))
def test_capture_only_families_refuse_the_bias_with_a_reason(family):
    model, batch = tiny(family)
    with pytest.raises(ValueError, match="cannot tell which linear layer"):
        smar.attach(model)
    smar.attach(model, smar.SMARConfig(modality_bias=False)).detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_router_and_bias(family):
    model, batch = tiny(family, bias=True)
    reg = smar.attach(model, smar.SMARConfig(routers="all"))
    reg.set_modality(image_ids(batch))
    model.zero_grad()
    model(**batch)
    reg.loss().backward()
    for site, bias in zip(reg.sites, reg.bias_parameters(), strict=True):
        weight = smar.bias.logit_weight(site.module)
        assert weight.grad is not None and weight.grad.abs().sum() > 0, site.name
        assert bias.grad is not None and bias.grad.abs().sum() > 0, site.name
    reg.detach()
    model.zero_grad()
