"""The testbed model: shapes, causality, image placement, routing, upcycling, overfit, save/load."""

import pytest
import torch

from smar.losses import load_balancing_loss, mrd
from smar.moe import MoEBlock, weight_gradient_stop
from smar.testbed.blocks import linear_cross_entropy
from smar.testbed.model import TinyConfig, TinyModel

IMG = 3  # image token id


def tiny_config(**kw):
    base = dict(
        vocab_size=64,
        image_token_id=IMG,
        dim=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=48,
        max_seq_len=32,
        image_size=8,
        patch_size=4,
        vision_dim=16,
        vision_layers=1,
        vision_heads=2,
    )
    base.update(kw)
    return TinyConfig(**base)


def batch(cfg, B=2, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (B, S), generator=g)
    P = cfg.image_tokens
    ids[:, 1 : 1 + P] = IMG  # one image per sample after a BOS-like token
    pixels = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    labels = ids.masked_fill(ids == IMG, -100)
    return ids, pixels, labels


def test_shapes_and_modality_ids():
    cfg = tiny_config(moe_layers=[1])
    model = TinyModel(cfg)
    ids, pix, labels = batch(cfg)
    out = model(ids, pix, labels)
    assert out.logits.shape == (2, 12, 64)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (24, cfg.num_experts)
    assert torch.equal(out.modality_ids, (ids == IMG).long().reshape(-1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    out = model(ids, pix, attention_mask=mask)
    assert (out.modality_ids.view(2, 12)[1, -3:] == -1).all()


def test_causal():
    cfg = tiny_config(moe_layers=[0, 1])
    model = TinyModel(cfg).eval()
    ids, pix, _ = batch(cfg)
    a = model(ids, pix).logits
    ids2 = ids.clone()
    ids2[:, 9] = (ids2[:, 9] + 1) % 60 + 4
    b = model(ids2, pix).logits
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_image_features_land_at_placeholders():
    cfg = tiny_config()
    model = TinyModel(cfg)
    ids, pix, _ = batch(cfg)
    x = model.embed_inputs(ids, pix)
    feats = model.projector(model.vision(pix))  # (N, P, D)
    P = cfg.image_tokens
    for b in range(2):
        torch.testing.assert_close(x[b, 1 : 1 + P], feats[b])
    torch.testing.assert_close(x[:, 1 + P :], model.embed(ids[:, 1 + P :]))
    with pytest.raises(ValueError, match="placeholders per image"):
        model.embed_inputs(ids[:, : -P - 2].clone().fill_(IMG), pix)
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed_inputs(ids, None)


def test_upcycled_model_computes_the_dense_function():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = TinyModel(cfg).eval()
    ids, pix, _ = batch(cfg)
    before = model(ids, pix).logits
    model.upcycle_(layers="alternate")
    assert cfg.moe_layers == [1] and isinstance(model.layers[1].ffn, MoEBlock)
    torch.testing.assert_close(model(ids, pix).logits, before, rtol=1e-5, atol=1e-5)


def test_hard_routing_model_respects_partition():
    cfg = tiny_config(hard=True, num_experts=4, top_k=2)
    model = TinyModel(cfg).upcycle_(layers="all")
    ids, pix, _ = batch(cfg)
    out = model(ids, pix)
    for logits in out.router_logits:
        chosen = logits.topk(2).indices
        img = out.modality_ids == 1
        assert (chosen[img] >= 2).all() and (chosen[~img] < 2).all()


def test_set_trainable():
    cfg = tiny_config(modality_bias=True)
    model = TinyModel(cfg).upcycle_(layers="alternate")
    names = model.set_trainable("moe")
    assert names and all(n.startswith(("layers.1.ffn.", "projector.")) for n in names)
    assert "layers.1.ffn.router.bias" in names
    assert model.set_trainable("projector") == [n for n in names if n.startswith("projector.")]
    with pytest.raises(ValueError, match="trainable"):
        model.set_trainable("experts")


def test_overfits_one_multimodal_batch():
    torch.manual_seed(0)
    cfg = tiny_config(moe_layers=[0, 1], modality_bias=True)
    model = TinyModel(cfg)
    ids, pix, labels = batch(cfg, B=4, S=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = model(ids, pix, labels)
        loss = out.loss + 0.01 * load_balancing_loss(out.router_logits, top_k=2)
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and out.loss.item() < 0.05
    assert torch.isfinite(mrd(out.router_logits, out.modality_ids)).all()


def test_save_load_round_trip_bit_exact(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(
        modality_bias=True, vision_classes=10, vision_stem=4, vision_pool="max", vision_summary=True
    )
    model = TinyModel(cfg).upcycle_(layers="alternate", noise=0.01)
    with torch.no_grad():
        model.layers[1].ffn.router.bias.normal_()
    model.save(tmp_path / "m")
    again = TinyModel.load(tmp_path / "m")
    assert again.cfg == model.cfg
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    ids, pix, _ = batch(cfg)
    assert torch.equal(model.eval()(ids, pix).logits, again.eval()(ids, pix).logits)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinyModel.load(tmp_path / "missing")


def test_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(image_size=10)
    with pytest.raises(ValueError, match="moe_layers"):
        tiny_config(moe_layers=[5])
    with pytest.raises(ValueError, match="unknown TinyConfig"):
        TinyConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="vision_pool must be 'mean' or 'max'"):
        tiny_config(vision_pool="sum")


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_image_tokens_carry_the_summary_the_head_reads(pool):
    """With ``vision_summary`` every image token gets the pooled patch feature that the vision
    head classifies (mean or max), and the convolutional stem keeps one feature per patch."""
    torch.manual_seed(0)
    cfg = tiny_config(vision_stem=4, vision_pool=pool, vision_summary=True, vision_classes=5)
    model = TinyModel(cfg).eval()
    ids, pix, _ = batch(cfg)
    feats = model.vision(pix)
    assert feats.shape == (2, cfg.image_tokens, cfg.vision_dim)
    pooled = feats.amax(1, keepdim=True) if pool == "max" else feats.mean(1, keepdim=True)
    want = model.projector(feats + pooled)
    got = model.embed_inputs(ids, pix)[ids == IMG].view_as(want)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.vision.classify(pix), model.vision.head(pooled[:, 0]))


def test_logits_only_where_asked():
    # the loss from the labelled positions alone equals the loss from every position's logits,
    # and logits at a mask are the full logits' rows there
    cfg = tiny_config(moe_layers=[1])
    model = TinyModel(cfg)
    ids, pix, labels = batch(cfg)
    full = model(ids, pix, labels)
    none = model(ids, pix, labels, logits="none")
    assert none.logits is None
    assert torch.allclose(none.loss, full.loss, atol=1e-6)
    expect = torch.nn.functional.cross_entropy(
        full.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(none.loss, expect, atol=1e-6)
    read = torch.zeros_like(ids, dtype=torch.bool)
    read[0, 5:9] = read[1, -2:] = True
    out = model(ids, pix, logits=read)
    some = out.logits
    assert some.shape == (6, 64)
    assert torch.allclose(some, full.logits[read], atol=1e-5)
    # the last layer (MoE here) ran its FFN at the 6 positions read alone
    assert cfg.moe_layers == [cfg.n_layers - 1] and out.router_logits[-1].shape == (
        6,
        cfg.num_experts,
    )
    assert torch.allclose(out.router_logits[-1], full.router_logits[-1][read.reshape(-1)])
    with pytest.raises(ValueError, match="bool mask"):
        model(ids, pix, logits=read.long())
    with pytest.raises(ValueError, match="'all', 'none'"):
        model(ids, pix, logits="some")


def test_packed_choice_scores_equal_one_sequence_per_choice():
    # choice_logprobs packs an item's continuations after one prefix (positions and attention
    # mask as if alone) and reads the head only where it must: on a MoE model with images, each
    # choice's score equals the sum over its own unpacked sequence's full logits
    from types import SimpleNamespace

    from smar.testbed.scoring import ChoiceItem, choice_logprobs

    cfg = tiny_config(moe_layers=[0, 1])
    model = TinyModel(cfg).eval()
    with torch.no_grad():  # sharp attention, so that positions and masks show in the scores
        for layer in model.layers:
            layer.attn.qkv.weight.mul_(40)
    g = torch.Generator().manual_seed(3)
    image = SimpleNamespace(pixels=torch.randn(cfg.channels, 8, 8, generator=g))
    items = [
        ChoiceItem([10, 11, 12], [[20], [21, 22], [23], [24, 25, 26]], 1, image),
        ChoiceItem([16], [[40, 41], [40, 42], [43, 41], [43, 42]], 2),
        ChoiceItem([17], [[44, 45, 46], [44, 45], [44], [47, 48]], 3, image),
    ]
    kw = dict(bos_id=2, pad_id=0, image_id=IMG, image_tokens=cfg.image_tokens, batch_size=2)
    got = choice_logprobs(model, items, **kw)
    with torch.no_grad():
        for it, scores in zip(items, got, strict=True):
            img = [IMG] * cfg.image_tokens if it.image is not None else []
            pix = None if it.image is None else it.image.pixels[None]
            for c, value in zip(it.choices, scores, strict=True):
                seq = torch.tensor([[2, *img, *it.prompt, *c]])
                logp = model(seq, pix).logits[0].log_softmax(-1)
                start = 1 + len(img) + len(it.prompt)
                expect = sum(float(logp[start - 1 + n, t]) for n, t in enumerate(c))
                assert value == pytest.approx(expect, abs=1e-4)


def test_vision_probe_reads_each_benchmark_answer_off_its_block():
    """The stage-0 probe scores 1.0 for a head that outputs each image's targets and chance for
    one that outputs the same logits for every image: its blocks match the answer words."""
    from types import SimpleNamespace

    from smar.testbed.data import questions
    from smar.testbed.data.images import VISION_CLASSES
    from smar.testbed.stages import vision_probe

    truth = {}
    for task in questions.QA_TYPES:
        for s in questions.qa_samples(task, 200, 0, "eval", 16):
            truth[s.image.pixels.numpy().tobytes()] = s.image.target()

    def knows(x):
        return torch.stack([truth[p.numpy().tobytes()] for p in x]) * 10 - 5

    def blind(x):
        return torch.zeros(len(x), VISION_CLASSES).index_fill_(1, torch.tensor([3, 12]), 1.0)

    assert vision_probe(SimpleNamespace(vision=SimpleNamespace(classify=knows)), 200, 16) == {
        t: 1.0 for t in questions.QA_TYPES
    }
    chance = vision_probe(SimpleNamespace(vision=SimpleNamespace(classify=blind)), 200, 16)
    assert chance["digit"] < 0.25 and all(chance[t] < 0.45 for t in questions.QA_TYPES)


@pytest.mark.parametrize("N,chunk", [(70, 16), (64, 64), (3, 256)])
def test_fused_head_cross_entropy_equals_torch(N, chunk):
    """Loss and gradients of the chunked head + cross-entropy equal autograd's through
    ``F.linear`` and ``F.cross_entropy`` (float64; chunks that do not divide N), and without a
    gradient wanted it is the plain computation."""
    torch.manual_seed(0)
    h = torch.randn(N, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (N,))
    runs = []
    for fn in (
        lambda: linear_cross_entropy(h, w, t, chunk=chunk),
        lambda: torch.nn.functional.cross_entropy(h @ w.T, t),
    ):
        loss = fn()
        (2.5 * loss).backward()
        runs.append((loss.detach(), h.grad, w.grad))
        h.grad = w.grad = None
    for ours, ref in zip(*runs, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), runs[1][0])


def test_image_gradient_stop_keeps_the_projector_learning():
    """The stop control's mechanism in the testbed model (``stop = input_ids == <image>``, the
    shape of the MoE blocks' tokens): the same loss, the projector's and every non-MoE gradient
    as without the stop, the MoE weights' gradients changed; every token stopped, they are 0."""
    torch.manual_seed(0)
    cfg = tiny_config(moe_layers=[0, 1], modality_bias=True)
    model = TinyModel(cfg).double()
    with torch.no_grad():
        for layer in model.layers:  # experts that differ, so that the routers matter
            layer.ffn.router.bias.normal_()
            for w in (layer.ffn.gate_up_proj, layer.ffn.down_proj):
                w.add_(0.1 * w.std() * torch.randn_like(w))
    ids, pix, labels = batch(cfg, B=3, S=16)

    def grads(stop):
        with weight_gradient_stop(model, stop):
            out = model(ids, pix.double(), labels)
        out.loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), got

    (loss0, plain), (loss1, image) = grads(None), grads(ids == IMG)
    _, every = grads(torch.ones_like(ids, dtype=torch.bool))
    assert torch.equal(loss0, loss1)
    moe = [n for n in plain if ".ffn." in n]
    assert len(moe) == 2 * 4  # experts (2), router weight and bias, in two layers
    assert any(n.startswith("projector.") for n in plain)
    for n in plain:
        if n in moe:
            assert (image[n] - plain[n]).abs().max() > 1e-8, n
            assert torch.equal(every[n], torch.zeros_like(every[n])), n
        else:
            torch.testing.assert_close(image[n], plain[n], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(every[n], plain[n], rtol=1e-9, atol=1e-12)
