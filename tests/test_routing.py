"""attach / record on a toy MoE model (no transformers): hooks, modality ids, bias, loss, detach."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import smar
from smar.adapters import Adapter
from smar.bias import ModalityBiasRouter
from smar.losses import routing_objective
from smar.moe import MoEBlock

IMG = 9


class Layer(nn.Module):
    def __init__(self, dim, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, h):
        return h + self.mlp(h)


class Toy(nn.Module):
    """Embedding, L residual MoE layers, LM head; image placeholder token 9."""

    def __init__(self, num_layers=2, dim=16, mlp=None):
        super().__init__()
        self.config = SimpleNamespace(image_token_id=IMG)
        self.embed = nn.Embedding(16, dim)
        make = mlp or (lambda: MoEBlock(dim, 32, num_experts=4, top_k=2))
        self.layers = nn.ModuleList(Layer(dim, make()) for _ in range(num_layers))
        self.head = nn.Linear(dim, 16)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (2, 10), generator=g)
    ids[:, 1:6] = IMG
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def test_captures_each_layer_and_derives_modality_with_padding():
    torch.manual_seed(0)
    model = Toy()
    ids, mask = batch()
    with smar.record(model) as rec:
        model(input_ids=ids, attention_mask=mask)
        logits = rec.logits()
        assert rec.captured_layers == [0, 1] and rec.top_k == 2
        for z, layer in zip(logits, model.layers, strict=True):
            assert torch.equal(z, layer.mlp.last_router_logits)
        expected = torch.where(ids == IMG, 1, 0).masked_fill(mask == 0, -1).reshape(-1)
        assert torch.equal(rec.modality_ids, expected)
    assert not model._forward_pre_hooks and not model.layers[0].mlp.router._forward_hooks


def test_loss_is_routing_objective_of_the_capture_and_reaches_router_and_bias():
    torch.manual_seed(0)
    model = Toy()
    ids, mask = batch()
    cfg = smar.SMARConfig(z_weight=0.1)
    reg = smar.attach(model, cfg)
    model(input_ids=ids, attention_mask=mask)
    loss = reg.loss()
    expected, _ = routing_objective(
        reg.logits(), reg.modality_ids, top_k=2, smar_weight=1.0, lb_weight=0.01, z_weight=0.1
    )
    assert torch.allclose(loss, expected)
    loss.backward()
    for layer, bias in zip(model.layers, reg.bias_parameters(), strict=True):
        assert layer.mlp.router.router.weight.grad.abs().sum() > 0
        assert bias.grad.abs().sum() > 0
    terms = reg.terms()
    assert {"smar/total", "smar/band", "smar/lb", "smar/z", "smar/mrd"} <= set(terms)
    assert {"smar/layer00/mrd", "smar/layer01/mrd"} <= set(terms)
    assert all(isinstance(v, float) for v in terms.values())
    reg.detach()
    assert not any(isinstance(m, ModalityBiasRouter) for m in model.modules())


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    model = Toy()
    reg = smar.attach(model)
    ids, _ = batch()
    model(input_ids=ids[:1, :7])
    short = reg.loss()
    padded = torch.cat([ids[:1, :7], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    model(input_ids=padded, attention_mask=mask)
    assert torch.allclose(reg.loss(), short, atol=1e-6)


def test_explicit_modality_for_inputs_embeds():
    torch.manual_seed(0)
    model = Toy()
    reg = smar.attach(model)
    emb = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="set_modality"):
        model(inputs_embeds=emb)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[:, :4] = 1
    reg.set_modality(ids)
    model(inputs_embeds=emb)
    assert torch.equal(reg.modality_ids, ids.reshape(-1))
    assert torch.isfinite(reg.loss())


def test_no_capture_yet_is_an_error():
    reg = smar.attach(Toy())
    with pytest.raises(ValueError, match="run a forward"):
        reg.loss()


def test_no_router_names_model_and_adapter():
    with pytest.raises(ValueError, match=r"no router found in Toy.*adapter="):
        smar.attach(Toy(mlp=lambda: nn.Linear(16, 16)))


class MyRouter(nn.Linear):
    """A router returning (scores, logits), as some architectures do."""

    top_k = 1

    def forward(self, x):
        z = super().forward(x).reshape(-1, self.out_features)  # (T, E)
        return z.softmax(-1), z


class MyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = MyRouter(16, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, h):
        scores, _ = self.gate(h)  # (T, E)
        pick = scores.argmax(-1)  # (T,)
        x = h.reshape(-1, h.shape[-1])
        out = torch.stack([self.experts[int(e)](x[t]) for t, e in enumerate(pick)])
        return out.reshape(h.shape) * scores.amax(-1).reshape(*h.shape[:-1], 1)


def test_user_adapter():
    torch.manual_seed(0)
    model = Toy(mlp=MyMoE)
    adapter = Adapter("mine", classes=(MyRouter,), index=1)
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False), adapter=adapter)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    assert [z.shape for z in reg.logits()] == [(20, 4), (20, 4)]
    reg.loss().backward()
    assert model.layers[0].mlp.gate.weight.grad is not None
    reg.detach()
    # The bias needs no re-routing code: it goes into the output of the router's linear layer.
    reg = smar.attach(model, adapter=adapter)
    with torch.no_grad():
        for b in reg.bias_parameters():
            b[1, 2] = 100.0
        model(input_ids=ids, attention_mask=mask)
    image = (ids == IMG).reshape(-1)
    for z in reg.logits():
        assert (z[image].argmax(-1) == 2).all()
    reg.detach()
    refuse = Adapter("mine", classes=(MyRouter,), index=1, bias=False, note="because")
    with pytest.raises(ValueError, match=r"cannot add a modality bias to MyRouter \(because\)"):
        smar.attach(Toy(mlp=MyMoE), adapter=refuse)


def test_model_balancing_loss_is_detected():
    model = Toy()
    model.config.text_config = SimpleNamespace(output_router_logits=True, router_aux_loss_coef=0.01)
    with pytest.warns(UserWarning, match="output_router_logits=False"):
        smar.attach(model).detach()


def test_config_validation():
    with pytest.raises(ValueError, match="hinge"):
        smar.SMARConfig(hinge="cubic")
    with pytest.raises(ValueError, match="modality"):
        smar.SMARConfig(modality="word")
    with pytest.raises(ValueError, match="lb_weight"):
        smar.SMARConfig(lb_weight=-1)
    assert smar.SMARConfig(band=[1.0, 2.0]).band == (1.0, 2.0)
