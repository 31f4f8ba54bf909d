"""Data of ``smar real``, in the real model's own chat template.

Image samples are the testbed's (digits and shape scenes, :mod:`smar.testbed.data`): questions with
short answers (one benchmark per question type) and descriptions (long answers), as TRL's typed
messages with their images, so that the processor, ``SMARTrainer`` and the TRL recipe all take
them. :func:`collate` tokenizes a batch with the processor and labels the assistant's turn only
(everything up to the generation prompt is context), as visual instruction tuning does.
:func:`write_analyze_data` writes image questions and held-out chats as ``smar analyze``'s samples.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smar.errors import UsageError
from smar.testbed.data.images import caption_samples
from smar.testbed.data.questions import QA_TYPES, qa_samples

if TYPE_CHECKING:
    from PIL import Image
    from transformers import ProcessorMixin

__all__ = ["to_pil", "qa_chat", "description_chat", "collate", "write_analyze_data"]


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` image in [0, 1] as a PIL image."""
    from PIL import Image

    return Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _chat(question: str, answer: str, image: Image.Image) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
    }


def qa_chat(n: int, seed: int, split: str, qa_types: Sequence[str] = QA_TYPES) -> list[dict]:
    """``n`` image questions with short answers ("A triangle."), round-robin over the question
    types; each sample also keeps its ``task`` and its ``choices`` / ``answer`` for scoring."""
    per = {t: qa_samples(t, -(-n // len(qa_types)), seed, split) for t in qa_types}
    out = []
    for i in range(n):
        s = per[qa_types[i % len(qa_types)]][i // len(qa_types)]
        question, _, lead = s.prompt.strip().partition("? ")
        answer = f"{lead} {s.choices[s.answer].strip()}.".strip()
        sample = _chat(question + "?", answer[0].upper() + answer[1:], to_pil(s.image.pixels))
        sample.update(task=s.task, choices=[c.strip() for c in s.choices], answer=s.answer)
        out.append(sample)
    return out


def description_chat(n: int, seed: int) -> list[dict]:
    """``n`` requests for a description, answered with the image's full caption."""
    rng = random.Random(f"describe-{seed}")
    asks = ("Describe the image.", "What is in this picture?", "Tell me what you see.")
    return [_chat(rng.choice(asks), text.strip(), to_pil(img.pixels))
            for img, text in caption_samples(n, seed)]  # fmt: skip


def collate(processor: ProcessorMixin, samples: list[dict]) -> dict:
    """Model inputs of ``samples`` (left to right, right-padded) with ``labels`` on the
    assistant's turn only: the prompt (up to the generation prompt) and padding are -100."""
    if processor.tokenizer.padding_side != "right":
        raise UsageError("collate needs right padding (processor.tokenizer.padding_side)")
    full = [processor.apply_chat_template(s["messages"], tokenize=False) for s in samples]
    prompts = [processor.apply_chat_template(s["messages"][:-1], tokenize=False,  # context
                                             add_generation_prompt=True)
               for s in samples]  # fmt: skip
    images = [im for s in samples for im in s["images"]]
    batch = dict(processor(text=full, images=images or None, padding=True, return_tensors="pt"))
    heads = processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    for i, n in enumerate(heads["attention_mask"].sum(1).tolist()):
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def write_analyze_data(folder: Path, images: list[dict], answers: dict, per_task: int = 8) -> Path:
    """``<folder>/samples.jsonl`` for ``smar analyze``: image questions (LLaVA conversations,
    their images as PNG files beside it) and the held-out chats as text samples."""
    from smar.atomic import write_text

    folder.mkdir(parents=True, exist_ok=True)
    count: dict[str, int]
    rows, count = [], {}
    for i, s in enumerate(images):
        if count.setdefault(s["task"], 0) >= per_task:
            continue
        count[s["task"]] += 1
        name = f"image{i:03d}.png"
        s["images"][0].save(folder / name)
        question = s["messages"][0]["content"][1]["text"]
        answer = s["messages"][1]["content"][0]["text"]
        rows.append({"image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer}]})  # fmt: skip
    rows += [{"text": f"{q}\n{a}"} for q, a in answers["chat_eval"][: 4 * per_task]]
    path = folder / "samples.jsonl"
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
