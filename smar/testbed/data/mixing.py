"""Batches for the testbed model: ``<bos> <image> x P question answer <eos>`` samples mixed with
pure-text samples at a controlled ``text_ratio``, with modality ids at token or sample level
(docs/method.md#modality-ids).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smar.errors import UsageError
from smar.testbed.data.images import ImageSample
from smar.testbed.data.questions import QA_TYPES, qa_sample
from smar.testbed.data.tokenizer import Tokenizer

# (prompt ids, target ids, image or None), optionally with ``eos`` (default True)
Item = (
    tuple[list[int], list[int], ImageSample | None]
    | tuple[list[int], list[int], ImageSample | None, bool]
)


@dataclass
class Batch:
    """A padded batch for :class:`smar.testbed.model.TinyModel`.

    Attributes:
        input_ids: ``(B, S)``; labels ``(B, S)`` with -100 on image, prompt and padding;
        attention_mask: ``(B, S)``; pixel_values ``(N, C, H, W)`` or None;
        modality_ids: ``(B, S)``: token level (image tokens 1) or sample level (every token of a
            multimodal sample 1), -1 at padding.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    modality_ids: torch.Tensor


def collate(
    items: Sequence[Item],
    tok: Tokenizer,
    *,
    image_tokens: int,
    modality: str = "token",
) -> Batch:
    """Builds a batch from ``(prompt_ids, target_ids, image)`` items, optionally with a fourth
    element ``eos`` (default True).

    Each sample is ``<bos> [<image> x image_tokens] prompt target <eos>``; only ``target`` and
    ``<eos>`` are labelled (pass the whole text as target to train on all of it). Windows cut
    from running text get no ``<eos>`` (``eos=False``): the text does not end there.
    """
    if modality not in ("token", "sample"):
        raise UsageError(f"modality must be 'token' or 'sample', got {modality!r}")
    seqs, labs, mods, pix = [], [], [], []
    for prompt, target, image, *rest in items:
        end = [tok.eos_id] if (rest[0] if rest else True) else []
        img = [tok.image_id] * image_tokens if image is not None else []
        ids = [tok.bos_id] + img + prompt + target + end
        lab = [-100] * (1 + len(img) + len(prompt)) + target + end
        if image is not None:
            pix.append(image.pixels)
            mod = (
                [1] * len(ids)
                if modality == "sample"
                else [0] + [1] * len(img) + [0] * (len(ids) - 1 - len(img))
            )
        else:
            mod = [0] * len(ids)
        seqs.append(ids)
        labs.append(lab)
        mods.append(mod)
    S = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, S), tok.pad_id, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    modality_ids = torch.full((B, S), -1, dtype=torch.long)
    for i, (s, lab, m) in enumerate(zip(seqs, labs, mods, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
        modality_ids[i, : len(s)] = torch.tensor(m)
    return Batch(input_ids, labels, mask, torch.stack(pix) if pix else None, modality_ids)


class TextStream:
    """Random windows of tokenised pretraining text (prose + skills), deterministic per seed."""

    def __init__(self, ids: torch.Tensor, seed: int):
        self.ids = ids
        self.gen = torch.Generator().manual_seed(seed)

    def window(self, length: int) -> list[int]:
        i = int(torch.randint(0, len(self.ids) - length - 1, (1,), generator=self.gen))
        return self.ids[i : i + length].tolist()

    def batch(self, B: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.ids) - S - 1, (B,), generator=self.gen)
        x = torch.stack([self.ids[s : s + S] for s in starts.tolist()])  # (B, S)
        return x, x.clone()


def mixed_items(
    n: int,
    *,
    tok: Tokenizer,
    text: TextStream,
    seed: int,
    text_ratio: float,
    text_len: int,
    image_size: int,
    drop_images: bool = False,
    shuffle_images: bool = False,
) -> list[tuple[list[int], list[int], ImageSample | None, bool]]:
    """Stage-3 items ``(prompt, target, image, eos)``: question/answer samples over all types,
    and pure-text samples (windows of running text, ``eos=False``) with probability
    ``text_ratio``. ``drop_images`` keeps the text of multimodal samples and removes
    their images (the no-image control); ``shuffle_images`` deals the multimodal samples' images
    out again at random (the shuffled-image control: the same image tokens, carrying no answer;
    a sample keeps its own image with chance 1/n)."""
    if not 0.0 <= text_ratio <= 1.0:
        raise UsageError(f"text_ratio must be in [0, 1], got {text_ratio}")
    if drop_images and shuffle_images:
        raise UsageError("drop_images and shuffle_images exclude each other")
    rng = random.Random(f"mix-{seed}")
    items: list[tuple[list[int], list[int], ImageSample | None, bool]] = []
    for _ in range(n):
        if rng.random() < text_ratio:
            # a window cut from running text: no <eos> after it (the text goes on)
            items.append(([], text.window(text_len), None, False))
        else:
            s = qa_sample(rng.choice(QA_TYPES), rng, "train", image_size)
            answer = s.choices[s.answer] + "."
            image = None if drop_images else s.image
            items.append((tok.encode(s.prompt), tok.encode(answer), image, True))
    if shuffle_images:
        slots = [i for i, it in enumerate(items) if it[2] is not None]
        images = [items[i][2] for i in slots]
        random.Random(f"shuffle-{seed}").shuffle(images)
        for i, image in zip(slots, images, strict=True):
            items[i] = (*items[i][:2], image, items[i][3])
    return items


def qa_batch(
    items: Sequence[Item],
    tok: Tokenizer,
    *,
    image_tokens: int,
    modality: str = "token",
    label_prompt: bool = True,
) -> Batch:
    """A training batch of :func:`mixed_items`; ``label_prompt`` trains on the question text too,
    not only on the answer."""
    if label_prompt:
        items = [([], it[0] + it[1], *it[2:]) for it in items]
    return collate(items, tok, image_tokens=image_tokens, modality=modality)
