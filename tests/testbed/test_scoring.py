"""Scoring: an oracle scores 1.0, a random model scores near chance, retention against itself is 1."""

import random
from types import SimpleNamespace

import pytest
import torch

from smar.testbed.data import questions, skills
from smar.testbed.evaluate import learned_benchmarks, summarize
from smar.testbed.scoring import (
    ChoiceItem,
    choice_accuracy,
    choice_logprobs,
    mm_items,
    prose_bits_per_byte,
    text_items,
)

VOCAB = 300


class CharTok:
    """A character tokenizer: enough to exercise the scoring without training a BPE."""

    pad_id, image_id, bos_id, eos_id = 0, 1, 2, 3
    vocab_size = VOCAB

    def encode(self, s):
        return [4 + min(ord(c), VOCAB - 5) for c in s]

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids if i >= 4)


def _key(pixels):
    return None if pixels is None else hash(pixels.numpy().tobytes())


class Oracle(torch.nn.Module):
    """Puts all probability on the next token of the correct sequence with the same prefix
    (and the same image)."""

    def __init__(self, items, image_tokens):
        super().__init__()
        self.next = {}
        for it in items:
            img = [CharTok.image_id] * image_tokens if it.image is not None else []
            seq = [CharTok.bos_id] + img + it.prompt + it.choices[it.answer]
            key = _key(None if it.image is None else it.image.pixels)
            for t in range(1, len(seq)):
                self.next[key, tuple(seq[:t])] = seq[t]

    def forward(self, ids, pixels=None, attn_mask=None, **kw):
        logits = torch.zeros(*ids.shape, VOCAB)
        has_image = (ids == CharTok.image_id).any(1).tolist()
        images = iter(pixels if pixels is not None else [])
        for b in range(ids.shape[0]):
            key = _key(next(images)) if has_image[b] else None
            for t in range(ids.shape[1]):
                # what token t sees: the tokens before it, or those its packed mask lets it see
                seen = ids[b, : t + 1] if attn_mask is None else ids[b][attn_mask[b, t]]
                nxt = self.next.get((key, tuple(seen.tolist())))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return SimpleNamespace(logits=logits)


class RandomModel(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, ids, pixels=None, **kw):
        return SimpleNamespace(logits=torch.randn(*ids.shape, VOCAB, generator=self.g))


KW = dict(bos_id=2, pad_id=0, image_id=1, image_tokens=4)


@pytest.fixture(scope="module")
def items():
    tok = CharTok()
    text = text_items(skills.skill_examples("calendar", 150, 0), tok)
    mm = mm_items(questions.qa_samples("colour", 60, 0, "eval", size=8), tok)
    return text, mm


def test_oracle_scores_one(items):
    for its in items:
        lp = choice_logprobs(Oracle(its, 4), its, **KW)
        assert choice_accuracy(lp, [it.answer for it in its]) == 1.0


def test_random_model_scores_near_chance(items):
    text, _ = items
    many = text * 4
    acc = choice_accuracy(choice_logprobs(RandomModel(), many, **KW), [i.answer for i in many])
    chance = 1 / len(text[0].choices)
    assert abs(acc - chance) < 0.08


def test_choice_logprobs_match_explicit_sum():
    # mixed single- and multi-token choices, against one explicit sequence per choice
    items = [
        ChoiceItem([10, 11, 12], [[20], [21, 22], [23], [24, 25, 26]], 1),
        ChoiceItem([13], [[27, 28], [29]], 0),
        ChoiceItem([14, 15], [[30], [31]], 1),
        ChoiceItem([16], [[40, 41], [40, 42], [43, 41], [43, 42]], 2),  # "top left", ...
        ChoiceItem([17], [[44, 45, 46], [44, 45], [44], [47, 48]], 3),  # stems inside stems
    ]
    rows = []

    class Counting(_Fixed):
        def forward(self, ids, pixels=None, **kw):
            rows.append(ids.shape[0])
            return super().forward(ids, pixels, **kw)

    lp = choice_logprobs(Counting(), items, **KW, batch_size=2)
    # one packed sequence per item, holding one continuation per maximal stem
    assert sum(rows) == 5
    for it, got in zip(items, lp, strict=True):
        for c, value in zip(it.choices, got, strict=True):
            seq = [2, *it.prompt, *c]
            logits = _Fixed()(torch.tensor([seq])).logits[0].log_softmax(-1)
            start = 1 + len(it.prompt)
            expect = sum(float(logits[start - 1 + n, t]) for n, t in enumerate(c))
            assert value == pytest.approx(expect, abs=1e-5)


