"""The testbed's expected errors, re-exported from :mod:`smar.errors` (one error module for the
library, the commands and the testbed): ``SmarError`` and its kinds ``UsageError``,
``CorruptFile``, ``Diverged`` and ``Interrupted``."""

from smar.errors import CorruptFile, Diverged, Interrupted, SmarError, UsageError

__all__ = ["SmarError", "UsageError", "CorruptFile", "Diverged", "Interrupted"]
