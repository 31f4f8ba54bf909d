"""The testbed's images: scikit-learn's 8x8 handwritten digits (upscaled) and generated shape
scenes (1-4 coloured shapes in the quadrants), with their facts, captions for alignment and the
multi-hot targets of vision pretraining.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from smar.errors import UsageError

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("square", "circle", "triangle", "cross")
PLACES = ("top left", "top right", "bottom left", "bottom right")
DIGIT_WORDS = ("zero one two three four five six seven eight nine").split()
COUNT_WORDS = ("one", "two", "three", "four")
# Vision pretraining targets (multi-hot): digit 10 | colours 4 | shapes 4 | count 4 | places 4;
# each block in the order of its answer words (DIGIT_WORDS, COLOURS, SHAPES, COUNT_WORDS, PLACES)
TARGET_SLICES = {
    "digit": slice(0, 10),
    "colour": slice(10, 14),
    "shape": slice(14, 18),
    "count": slice(18, 22),
    "position": slice(22, 26),
}
VISION_CLASSES = 10 + len(COLOURS) + len(SHAPES) + 4 + len(PLACES)
_AT = {k: s.start for k, s in TARGET_SLICES.items()}


@dataclass
class ImageSample:
    """An image ``(C, H, W)`` with its facts (used to build captions, questions, targets)."""

    pixels: torch.Tensor
    digit: int | None = None
    objects: tuple[tuple[str, str, int], ...] = ()  # (colour, shape, place index)

    def target(self) -> torch.Tensor:
        t = torch.zeros(VISION_CLASSES)
        if self.digit is not None:
            t[_AT["digit"] + self.digit] = 1
        for colour, shape, place in self.objects:
            t[_AT["colour"] + list(COLOURS).index(colour)] = 1
            t[_AT["shape"] + SHAPES.index(shape)] = 1
            t[_AT["position"] + place] = 1
        if self.objects:
            t[_AT["count"] + len(self.objects) - 1] = 1
        return t


def _draw(shape: str, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    if shape == "square":
        m = (yy >= 2) & (yy < size - 2) & (xx >= 2) & (xx < size - 2)
    elif shape == "circle":
        m = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2 - 1.5) ** 2
    elif shape == "triangle":
        m = (yy >= 2) & (yy < size - 1) & ((xx - c).abs() <= (yy - 1) / 2)
    else:  # cross
        m = ((yy - c).abs() <= size / 8) | ((xx - c).abs() <= size / 8)
        m &= (yy >= 1) & (yy < size - 1) & (xx >= 1) & (xx < size - 1)
    return m.float()


def shape_scene(rng: random.Random, size: int = 32, n_objects: int | None = None) -> ImageSample:
    """1-4 coloured shapes in the quadrants of a dark image, with a little noise."""
    n = n_objects or rng.randint(1, 4)
    places = rng.sample(range(4), n)
    img = torch.zeros(3, size, size)
    half = size // 2
    objects = []
    for p in places:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        inner = half - rng.randint(0, 3)
        y0 = (p // 2) * half + rng.randint(0, half - inner)
        x0 = (p % 2) * half + rng.randint(0, half - inner)
        mask = _draw(shape, inner)
        rgb = torch.tensor(COLOURS[colour])[:, None, None]
        img[:, y0 : y0 + inner, x0 : x0 + inner] = torch.maximum(
            img[:, y0 : y0 + inner, x0 : x0 + inner], mask * rgb
        )
        objects.append((colour, shape, p))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    img = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return ImageSample(img, objects=tuple(objects))


_DIGITS: tuple[torch.Tensor, list[int]] | None = None  # images (n, 8, 8) in [0, 1], labels


def _digits() -> tuple[torch.Tensor, list[int]]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (torch.tensor(d.images, dtype=torch.float32) / 16.0, d.target.tolist())
    return _DIGITS


def digit_image(index: int, size: int = 32) -> ImageSample:
    """scikit-learn digit ``index`` (of 1797), upscaled to ``size`` and made RGB."""
    images, targets = _digits()
    x = images[index][None, None]  # (1, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")[0]
    return ImageSample(x.expand(3, -1, -1).clone(), digit=targets[index])


def digit_split(split: str) -> list[int]:
    """Indices of the digits in ``"train"`` (first 1500) or ``"eval"`` (the last 297)."""
    if split not in ("train", "eval"):
        raise UsageError(f"split must be 'train' or 'eval', got {split!r}")
    return list(range(1500)) if split == "train" else list(range(1500, 1797))


def caption(img: ImageSample, rng: random.Random) -> str:
    """A varied natural caption stating every fact of the image (alignment data)."""
    if img.digit is not None:
        return rng.choice(
            [
                "A handwritten digit {}.",
                "The number {}, written by hand.",
                "A scanned {}.",
                "Someone wrote the digit {}.",
            ]
        ).format(DIGIT_WORDS[img.digit])
    parts = [f"a {c} {s} in the {PLACES[p]}" for c, s, p in img.objects]
    head = rng.choice(["A picture of", "An image with", "We see", "This shows"])
    return f"{head} {COUNT_WORDS[len(parts) - 1]} shape{'s' if len(parts) > 1 else ''}: " + (
        ", ".join(parts) + "."
    )


def caption_samples(n: int, seed: int, size: int = 32) -> list[tuple[ImageSample, str]]:
    rng = random.Random(f"caption-{seed}")
    out = []
    for i in range(n):
        img = (
            digit_image(rng.choice(digit_split("train")), size)
            if i % 2 == 0
            else shape_scene(rng, size)
        )
        out.append((img, " " + caption(img, rng)))
    return out


def vision_samples(n: int, seed: int, size: int = 32) -> list[ImageSample]:
    rng = random.Random(f"vision-{seed}")
    return [
        digit_image(rng.choice(digit_split("train")), size)
        if i % 2 == 0
        else shape_scene(rng, size)
        for i in range(n)
    ]