class _Fixed(torch.nn.Module):
    """Deterministic logits depending only on the token and its position."""

    def forward(self, ids, pixels=None, position_ids=None, **kw):
        g = torch.Generator().manual_seed(7)
        table = torch.randn(VOCAB, VOCAB, generator=g)
        pos = torch.arange(ids.shape[1])[None, :] if position_ids is None else position_ids
        return SimpleNamespace(logits=table[ids] + 0.1 * pos[..., None])


def test_ties_count_wrong():
    assert choice_accuracy([[0.0, 0.0], [1.0, 0.0]], [0, 0]) == 0.5


def test_retention_against_itself_is_exactly_one():
    scores = {"text/prose": 0.41, "text/facts": 0.93, "text/alphabet": 1.0, "mm/digit": 0.8}
    s = summarize(scores, scores)
    assert s["retention/mean"] == 1.0 and s["retention/mean_wo_outlier"] == 1.0
    assert all(
        v == 1.0
        for k, v in s.items()
        if k.startswith("retention/") and k[10:] in ("prose", "facts", "alphabet")
    )
    assert s["mm/mean"] == 0.8


def test_learned_benchmarks_keep_prose_and_learned_skills():
    base = {"text/prose": 0.4, "text/facts": 0.93, "text/calendar": 0.3, "mm/digit": 0.8}
    assert learned_benchmarks(base) == ["text/prose", "text/facts"]


def test_learned_benchmarks_fall_back_to_all_text_when_nothing_learned():
    # a --smoke model learns no skill: mean without the outlier needs two benchmarks
    base = {"text/prose": 0.4, "text/facts": 0.25, "text/calendar": 0.3, "mm/digit": 0.8}
    include = learned_benchmarks(base)
    assert include == ["text/prose", "text/facts", "text/calendar"]
    s = summarize({**base, "text/facts": 0.2}, base, include=include)
    assert s["retention/outlier"] == "text/facts"


def test_prose_bits_per_byte_of_uniform_model():
    class Uniform(torch.nn.Module):
        def forward(self, ids, *a, **k):
            return SimpleNamespace(logits=torch.zeros(*ids.shape, VOCAB))

    text = "".join(random.Random(0).choice("abcdefgh ") for _ in range(3000))
    bpb = prose_bits_per_byte(Uniform(), CharTok(), text, seq_len=50)
    # one character = one byte = one token, each with probability 1/VOCAB
    assert bpb == pytest.approx(torch.log2(torch.tensor(float(VOCAB))).item(), rel=1e-5)


def test_single_token_choices_scored_from_one_sequence():
    it = ChoiceItem([10, 11, 12], [[20], [21], [22]], 2)
    lp = choice_logprobs(_Fixed(), [it], **KW)
    logits = _Fixed()(torch.tensor([[2, 10, 11, 12]])).logits[0].log_softmax(-1)
    assert lp[0] == pytest.approx([float(logits[3, t]) for t in (20, 21, 22)], abs=1e-5)


@pytest.mark.parametrize("qa", questions.QA_TYPES)
def test_multimodal_benchmarks_can_fail(qa):
    """A model given the answers scores 1.0; the best model that ignores the image (the most
    frequent training answer for each question and answer lead) stays near chance."""
    tok = CharTok()
    its = mm_items(questions.qa_samples(qa, 200, 10_000, "eval", size=8), tok)
    answers = [it.answer for it in its]
    assert choice_accuracy(choice_logprobs(Oracle(its, 4), its, **KW), answers) == 1.0
    train = {}
    for it in mm_items(questions.qa_samples(qa, 2000, 0, "train", size=8), tok):
        train.setdefault(tuple(it.prompt), []).append(it.answer)
    guess = {k: max(set(v), key=v.count) for k, v in train.items()}
    blind = sum(guess.get(tuple(it.prompt), 0) == it.answer for it in its) / len(its)
    chance = 1 / len(its[0].choices)
    assert blind < chance + 0.1, f"{qa}: an image-blind model scores {blind:.2f}"
