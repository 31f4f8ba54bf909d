"""Text skill tasks: procedurally generated prompts a small LM learns during pretraining, each
scored by answer log-likelihood among four choices (alphabet, numbers, calendar, facts about an
invented world, antonyms, plurals).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from smar.errors import UsageError


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


def _choices(
    rng: random.Random, correct: str, pool: Sequence[str], k: int = 4
) -> tuple[tuple[str, ...], int]:
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
        raise UsageError(f"unknown skill task {task!r}; known: {sorted(SKILLS)}")
    rng = random.Random(f"{task}-{seed}")
    return [SKILLS[task](rng) for _ in range(n)]


def skill_text(n: int, seed: int) -> str:
    """Pretraining text: ``n`` skill examples from every task, one per line, shuffled."""
    rng = random.Random(seed)
    lines = [ex.text + "." for t in SKILLS for ex in skill_examples(t, n // len(SKILLS), seed)]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"
