"""The evaluations that see format and fact loss apart (smar/testbed/real/probes.py), each against
a by-hand computation on a tiny random Llama (one unpadded forward per sequence)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from smar.testbed.real import evaluate, probes  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from test_real_run import _tiny_base

    return _tiny_base()


def _logp_after(model, ids: list[int], start: int) -> torch.Tensor:
    """Log-probabilities of ids[start:] given what precedes them, one sequence, no padding."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # (S, V)
    return logp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])]


def test_candidate_ranks_equal_the_by_hand_likelihood_ranks(tiny):
    model, tok = tiny
    items = [
        {"question": "what is the colour", "prefix": "it is", "gold": "red",
         "candidates": ["red", "blue", "green", "square"]},
        {"question": "what shape is it", "prefix": "a", "gold": "circle",
         "candidates": ["circle", "square", "triangle", "digit"]},
        {"question": "what is in the picture", "prefix": "it is", "gold": "a red square",
         "candidates": ["a red square", "circle", "a blue circle", "red square"]},
    ]  # fmt: skip  (candidates of 1 to 3 tokens: the longer ones run a second forward)
    got = probes.candidate_ranks(model, tok, items, batch=3)
    for item, rank in zip(items, got, strict=True):
        context = probes._head(tok, item["question"]) + item["prefix"]
        start = len(tok(context, add_special_tokens=False)["input_ids"])
        ll = [float(_logp_after(model, tok(f"{context} {c}", add_special_tokens=False)
                                ["input_ids"], start).sum()) for c in item["candidates"]]  # fmt: skip
        assert rank == sum(x > ll[0] for x in ll[1:])
    assert probes.format_free(model, tok, items) == sum(r == 0 for r in got) / 3
    assert probes.candidate_ranks(model, tok, items, batch=1) == got  # padding apart
    # with the greedy answers, from one forward of each question
    said, ranks, none = probes.knowledge_scores(model, tok, items, max_new_tokens=5, batch=2)
    assert ranks == got and none == []
    assert said == evaluate.generate(model, tok, [[{"role": "user", "content": it["question"]}]
                                                  for it in items], max_new_tokens=5)  # fmt: skip
    # other chats decoded beside the questions (each with its own limit and stop), in one batch
    # or split across two (some questions with chats, some without)
    chats = [[{"role": "user", "content": q}] for q in ("write a function", "tell me a number",
                                                        "count to three please")]  # fmt: skip

    def stop(text: str) -> bool:
        return len(text.split()) >= 2

    alone = evaluate.generate(model, tok, chats, max_new_tokens=7, stop=stop)
    for batch in (8, 4):
        more = evaluate.Ask(chats, 7, stop)
        with_more = probes.knowledge_scores(model, tok, items, max_new_tokens=5, batch=batch,
                                            more=more)  # fmt: skip
        assert with_more == (said, ranks, alone)


def test_answer_scores_are_the_bits_per_byte_and_first_tokens_of_one_forward(tiny):
    from smar.testbed.real import evaluate

    model, tok = tiny
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("what is the colour", "it is red and blue ."), ("hi", "one"),
                          ("tell me a number", "one two three four five"))]  # fmt: skip
    bpb, first = evaluate.answer_scores(model, tok, chats, first=3, batch=2)
    assert bpb == pytest.approx(evaluate.answer_bpb(model, tok, chats, batch=3), rel=1e-5)
    torch.testing.assert_close(first, probes.first_token_logprobs(model, tok, chats, k=3, batch=3))
    assert first.shape == (2, 3, len(tok))  # the one-token answer is left out


def test_answer_frame_and_format_kept():
    assert probes.answer_frame("The capital of Austria is Vienna.", "Vienna") == (
        "the capital of austria is"
    )
    assert probes.answer_frame("Austria is a country in Central Europe.", "Vienna") is None
    base = ["The capital of Austria is Vienna.", "The opposite of hot is cold.", "I am not sure."]
    new = ["The capital of Austria is Graz.", "Cold.", "The opposite of hot is cold."]
    # the third base answer names no right answer: it has no frame and is not counted
    assert probes.format_kept(base, new, ["Vienna", "cold", "cold"]) == 0.5


def test_first_token_logprobs_and_kl_by_hand(tiny):
    model, tok = tiny
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("what is the colour", "it is red and blue ."),
                          ("tell me a number", "one two three four five"))]  # fmt: skip
    got = probes.first_token_logprobs(model, tok, chats, k=3, batch=2)
    assert got.shape == (2, 3, len(tok))
    for chat, lp in zip(chats, got, strict=True):
        head = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(chat, tokenize=False)
        h = len(tok(head, add_special_tokens=False)["input_ids"])
        ids = tok(full, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0, h - 1 : h + 2].log_softmax(-1)
        torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)
    short = [{"role": "user", "content": "tell me a number"}, {"role": "assistant",
                                                                "content": "one"}]  # fmt: skip
    with_short = probes.first_token_logprobs(model, tok, [chats[0], short, chats[1]], k=3)
    torch.testing.assert_close(with_short, got)  # a too-short answer is left out
    assert probes.first_token_kl(got, got) == pytest.approx(0.0, abs=1e-6)
    other = (got + torch.randn_like(got)).log_softmax(-1)
    p = got.exp()
    by_hand = sum(float((p[n, k] * (got[n, k] - other[n, k])).sum()) for n in range(2)
                  for k in range(3)) / 6  # fmt: skip
    assert probes.first_token_kl(got, other) == pytest.approx(by_hand, rel=1e-5)


def test_code_scores_parse_and_name():
    answers = [
        "Here it is:\n```python\ndef is_even(n):\n    return n % 2 == 0\n```",
        "def add_numbers(a, b):\n    return a + b",
        "```python\ndef add(a, b):\n    return a +\n```",  # does not parse
        "You can use the modulo operator.",
    ]
    names = ["is_even", "add_numbers", "add", "is_even"]
    got = probes.code_scores(answers, names)
    assert got["defines"] == 0.5
    assert got["chars"] == pytest.approx(sum(map(len, answers)) / 4)


def test_knowledge_items_and_code_instructions():
    from smar.testbed.real import texts

    items = texts.knowledge_items()
    assert len(items) == len(texts.knowledge_questions())
    for it in items:
        assert it["candidates"][0] == it["gold"] and len(set(it["candidates"])) == 5
    vienna = next(it for it in items if it["question"] == "What is the capital of Austria?")
    assert vienna["prefix"] == "The capital of Austria is"
    code = texts.code_instructions()
    assert len(code) == 32 and all(name in q for q, name in code)
