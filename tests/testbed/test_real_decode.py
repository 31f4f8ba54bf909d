"""The evaluation's batched forwards and greedy decoding (smar/testbed/real/decode.py) and its bf16
weights (precision.bf16_weights), each against the plain computation: transformers' own greedy
``generate``, one unpadded forward per sequence, autocast on the float32 weights. (The experts'
padded rows, smar.experts.bucketed_rows: tests/test_moe.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from smar.testbed.real import decode, evaluate  # noqa: E402

QUESTIONS = ["what is the capital of a picture ?", "tell me a number", "write a sentence",
             "describe the colour of it", "what shape do you see ?"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    from test_real_run import _tiny_base

    return _tiny_base()


def _rows(tok, questions=QUESTIONS):
    return [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                        add_generation_prompt=True),  # fmt: skip
                add_special_tokens=False)["input_ids"] for q in questions]


def test_shared_length_keeps_a_token_of_each_row_and_stops_at_placeholders():
    assert decode.shared_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert decode.shared_length([[1, 2, 3], [1, 2, 3]]) == 2  # one token of each row left
    assert decode.shared_length([[1, 2, 3], [1, 2, 3]], keep=2) == 1
    assert decode.shared_length([[1, 7, 3, 4], [1, 7, 3, 5]], until={7}) == 1
    assert decode.shared_length([[1, 2, 3]]) == 0  # one row: nothing to share
    assert decode.shared_length([[5, 1], [6, 1]]) == 0


def test_forward_after_a_shared_prefix_gives_each_rows_own_logits(tiny):
    """Right- and left-padded rows after the prefix's cache: row i's logits are those of its
    own unpadded forward."""
    model, tok = tiny
    rows = _rows(tok)
    prefix = decode.Prefix.of(model, rows)
    assert len(prefix) >= 5  # the chat template's system prompt
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r])).logits[0] for r in rows]  # (S_i, V)
        right = decode.forward(model, rows, prefix)[0]
        left = decode.forward(model, rows, prefix, left=True)[0]
    p, width = len(prefix), max(map(len, rows)) - len(prefix)
    for i, r in enumerate(rows):
        n = len(r) - p
        torch.testing.assert_close(right[i, :n], alone[i][p:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(left[i, width - n :], alone[i][p:], rtol=1e-5, atol=1e-5)


def test_generate_gives_transformers_greedy_answers(tiny):
    """The same answers as ``model.generate(do_sample=False)``, one chat at a time (no padding),
    whatever the batch: finished rows leave it without changing the others."""
    model, tok = tiny
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    want = []
    for row in _rows(tok):
        x = torch.tensor([row])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=9,
                                 do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        want.append(tok.decode(out[0, len(row) :], skip_special_tokens=True).strip())
    for batch in (1, 2, 5):
        assert evaluate.generate(model, tok, chats, max_new_tokens=9, batch=batch) == want


def test_groups_of_like_length_cost_least():
    assert decode._groups([5, 5, 5]) == [[0, 1, 2]]
    # 256 tokens per forward: one group (12 * 12 + 256) beats two (10 * 10 + 2 * 12 + 512)
    assert decode._groups([10] * 10 + [12] * 2) == [list(range(12))]
    assert decode._groups([10] * 10 + [300] * 2) == [list(range(10)), [10, 11]]
    long = [10] * 100 + [40] * 100  # one group: 8000; two: 1000 + 4000 + 512
    assert decode._groups(long) == [list(range(100)), list(range(100, 200))]
    assert decode._groups([40, 10, 40, 10] * 50) == [list(range(1, 200, 2)), list(range(0, 200, 2))]


def test_rows_prefilled_in_groups_of_like_length_give_the_same_answers(tiny, monkeypatch):
    """Rows of different lengths, their first forward run in groups and joined into one batch
    (the padding between the prefix and each row): the answers of one forward of them all,
    transformers' greedy answers, with per-row limits."""
    model, tok = tiny
    questions = [*QUESTIONS, "a much longer question about the picture, its colours and its shapes ?"]
    rows = _rows(tok, questions)
    limits = [9, 3, 9, 5, 9, 9]
    want = decode.greedy(model, rows, max_new_tokens=limits, eos={tok.eos_token_id})
    monkeypatch.setattr(decode, "GROUP_TOKENS", 0)  # every length its own group
    prefix = decode.Prefix.of(model, rows)
    last, mask, cache, order = decode.prefill(model, rows, prefix)
    assert sorted(order) == list(range(6)) and order != list(range(6))
    one = decode.forward(model, [rows[i] for i in order], prefix, left=True)[0][:, -1]
    torch.testing.assert_close(last, one, rtol=1e-5, atol=1e-5)
    got = decode.greedy(model, rows, max_new_tokens=limits, eos={tok.eos_token_id})
    assert got == want and [len(g) for g in got][1] <= 3


