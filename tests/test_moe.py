"""MoE block, router bias, hard routing and upcycling against explicit references."""

import pytest
import torch

from smar.experts import bucket, bucketed_rows
from smar.losses import load_balancing_loss, smar_loss
from smar.moe import MoEBlock, Router, SwiGLU, default_partition, weight_gradient_stop
from smar.upcycle import upcycle


def reference_moe(block: MoEBlock, x, modality_ids=None):
    """Every token, one at a time: softmax over all experts, top-k, renormalise, sum of experts."""
    logits = block.router(x, modality_ids)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = logits[t].softmax(-1)
        w, idx = p.topk(block.top_k)
        w = w / w.sum()
        for j in range(block.top_k):
            e = int(idx[j])
            gu = block.gate_up_proj[e] @ x[t]
            g, u = gu.chunk(2)
            out[t] += w[j] * (block.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    return out


@pytest.mark.parametrize("E,K", [(4, 2), (8, 2), (4, 1), (3, 3)])
def test_block_matches_token_by_token_reference(E, K):
    torch.manual_seed(0)
    block = MoEBlock(16, 24, E, K)
    x = torch.randn(40, 16)
    torch.testing.assert_close(block(x), reference_moe(block, x), rtol=1e-5, atol=1e-6)


def reference_experts(block: MoEBlock, x, experts, gates):
    """The experts' weighted sum, token by token, for a given choice of experts and gates."""
    rows = []
    for t in range(x.shape[0]):
        row = 0
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            g, u = (block.gate_up_proj[e] @ x[t]).chunk(2)
            row = row + gates[t, j] * (block.down_proj[e] @ (torch.nn.functional.silu(g) * u))
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("E,K,T", [(4, 2, 40), (8, 2, 3), (3, 3, 20)])
def test_block_gradients_match_the_reference(E, K, T):
    """The hand-written backward of the experts gives autograd's gradients of the token-by-token
    reference, in float64, for the input, both expert weights and the gates; with 8 experts and
    3 tokens some experts get no token."""
    torch.manual_seed(0)
    block = MoEBlock(16, 24, E, K).double()
    x = torch.randn(T, 16, dtype=torch.float64)
    _, experts, gates = block.route(x)
    w = torch.randn(T, 16, dtype=torch.float64)
    grads = []
    for fn in (block._dispatch, lambda *a: reference_experts(block, *a)):
        xi = x.clone().requires_grad_(True)
        gi = gates.detach().double().requires_grad_(True)
        (fn(xi, experts, gi) * w).sum().backward()
        grads.append([xi.grad, gi.grad, block.gate_up_proj.grad, block.down_proj.grad])
        block.zero_grad(set_to_none=True)
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_block_gradcheck_and_frozen_experts():
    torch.manual_seed(0)
    block = MoEBlock(6, 5, 4, 2).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    _, experts, gates = block.route(x)
    gates = gates.detach().double().requires_grad_(True)
    # the expert weights are passed so that gradcheck perturbs them (in place: they are the
    # block's own parameters) and checks their gradients too
    torch.autograd.gradcheck(
        lambda v, g, w1, w2: block._dispatch(v, experts, g),
        (x, gates, block.gate_up_proj, block.down_proj),
    )
    block.gate_up_proj.requires_grad_(False)
    block.down_proj.requires_grad_(False)
    block(x).sum().backward()  # frozen experts: the input and the router still get gradients
    assert block.gate_up_proj.grad is None and block.down_proj.grad is None
    assert x.grad.abs().sum() > 0 and block.router.weight.grad.abs().sum() > 0


def test_block_output_does_not_depend_on_where_the_weights_lie():
    """A checkpoint's weights load as views at unaligned offsets: the same weights there must give
    the same bits (for experts of a few tokens too), or a saved model does not round-trip. An
    expert of exactly one token is the exception, as in transformers' eager loop: MKL computes a
    one-row product as a matrix-vector product, whose bits depend on alignment."""
    torch.manual_seed(0)
    block = MoEBlock(32, 64, 4, 2)
    moved = MoEBlock(32, 64, 4, 2)
    moved.load_state_dict(block.state_dict())
    with torch.no_grad():
        for p in (moved.gate_up_proj, moved.down_proj, moved.router.weight):
            buf = torch.empty(p.numel() + 16)
            p.data = buf[6 : 6 + p.numel()].view(p.shape).copy_(p)  # 24 bytes off alignment
        for T in (7, 10, 40):  # every expert gets 0 or >= 2 tokens (checked)
            x = torch.randn(T, 32)
            counts = torch.bincount(block.route(x)[1].reshape(-1), minlength=4)
            assert not (counts == 1).any()
            assert torch.equal(block(x), moved(x))


def test_block_accepts_batch_sequence_and_keeps_router_logits():
    torch.manual_seed(0)
    block = MoEBlock(16, 24, 4, 2)
    x = torch.randn(3, 5, 16)
    y = block(x)
    assert y.shape == x.shape
    assert block.last_router_logits.shape == (15, 4)
    torch.testing.assert_close(y.reshape(15, 16), reference_moe(block, x.reshape(15, 16)))


def test_router_top_k_equals_experts_used():
    """Perturbing one expert's weights changes exactly the tokens that chose that expert."""
    torch.manual_seed(1)
    block = MoEBlock(16, 24, 4, 2)
    x = torch.randn(64, 16)
    _, experts, _ = block.route(x)
    before = block(x).detach()
    for e in range(4):
        with torch.no_grad():
            block.down_proj[e] += 1.0
        after = block(x).detach()
        with torch.no_grad():
            block.down_proj[e] -= 1.0
        changed = (after - before).abs().amax(-1) > 1e-6
        chose = (experts == e).any(-1)
        assert torch.equal(changed, chose)


def test_gradients_reach_router_experts_and_bias():
    torch.manual_seed(0)
    block = MoEBlock(16, 24, 4, 2, modality_bias=True)
    x = torch.randn(32, 16)
    ids = torch.randint(0, 2, (32,))
    out = block(x, ids)
    loss = (
        out.pow(2).mean()
        + smar_loss([block.last_router_logits], ids)
        + load_balancing_loss([block.last_router_logits], top_k=2)
    )
    loss.backward()
    for p in (block.router.weight, block.router.bias, block.gate_up_proj, block.down_proj):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_zero_bias_reproduces_unbiased_routing_exactly():
    torch.manual_seed(0)
    plain = Router(16, 4)
    biased = Router(16, 4, modality_bias=True)
    biased.weight.data.copy_(plain.weight.data)
    x = torch.randn(50, 16)
    ids = torch.randint(-1, 2, (50,))
    assert torch.equal(plain(x), biased(x, ids))
    with torch.no_grad():
        biased.bias[1, 3] = 5.0
    out = biased(x, ids)
    assert torch.equal(out[ids != 1], plain(x)[ids != 1])
    torch.testing.assert_close(out[ids == 1, 3], plain(x)[ids == 1, 3] + 5.0)


@pytest.mark.parametrize("partition", [None, [[0, 1, 2], [3]], [[1, 3], [0, 2]]])
def test_hard_routing_never_crosses_modalities(partition):
    torch.manual_seed(0)
    E = 4
    block = MoEBlock(
        16, 24, E, 1 if partition == [[0, 1, 2], [3]] else 2, hard=True, partition=partition
    )
    groups = partition or default_partition(E)
    x = torch.randn(200, 16)
    ids = torch.randint(-1, 2, (200,))
    _, experts, gates = block.route(x, ids)
    for t in range(200):
        if ids[t] < 0:
            continue
        for j in range(block.top_k):
            if gates[t, j] > 0:
                assert int(experts[t, j]) in groups[int(ids[t])]
    block(x, ids).sum().backward()  # -inf masked logits keep gradients finite
    assert torch.isfinite(block.router.weight.grad).all()


def test_default_partition_is_halves():
    assert default_partition(4) == [[0, 1], [2, 3]]
    assert default_partition(8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="num_experts"):
        default_partition(1)


@pytest.mark.parametrize("shape", [(7, 16), (2, 9, 16)])
def test_upcycled_output_equals_dense(shape):
    torch.manual_seed(0)
    dense = SwiGLU(16, 40)
    block = upcycle(dense, num_experts=4, top_k=2)
    x = torch.randn(*shape)
    torch.testing.assert_close(block(x), dense(x), rtol=1e-5, atol=1e-6)
    noisy = upcycle(dense, num_experts=4, top_k=2, noise=0.1)
    assert not torch.allclose(noisy(x), dense(x), atol=1e-4)


def test_upcycle_hf_style_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    cfg = transformers.Qwen2Config(hidden_size=16, intermediate_size=40, hidden_act="silu")
    mlp = Qwen2MLP(cfg)
    block = upcycle(mlp, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="top_k"):
        MoEBlock(8, 8, 4, 5)
    with pytest.raises(ValueError, match="modality_ids"):
        MoEBlock(8, 8, 4, 2, modality_bias=True)(torch.randn(3, 8))
    with pytest.raises(ValueError, match="partition"):
        Router(8, 4, hard=True, partition=[[0, 1]])
    with pytest.raises(ValueError, match="partition"):
        Router(8, 4, hard=True, partition=[[0, 9], [1]])
    with pytest.raises(ValueError, match="num_modalities"):
        Router(8, 4, modality_bias=True)(torch.randn(3, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="cannot upcycle"):
        upcycle(torch.nn.Linear(4, 4), num_experts=2, top_k=1)


def test_block_under_bf16_autocast_matches_the_reference_in_bf16():
    """Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the experts compute in bf16 (as
    autocast computes a linear layer) from float32 master weights: the output is bf16 and equals
    the token-by-token reference on the bf16-cast weights and input; gradients reach the float32
    weights and equal that reference's."""
    torch.manual_seed(0)
    block = MoEBlock(32, 48, 4, 2)
    x = torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, experts, gates = block.route(x)
        out = block._dispatch(x, experts, gates.to(x.dtype))
    assert out.dtype == torch.bfloat16
    (out.float() ** 2).sum().backward()
    ours = [block.gate_up_proj.grad.clone(), block.down_proj.grad.clone()]
    w1 = block.gate_up_proj.detach().clone().requires_grad_(True)
    w2 = block.down_proj.detach().clone().requires_grad_(True)
    holder = type("B", (), {"gate_up_proj": w1.bfloat16(), "down_proj": w2.bfloat16()})
    want = reference_experts(holder, x.bfloat16(), experts, gates.detach().bfloat16())
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    (want.float() ** 2).sum().backward()
    assert block.gate_up_proj.dtype == torch.float32 and ours[0].dtype == torch.float32
    for mine, theirs in zip(ours, (w1.grad, w2.grad), strict=True):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, theirs, rtol=5e-2, atol=5e-2 * theirs.abs().max().item())


# ----------------------------------------------------------------------------------------------
# weight_gradient_stop: stopped tokens give nothing to the weights' gradients, the rest unchanged


def reference_stopped_moe(block: MoEBlock, x, ids, stop):
    """Token by token, a stopped token computing with detached router and expert weights (and
    bias): what the stop must give, forward and backward. Returns the output and the logits."""
    rows, logits = [], []
    for t in range(x.shape[0]):
        cut = (lambda p: p.detach()) if bool(stop[t]) else (lambda p: p)
        z = (x[t] @ cut(block.router.weight).t()).float()  # (E,) the router's float32 logits
        z = z + cut(block.router.bias)[ids[t]]
        w, idx = z.softmax(-1).topk(block.top_k)
        w = w / w.sum()
        row = 0
        for j in range(block.top_k):
            e = int(idx[j])
            g, u = (cut(block.gate_up_proj)[e] @ x[t]).chunk(2)
            row = row + w[j] * (cut(block.down_proj)[e] @ (torch.nn.functional.silu(g) * u))
        rows.append(row)
        logits.append(z)
    return torch.stack(rows), torch.stack(logits)


def _stop_grads(block, x, ids, fn):
    """Output, logits and the gradients (x, gate_up, down, router weight, bias) of a loss on both
    the output and the router logits (a routing loss reaches the router through the logits)."""
    torch.manual_seed(1)
    w = torch.randn(x.shape, dtype=x.dtype)
    xi = x.clone().requires_grad_(True)
    out, logits = fn(xi)
    ((out * w).sum() + smar_loss([logits], ids) + logits.pow(2).mean()).backward()
    params = (block.gate_up_proj, block.down_proj, block.router.weight, block.router.bias)
    grads = [xi.grad] + [p.grad.clone() for p in params]
    block.zero_grad(set_to_none=True)
    return out.detach(), logits.detach(), grads


def _stopped_block(E, K, T, seed=0):
    torch.manual_seed(seed)
    block = MoEBlock(16, 24, E, K, modality_bias=True).double()
    with torch.no_grad():
        block.router.bias.normal_()  # a non-zero bias, so that its gradient is not trivial
    x = torch.randn(T, 16, dtype=torch.float64)
    ids = torch.randint(0, 2, (T,))
    return block, x, ids


def _ours(block, ids, stop):
    def fn(xi):
        with weight_gradient_stop(block, stop):
            return block(xi, ids), block.last_router_logits

    return fn


@pytest.mark.parametrize("E,K,T", [(4, 2, 40), (8, 2, 5), (3, 3, 20), (4, 1, 30)])
def test_weight_gradient_stop_matches_the_detached_reference(E, K, T):
    """Against float64 autograd on a token-by-token reference whose stopped tokens use detached
    weights: the gradients of the input, both expert weights, the router weight and its bias agree
    to 1e-10; the output and the logits are the bits of the block without the stop."""
    block, x, ids = _stopped_block(E, K, T)
    stop = ids == 1
    plain = _stop_grads(block, x, ids, lambda xi: (block(xi, ids), block.last_router_logits))
    ours = _stop_grads(block, x, ids, _ours(block, ids, stop))
    ref = _stop_grads(block, x, ids, lambda xi: reference_stopped_moe(block, xi, ids, stop))
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    diffs = [(a - b).abs().max().item() for a, b in zip(ours[2], ref[2], strict=True)]
    assert max(diffs) < 1e-10, diffs
    torch.testing.assert_close(ours[2][0], plain[2][0], rtol=1e-12, atol=1e-13)  # x: unchanged
    # the test can fail: ignoring the stop (the plain gradients) misses the reference's weights
    for mine, theirs in zip(plain[2][1:], ref[2][1:], strict=True):
        assert (mine - theirs).abs().max() > 1e-3


def test_weight_gradient_stop_all_none_and_its_scope():
    """Every token stopped: the weights get exact zeros, the input its usual gradient; no token
    stopped: the bits of the block without the stop. The stop ends with the context, nests, and
    acts on every block of a module."""
    block, x, ids = _stopped_block(4, 2, 24)
    plain = _stop_grads(block, x, ids, lambda xi: (block(xi, ids), block.last_router_logits))
    every = _stop_grads(block, x, ids, _ours(block, ids, torch.ones(24, dtype=torch.bool)))
    for g in every[2][1:]:
        assert torch.equal(g, torch.zeros_like(g))
    torch.testing.assert_close(every[2][0], plain[2][0], rtol=1e-12, atol=1e-13)
    none = _stop_grads(block, x, ids, _ours(block, ids, torch.zeros(24, dtype=torch.bool)))
    for a, b in zip(none[2], plain[2], strict=True):
        assert torch.equal(a, b)
    model = torch.nn.Sequential(block, MoEBlock(16, 24, 4, 2).double())
    with weight_gradient_stop(model, ids == 0):
        assert all(b.grad_stop is not None for b in model)
        with weight_gradient_stop(model, None):
            assert all(b.grad_stop is None for b in model)
        assert torch.equal(model[1].grad_stop, ids == 0)
    assert all(b.grad_stop is None for b in model)


def test_weight_gradient_stop_under_bf16_autocast():
    """In bf16 autocast (the experts cast as ``_dispatch`` casts them): the same bits out, the
    input's gradient of the plain block, exact zeros in the weights when every token stops, and
    for half the tokens stopped, weight gradients equal to those of the kept tokens alone."""
    torch.manual_seed(0)
    block = MoEBlock(32, 48, 4, 2)
    x = torch.randn(2, 20, 32)
    stop = torch.zeros(2, 20, dtype=torch.bool)
    stop[1] = True  # the second sequence stopped: its tokens' expert choices do not mix
    results = []
    for s in (None, stop, torch.ones_like(stop)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), weight_gradient_stop(block, s):
            out = block(xi)
        (out.float() ** 2).sum().backward()
        params = (block.gate_up_proj, block.down_proj, block.router.weight)
        results.append((out, xi.grad, [p.grad.clone() for p in params]))
        block.zero_grad(set_to_none=True)
    (out0, dx0, _), (out1, dx1, w1), (out2, dx2, w2) = results
    assert out0.dtype == torch.bfloat16 and torch.equal(out0, out1) and torch.equal(out0, out2)
    torch.testing.assert_close(dx1, dx0, rtol=0, atol=0)
    torch.testing.assert_close(dx2, dx0, rtol=0, atol=0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in w2)
    xi = x[:1].clone()  # the kept sequence alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (block(xi).float() ** 2).sum().backward()
    for mine, alone in zip(
        w1, (block.gate_up_proj, block.down_proj, block.router.weight), strict=True
    ):
        assert mine.dtype == torch.float32 and mine.abs().sum() > 0
        torch.testing.assert_close(
            mine, alone.grad, rtol=2e-2, atol=2e-2 * alone.grad.abs().max().item()
        )


def test_weight_gradient_stop_names_what_is_wrong():
    block = MoEBlock(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"stop has 5 entries .* saw 6 tokens.*\(B, S\)"):
        with weight_gradient_stop(block, torch.zeros(5, dtype=torch.bool)):
            block(torch.randn(2, 3, 8))
    assert block.grad_stop is None  # restored after the error
    with pytest.raises(ValueError, match="bool"):
        with weight_gradient_stop(block, torch.zeros(6)):
            pass
    with pytest.raises(ValueError, match="no smar.moe.MoEBlock"):
        with weight_gradient_stop(torch.nn.Linear(8, 8), torch.zeros(6, dtype=torch.bool)):
            pass


def test_weight_gradient_stop_in_an_upcycled_llama():
    """``smar.upcycle_hf`` on a tiny random Llama: stopping every token leaves the experts and the
    routers without gradient and the input embeddings with the gradient they get without the
    stop; stopping some tokens changes the MoE weights' gradients (noisy expert copies, so that the
    routers matter) and not the embeddings'."""
    transformers = pytest.importorskip("transformers")
    from smar.hf import upcycle_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)  # fmt: skip
    model = upcycle_hf(transformers.LlamaForCausalLM(cfg).double(), num_experts=4, noise=0.1)
    ids = torch.randint(0, 96, (2, 12))
    ids[:, :4] = 7  # an "image token"

    def grads(stop):
        with weight_gradient_stop(model, stop):
            model(input_ids=ids, labels=ids).loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    plain, every, some = grads(None), grads(torch.ones_like(ids, dtype=torch.bool)), grads(ids == 7)
    moe = [n for n in plain if ".mlp." in n]
    assert len(moe) == 2 * 3  # gate_up_proj, down_proj, router.weight in 2 layers
    assert all(torch.equal(every[n], torch.zeros_like(plain[n])) for n in moe)
    assert all(plain[n].abs().sum() > 0 for n in moe)
    embed = "model.embed_tokens.weight"
    for stopped in (every, some):
        torch.testing.assert_close(stopped[embed], plain[embed], rtol=1e-10, atol=1e-12)
        assert all(torch.equal(stopped[n], plain[n]) for n in plain if n not in moe and n != embed)
    assert all((some[n] - plain[n]).abs().max() > 1e-6 for n in moe)


