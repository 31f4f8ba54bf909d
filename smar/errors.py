"""The expected errors of the library and the commands: one type, :class:`SmarError`, whose
message names the problem and the fix in one line. ``smar`` prints that line and exits with code 2
(``--debug`` shows the traceback); anything else is a bug and keeps its traceback.

``UsageError`` (a bad argument, option, override or input file: the library's checks of what it
is given, the commands' of their options; found before the work on it starts), ``CorruptFile``
(a file that fails its check on load), ``Diverged`` (a non-finite loss) and ``Interrupted``
(Ctrl-C or SIGTERM; exit code 130) are its kinds. ``UsageError`` is also a ``ValueError``, as
Python's convention for a bad argument wants, so that ``except ValueError`` keeps working. Both
are exported as ``smar.SmarError`` and ``smar.UsageError``. ``smar.testbed.errors`` re-exports them.
"""

from __future__ import annotations

__all__ = [
    "SmarError",
    "UsageError",
    "MissingFile",
    "WrongType",
    "AnalyzeError",
    "CorruptFile",
    "Diverged",
    "Interrupted",
]


class SmarError(Exception):
    """An expected error, said in one line: ``problem`` and, when known, ``fix``."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem, fix)  # both in args: the error pickles across processes
        self.problem, self.fix = problem, fix

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}; fix: {self.fix}"


class UsageError(SmarError, ValueError):
    """A bad argument, option, override or input file, found before the work on it starts.

    Args:
        problem: what is wrong, naming the argument or file.
        fix: what to do instead, when known.
    """


class WrongType(UsageError, TypeError):
    """An argument of the wrong type (also a ``TypeError``, as before)."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or folder the input needs is not there (also a ``FileNotFoundError``, as before)."""


class AnalyzeError(UsageError):
    """A bad argument of ``smar analyze``, said in one line."""


class CorruptFile(SmarError):
    """A file failed its check on load (truncated, garbled, unparsable); names its path."""

    def __init__(self, path: object, why: str, fix: str | None = None) -> None:
        super().__init__(f"{path} is corrupt ({why})", fix)
        self.path, self.why = str(path), why

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:
        return (type(self), (self.path, self.why, self.fix))


class Diverged(SmarError):
    """A training stage produced a non-finite loss or weights; nothing of it was cached."""


class Interrupted(SmarError):
    """Ctrl-C or SIGTERM: finished work is kept, the message says how to resume."""

    exit_code = 130