def test_greedy_ends_a_row_at_eos_or_where_stop_says(tiny):
    model, tok = tiny
    rows = _rows(tok)
    free = decode.greedy(model, rows, max_new_tokens=8, eos=set())
    assert all(len(r) == 8 for r in free)
    first = free[0][2]
    ended = decode.greedy(model, rows, max_new_tokens=8, eos={first})
    for f, e in zip(free, ended, strict=True):  # each row ends at its first `first`, included
        assert e == (f[: f.index(first) + 1] if first in f else f)
    stopped = decode.greedy(model, rows, max_new_tokens=8, eos=set(), stop=lambda _, ids: len(ids) == 3)
    assert stopped == [f[:3] for f in free]


def test_generate_with_images_matches_one_chat_at_a_time():
    """Image chats: each row's pixels go with the first forward of its batch; the answers equal
    those of each chat alone."""
    from test_real import _tiny_vlm

    from smar.testbed.real.data import qa_chat

    lm, spec, model, tok, proc = _tiny_vlm()
    samples = qa_chat(5, seed=3, split="eval")
    chats, images = [s["messages"][:-1] for s in samples], [s["images"] for s in samples]
    alone = [evaluate.generate(model, proc, [c], [im], max_new_tokens=4)[0]
             for c, im in zip(chats, images, strict=True)]  # fmt: skip
    assert evaluate.generate(model, proc, chats, images, max_new_tokens=4, batch=2) == alone


def test_bf16_weights_give_autocasts_products_bit_for_bit_and_are_given_back():
    """Under bf16 autocast, a model whose matrix weights are held in bf16 computes the same
    logits bit for bit as the float32 model (autocast casts those weights to the same values at
    each call); the float32 parameters are back after, the same objects."""
    from test_real import _tiny_vlm

    from smar.testbed.real.precision import bf16_weights

    lm, spec, model, tok, proc = _tiny_vlm()
    x = torch.randint(0, len(tok), (3, 12))
    before = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=x).logits
        with bf16_weights(model):
            assert model.lm_head.weight.dtype == torch.bfloat16
            assert model.model.language_model.embed_tokens.weight.dtype == torch.float32
            got = model(input_ids=x).logits
    assert torch.equal(got, want)
    after = dict(model.named_parameters())
    assert all(after[n] is p and torch.equal(p, values[n]) for n, p in before.items())


def test_max_indices_pick_the_first_of_equal_maxima_as_argmax():
    """greedy takes ``max(-1).indices`` for argmax (4x faster on bf16 logits): the same token
    where bf16 logits tie, as they often do (8 bits of mantissa)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 40, (64, 5003), generator=g).float() / 8).bfloat16()  # many ties
    assert (x == x.max(-1, keepdim=True).values).sum(-1).gt(1).all()
    assert torch.equal(x.max(-1).indices, x.argmax(-1))
    assert torch.equal(x[:, ::3].max(-1).indices, x[:, ::3].argmax(-1))  # strided


def test_a_cache_in_autocasts_precision_gives_the_same_logits_bit_for_bit(tiny, monkeypatch):
    """Under bf16 autocast the evaluation's caches hold keys and values in bf16, the values
    autocast gives attention at every call: a prefill and two decode steps give the logits of
    transformers' own (float32) cache bit for bit. Outside autocast the model makes its own."""
    model, tok = tiny
    rows = _rows(tok)

    def run() -> tuple[list[torch.Tensor], object]:
        out, mask, cache = [], torch.zeros(len(rows), 0, dtype=torch.long), None
        new = rows
        for _ in range(3):  # the rows, then two greedy steps
            logits, mask, cache = decode.extend(model, cache, mask, new, left=True,
                                                cast=torch.autocast("cpu", dtype=torch.bfloat16))
            out.append(logits)
            new = logits[:, -1].float().argmax(-1)[:, None].tolist()
        return out, cache

    with torch.no_grad():
        cast, cache = run()
        monkeypatch.setattr(decode, "new_cache", lambda: None)
        plain, theirs = run()
    assert cache.layers[0].keys.dtype == torch.bfloat16
    assert theirs.layers[0].keys.dtype == torch.float32  # (rotary keeps float32 keys)
    assert all(torch.equal(a, b) for a, b in zip(cast, plain, strict=True))
    monkeypatch.undo()
    assert decode.new_cache() is None  # no autocast: transformers' default


