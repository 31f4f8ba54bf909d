"""Question/answer samples over images: one benchmark per question type (digit, shape, colour,
count, position), questions and answer leads phrased in several ways.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from smar.errors import UsageError
from smar.testbed.data.images import (
    COLOURS,
    COUNT_WORDS,
    DIGIT_WORDS,
    PLACES,
    SHAPES,
    ImageSample,
    caption,
    digit_image,
    digit_split,
    shape_scene,
)

QA_TYPES = ("digit", "shape", "colour", "count", "position")


Q_TEMPLATES = {
    "digit": [
        "Which digit is written here?",
        "What number is shown in the picture?",
        "Can you read the digit?",
        "Tell me which digit this is.",
    ],
    "shape": [
        "What shape do you see?",
        "Which shape is in the picture?",
        "Name the shape in this image.",
        "What kind of shape is drawn here?",
    ],
    "colour": [
        "What colour is the shape?",
        "Which colour does the shape have?",
        "Tell me the colour of the object.",
        "What is the colour of the figure?",
    ],
    "count": [
        "How many shapes are there?",
        "Count the shapes in the picture.",
        "How many objects can you see?",
        "What is the number of shapes here?",
    ],
    "position": [
        "Where is the shape?",
        "In which part of the image is the object?",
        "Where in the picture is the figure?",
        "Which corner holds the shape?",
    ],
}
A_TEMPLATES = {
    "digit": ["It is the digit", "This is a", "The digit is", "I can read a"],
    "shape": ["It is a", "I see a", "The shape is a", "That is a"],
    "colour": ["It is", "The colour is", "The shape is", "It looks"],
    "count": ["There are", "I count", "I can see", "The answer is"],
    "position": ["It is in the", "The shape sits in the", "You find it in the", "It is at the"],
}
ANSWER_POOLS = {
    "digit": DIGIT_WORDS,
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "count": COUNT_WORDS,
    "position": PLACES,
}


def image_for(qa_type: str, rng: random.Random, split: str, size: int = 32) -> ImageSample:
    if qa_type == "digit":
        return digit_image(rng.choice(digit_split(split)), size)
    return shape_scene(rng, size, None if qa_type == "count" else 1)


def answer_of(qa_type: str, img: ImageSample) -> str:
    if qa_type == "digit":
        assert img.digit is not None  # a digit image
        return DIGIT_WORDS[img.digit]
    if qa_type == "count":
        return COUNT_WORDS[len(img.objects) - 1]
    colour, shape, place = img.objects[0]
    return {"shape": shape, "colour": colour, "position": PLACES[place]}[qa_type]


@dataclass
class MMSample:
    """A multimodal sample: an image, a text prompt after it and a scored answer."""

    image: ImageSample
    prompt: str  # question + answer lead, e.g. " Which shape ...? I see a"
    choices: tuple[str, ...]
    answer: int
    task: str

    @property
    def text(self) -> str:
        return self.prompt + self.choices[self.answer] + "."


def qa_sample(qa_type: str, rng: random.Random, split: str, size: int = 32) -> MMSample:
    img = image_for(qa_type, rng, split, size)
    q = rng.choice(Q_TEMPLATES[qa_type])
    a = rng.choice(A_TEMPLATES[qa_type])
    pool = ANSWER_POOLS[qa_type]
    correct = answer_of(qa_type, img)
    choices = tuple(" " + w for w in pool)
    return MMSample(img, f" {q} {a}", choices, pool.index(correct), qa_type)


def qa_samples(qa_type: str, n: int, seed: int, split: str, size: int = 32) -> list[MMSample]:
    """``n`` question/answer samples of one type, deterministic given ``seed`` and ``split``."""
    if qa_type not in QA_TYPES:
        raise UsageError(f"unknown question type {qa_type!r}; known: {QA_TYPES}")
    rng = random.Random(f"{qa_type}-{split}-{seed}")
    return [qa_sample(qa_type, rng, split, size) for _ in range(n)]


def _facts_for(qa_type: str, rng: random.Random) -> ImageSample:
    """The facts of a random image fit for a question type, without drawing it."""
    if qa_type == "digit":
        return ImageSample(torch.empty(0), digit=rng.randrange(10))
    n = rng.randint(1, 4) if qa_type == "count" else 1
    places = rng.sample(range(4), n)
    return ImageSample(
        torch.empty(0),
        objects=tuple((rng.choice(list(COLOURS)), rng.choice(SHAPES), p) for p in places),
    )


def description_text(n: int, seed: int) -> str:
    """``n`` text-only descriptions of random digits and scenes, one per line: captions and
    question/answer sentences in the words the multimodal stages use, with no pixels.

    A language model pretrained on the web knows how images are talked about before it ever sees
    one; the testbed's stage-1 LM learns it from these lines, so that alignment can teach the
    projector to say what it sees in words the LM already knows.
    """
    rng = random.Random(f"describe-{seed}")
    lines = []
    for _ in range(n):
        qa_type = rng.choice(QA_TYPES)
        img = _facts_for(qa_type, rng)
        if rng.random() < 0.5:
            lines.append(caption(img, rng).strip())
        else:
            q, a = rng.choice(Q_TEMPLATES[qa_type]), rng.choice(A_TEMPLATES[qa_type])
            lines.append(f"{q} {a} {answer_of(qa_type, img)}.")
    return "\n".join(lines) + "\n"