def test_weight_gradient_stop_through_the_modality_bias_wrapper():
    """Under ``smar.attach`` the router is wrapped (the bias is added to its first ``F.linear``):
    with the stop the output keeps its bits, and the wrapper's bias gets no gradient from stopped
    tokens either (only text rows move when the image tokens stop)."""
    import smar

    torch.manual_seed(0)
    model = torch.nn.Sequential(MoEBlock(16, 24, 4, 2)).double()
    reg = smar.attach(model)
    bias = reg.wrappers[0].modality_bias
    with torch.no_grad():
        bias.normal_()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[:, :4] = 1
    outs, grads = [], []
    for stop in (None, ids == 1, torch.ones_like(ids, dtype=torch.bool)):
        reg.set_modality(ids)
        with weight_gradient_stop(model, stop):
            outs.append(model(x))
        outs[-1].pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert all(torch.equal(out, outs[0]) for out in outs)
    plain, image, every = grads
    assert all(torch.equal(g, torch.zeros_like(g)) for g in every.values())
    name = "0.router.modality_bias"
    assert torch.equal(image[name][1], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(image[name][0], plain[name][0], rtol=1e-10, atol=1e-12)
    assert plain[name][1].abs().sum() > 0


def test_bucket_sizes():
    for n in range(1, 5000):
        b = bucket(n)
        assert b >= n and (b % 16 == 0)
        assert b <= (n + 15 if n <= 128 else n * 9 / 8)
    assert len({bucket(n) for n in range(1, 5000)}) <= 50  # few shapes for the kernel cache


def test_bucketed_rows_give_the_unpadded_outputs_and_gradients():
    """Padded rows change an MoE block's outputs and gradients by rounding only (zero rows add
    nothing); inside the context every expert product has a bucket's row count, outside each has
    its expert's own."""
    from torch.overrides import TorchFunctionMode

    class Rows(TorchFunctionMode):  # the row counts of the forward's expert products
        def __init__(self):
            super().__init__()
            self.rows: list[int] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.mm:
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = MoEBlock(16, 32, num_experts=4, top_k=2)
    x = torch.randn(37, 16, requires_grad=True)
    with Rows() as plain:
        want = block(x)
    assert sum(plain.rows) == 3 * 37 * 2 and any(n % 16 for n in plain.rows)  # 3 per expert
    want.square().sum().backward()
    grads = [x.grad.clone(), block.gate_up_proj.grad.clone(), block.down_proj.grad.clone()]
    x.grad = block.gate_up_proj.grad = block.down_proj.grad = None
    with bucketed_rows(), Rows() as padded:
        got = block(x)
    assert len(padded.rows) == len(plain.rows)
    assert all(p == bucket(n) for p, n in zip(padded.rows, plain.rows, strict=True))
    got.square().sum().backward()
    torch.testing.assert_close(got, want)
    for g, w in zip([x.grad, block.gate_up_proj.grad, block.down_proj.grad], grads, strict=True):
        torch.testing.assert_close(g, w)


class _Tiny(torch.nn.Module):
    """A linear layer with a bias, then an MoE block: both kinds of product prepacked reorders."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.moe = MoEBlock(16, 32, num_experts=4, top_k=2)

    def forward(self, x):
        return self.moe(self.proj(x))


@pytest.mark.skipif(not __import__("smar.experts").experts.can_prepack(),
                    reason="this torch has no oneDNN reordered-weight ops")  # fmt: skip
@pytest.mark.parametrize("where", ["bf16 model", "bf16 autocast"])
def test_prepacked_weights_give_the_plain_products_to_rounding_and_are_given_back(monkeypatch, where):
    """Inside ``prepacked`` every bf16 linear layer and expert multiplies with its reordered
    weight (each product counted) and gives the plain output up to bf16 rounding; a gradient
    being recorded falls back to the plain products (bit for bit); the layers' own forward (a
    hook's, where one was set) is back after."""
    import contextlib

    import smar.experts as experts

    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    real = experts._linear
    monkeypatch.setattr(experts, "_linear", counted)
    torch.manual_seed(0)
    model = _Tiny().to(torch.bfloat16)
    x = torch.randn(37, 16)
    cast = contextlib.nullcontext()
    if where == "bf16 model":
        x = x.to(torch.bfloat16)
    else:
        cast = torch.autocast("cpu", dtype=torch.bfloat16)
    model.proj.__dict__["forward"] = own = model.proj.forward  # its instance's own (as a hook's)
    with torch.no_grad(), cast:
        want = model(x)
        with experts.prepacked(model):
            got = model(x)
            assert len(calls) == 1 + 3 * 4  # the linear layer, 3 products per expert
            with torch.enable_grad():
                again = model(x)
            assert len(calls) == 13  # recording a gradient: the plain products
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(again, want)
    assert model.proj.__dict__["forward"] is own
    del model.proj.__dict__["forward"]
    with experts.prepacked(model):
        pass
    assert "forward" not in model.proj.__dict__


def test_prepacked_changes_nothing_without_onednns_ops(monkeypatch):
    import smar.experts as experts

    monkeypatch.setattr(experts, "can_prepack", lambda: False)
    model = _Tiny().to(torch.bfloat16)
    with experts.prepacked(model):
        assert "forward" not in model.proj.__dict__ and experts._PACKED.get() is None