def test_image_scores_are_the_accuracy_and_the_answer_loss_from_one_forward():
    """Accuracy and image-answer loss from one forward of each question (its answer scored from
    the question's cache, cropped back before decoding): the values of multimodal_accuracy and
    image_answer_loss, which run apart."""
    from test_real import _tiny_vlm

    from smar.testbed.real.data import qa_chat

    lm, spec, model, tok, proc = _tiny_vlm()
    model.eval()
    samples = qa_chat(6, seed=2, split="eval")
    acc, loss = evaluate.image_scores(model, proc, samples, batch=4)
    assert acc == evaluate.multimodal_accuracy(model, proc, samples, batch=4)
    assert loss == pytest.approx(evaluate.image_answer_loss(model, proc, samples), rel=1e-5)
    more = qa_chat(11, seed=5, split="eval")  # batches of 3 and one of 2
    assert evaluate.image_scores(model, proc, more, batch=3) == (
        evaluate.multimodal_accuracy(model, proc, more),
        pytest.approx(evaluate.image_answer_loss(model, proc, more, batch=11), rel=1e-5))


def test_image_rows_of_a_model_that_routes_by_sample_keep_their_sample_ids():
    """With a sample-level modality bias every token of an image row routes as image, its system
    prompt and its decode steps too: the evaluation gives such rows no prefix run as text and
    keeps them in the batch, so that batched answers and answer losses equal each chat's
    alone (and the loss each sample's own forward)."""
    from test_real import _tiny_vlm

    import smar
    from smar.moe import MoEBlock
    from smar.testbed.real.data import collate, qa_chat

    lm, spec, model, tok, proc = _tiny_vlm()
    reg = smar.attach(model, smar.SMARConfig(modality="sample", smar_weight=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for bias in reg.bias_parameters():  # (M, E): images to other experts than text
            bias[1] = torch.tensor([8.0, 8.0, -8.0, -8.0])[: bias.shape[1]]
        for block in model.modules():  # upcycled experts are copies: make routing matter
            if isinstance(block, MoEBlock):
                block.gate_up_proj.add_(torch.randn_like(block.gate_up_proj))
    model.eval()
    assert decode.routes_by_sample(model)
    samples = qa_chat(5, seed=4, split="eval")
    chats, images = [s["messages"][:-1] for s in samples], [s["images"] for s in samples]
    alone = [evaluate.generate(model, proc, [c], [im], max_new_tokens=4)[0]
             for c, im in zip(chats, images, strict=True)]  # fmt: skip
    assert evaluate.generate(model, proc, chats, images, max_new_tokens=4, batch=3) == alone
    total = count = 0.0
    side, proc.tokenizer.padding_side = proc.tokenizer.padding_side, "right"
    with torch.no_grad():
        for s in samples:
            batch = collate(proc, [s])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(model(**batch).loss) * n, count + n
    proc.tokenizer.padding_side = side
    acc, loss = evaluate.image_scores(model, proc, samples, batch=3)
    assert loss == pytest.approx(total / count, rel=1e-6)
    assert evaluate.image_answer_loss(model, proc, samples, batch=2) == pytest.approx(
        total / count, rel=1e-6)
    assert acc == evaluate.multimodal_accuracy(model, proc, samples, batch=1)
    reg.detach()
