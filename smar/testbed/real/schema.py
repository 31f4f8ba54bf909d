"""What ``smar real run``'s cached and finished files must hold, checked whenever one is read.

JSON files (the base model's answers, the stage-1 scores, a run's ``scores.json``) are parsed
strictly by :func:`smar.testbed.io.read_json` and then held to a schema: every field the run
reads, of the type it writes (a number may be ``null``: strict JSON writes NaN so). A file that
fails is set aside as ``<name>.corrupt-<time>-<pid>`` with a warning naming it, and rebuilt. A
run's model file, written by transformers, is checked against the sha256 its ``scores.json``
recorded; a run of a version that recorded none has its safetensors header and size checked
(:func:`safetensors_problem`: a truncated file is caught).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from smar.testbed.io import read_cached_json, set_aside

__all__ = [
    "BASE_ANSWERS",
    "STAGE1_SCORES",
    "RUN_SCORES",
    "problem",
    "read_checked",
    "safetensors_problem",
]

Check = Callable[[object], bool]


def _number(x: object) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _scores(x: object) -> bool:
    """``{benchmark: number}``, not empty (the report divides by their count)."""
    return isinstance(x, dict) and bool(x) and all(_number(v) for v in x.values())


def _rows(width: int) -> Check:
    """A list of ``width``-string rows (``[question, answer]``, ...)."""

    def check(x: object) -> bool:
        return isinstance(x, list) and all(
            isinstance(r, list) and len(r) == width and all(isinstance(s, str) for s in r)
            for r in x
        )

    return check


def _log(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(r, dict) for r in x)


def _optional(check: Check) -> Check:
    return lambda x: x is None or check(x)


# field -> check; a field in OPTIONAL may be missing (files of earlier versions lack it)
BASE_ANSWERS: dict[str, Check] = {"chat_eval": _rows(2), "chat_train": _rows(2),
                                  "knowledge": _rows(3), "code": _rows(3)}  # fmt: skip
STAGE1_SCORES: dict[str, Check] = {
    "language": _scores,
    "multimodal": _scores,
    "knowledge_asked": _count,
    "probes": lambda x: isinstance(x, dict),
    "image_answer_loss": _number,
}
RUN_SCORES: dict[str, Check] = {
    **STAGE1_SCORES,
    "arm": lambda x: isinstance(x, str),
    "seed": _count,
    "log": _log,
    "settings": lambda x: isinstance(x, dict),
    "model_sha256": _optional(lambda x: isinstance(x, str) and len(x) == 64),
}
OPTIONAL = ("probes", "settings", "model_sha256", "image_answer_loss")


def problem(data: object, schema: dict[str, Check]) -> str | None:
    """Why ``data`` is not a file of ``schema``, or None."""
    if not isinstance(data, dict):
        return f"not a JSON object but {type(data).__name__}"
    missing = [k for k in schema if k not in data and k not in OPTIONAL]
    if missing:
        return f"it lacks {', '.join(missing)}"
    wrong = [k for k, ok in schema.items() if k in data and not ok(data[k])]
    if wrong:
        return f"its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not what a run writes"
    return None


def read_checked(path: str | Path, schema: dict[str, Check],
                 expect: Callable | None = None) -> dict | None:  # fmt: skip
    """The content of a cached JSON file when it parses and holds ``schema`` (and
    ``expect(data)``, a further check returning why not, says None); otherwise the file is set
    aside with a warning and None returned (the caller rebuilds it). None too when missing."""
    data = read_cached_json(path)  # missing: None; not strict JSON: set aside, None
    if data is None:
        return None
    why = problem(data, schema) or (expect(data) if expect is not None else None)
    if why:
        set_aside(path, why)
        return None
    return data


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (missing, a header that does not parse, a
    size other than its header says), or None; reads the header only."""
    path = Path(path)
    if not path.is_file():
        return "it is missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"{size} bytes, shorter than its header says"
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"its safetensors header does not parse ({str(e)[:80]})"
    if 8 + n + end != size:
        return f"{size} bytes where its header says {8 + n + end} (truncated?)"
    return None
