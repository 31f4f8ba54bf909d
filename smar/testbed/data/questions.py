"""Question/answer samples over images: one benchmark per question type (digit, shape, colour,
count, position), questions and answer leads phrased in several ways.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from smar.testbed.data.images import (
    COLOURS,
    COUNT_WORDS,
    DIGIT_WORDS,
    PLACES,
    SHAPES,
    ImageSample,
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
        raise ValueError(f"unknown question type {qa_type!r}; known: {QA_TYPES}")
    rng = random.Random(f"{qa_type}-{split}-{seed}")
    return [qa_sample(qa_type, rng, split, size) for _ in range(n)]
